"""Per-trial overhead of the Ray backend against the Optuna backend, and trials per hour with 1 and 2 workers.

    python bench/bench_ray.py [--trials 12]

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
    ap.add_argument("--trials", type=int, default=12)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ray-", dir="runs" if Path("runs").is_dir() else None)).resolve()
    torch.manual_seed(0)
    model = FlexiDiT(FlexiDiTConfig(input_size=16, in_channels=1, hidden_size=64, depth=3, num_heads=4, num_classes=10,
                                    learn_sigma=False, prediction="flow"))
    model.with_patch_sizes((4,), init_std=0.02).save_pretrained(work / "model")
    os.chdir(work)
    base = {"model": str(work / "model"), "space": {"type": "branch_threshold", "num_steps": 8},
            "metric": {"name": "fid_native", "max": 1000.0}, "reference": {"num_steps": 8, "guidance_scale": 2.0},
            "search_samples": 64, "heldout_samples": 16, "n_trials": args.trials, "resources": {"cpu": 1}}
    rows = []
    for name, backend, workers in (("optuna, 1 process", "optuna", 1), ("ray, 1 worker", "ray", 1),
                                   ("ray, 2 workers", "ray", 2)):
        study = name.replace(", ", "-").replace(" ", "")
        cfg = load_search_config(None, {**base, "study": study, "max_concurrent": workers})
        evaluator = Evaluator(cfg)
        evaluator.quality(evaluator.reference)  # reference sampled before timing, as in both backends' first step
        t0 = time.perf_counter()
        if backend == "ray":
            from flexisearch.optimize.ray_backend import run_ray_search

            run_ray_search(cfg, evaluator)
        else:
            run_search(cfg, evaluator, progress=False)
        rows.append((name, time.perf_counter() - t0))
    print(f"# {args.trials} trials, {platform.machine()} with {os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"{'backend':<22} {'wall s':>7} {'s/trial':>8} {'trials/hour':>11} {'overhead/trial vs optuna':>25}")
    ref = rows[0][1] / args.trials
    for name, wall in rows:
        per = wall / args.trials
        print(f"{name:<22} {wall:7.1f} {per:8.2f} {3600 / per:11.0f} {per - ref:+24.2f}s")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
