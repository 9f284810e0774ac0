"""Per-trial overhead of the Ray backend against the Optuna backend, and trials per hour with 1 and 2 workers.

    python bench/bench_ray.py [--trials 8 32]

Each backend runs a study of each size; the difference of the wall times over the difference of the trial
counts is the time per trial, free of the fixed start-up (Ray's processes, the workers' model loading).

Same search space and budget for every row: a 16x16 FlexiDiT (hidden 64, depth 3, random weights:
the cost of a trial, not its quality, matters here), 8 Euler steps, 64 search samples, fid_native.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from flexisearch.models.dit import FlexiDiT, FlexiDiTConfig
from flexisearch.optimize.config import load_search_config
from flexisearch.optimize.evaluate import Evaluator
from flexisearch.optimize.optuna_backend import run_search


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, nargs=2, default=[8, 32], help="two study sizes: the slope is per trial")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ray-", dir="runs" if Path("runs").is_dir() else None)).resolve()
    torch.manual_seed(0)
    model = FlexiDiT(FlexiDiTConfig(input_size=16, in_channels=1, hidden_size=64, depth=3, num_heads=4, num_classes=10,
                                    learn_sigma=False, prediction="flow"))
    model.with_patch_sizes((4,), init_std=0.02).save_pretrained(work / "model")
    os.chdir(work)
    base = {"model": str(work / "model"), "space": {"type": "branch_threshold", "num_steps": 8},
            "metric": {"name": "fid_native", "max": 1000.0}, "reference": {"num_steps": 8, "guidance_scale": 2.0},
            "search_samples": 64, "heldout_samples": 16, "resources": {"cpu": 1}}
    rows = []
    for name, backend, workers in (("optuna, 1 process", "optuna", 1), ("ray, 1 worker", "ray", 1),
                                   ("ray, 2 workers", "ray", 2)):
        walls = []
        for n in args.trials:
            study = f"{name.replace(', ', '-').replace(' ', '')}-{n}"
            cfg = load_search_config(None, {**base, "study": study, "max_concurrent": workers, "n_trials": n})
            evaluator = Evaluator(cfg)
            evaluator.quality(evaluator.reference)  # reference sampled before timing, as in both backends' first step
            t0 = time.perf_counter()
            if backend == "ray":
                from flexisearch.optimize.ray_backend import run_ray_search

                run_ray_search(cfg, evaluator)
            else:
                run_search(cfg, evaluator, progress=False)
            walls.append(time.perf_counter() - t0)
        per = (walls[1] - walls[0]) / (args.trials[1] - args.trials[0])  # the fixed start-up cost cancels
        rows.append((name, walls, per, walls[0] - per * args.trials[0]))
    a, b = args.trials
    print(f"# {a} and {b} trials, {platform.machine()} with {os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"{'backend':<20} {f'wall s ({a})':>12} {f'wall s ({b})':>12} {'s/trial':>8} {'start-up s':>10} "
          f"{'trials/hour':>11} {'overhead/trial vs optuna':>25}")
    for name, walls, per, fixed in rows:
        print(f"{name:<20} {walls[0]:12.1f} {walls[1]:12.1f} {per:8.3f} {fixed:10.1f} {3600 / per:11.0f} "
              f"{per - rows[0][2]:+24.3f}s")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
