"""Predicted vs measured sampling time, and measured speed-up vs the speed-up FLOPs predict.

    python bench/bench_latency.py [--model embedded:flexidit-mnist16-lora] [--batches 1 64] [--repeats 3]
                                  [--merge-lora] [--schedule NAME=best.json ...] [--device cuda] [--dtype bfloat16]

Profiles the model (flexisearch.sampling.latency.profile; or reads --table), then for each batch size and
schedule times `sample` for one batch (median of --repeats after a warm-up) and prints: the prediction
of the cost table, its error, the FLOPs fraction, the measured speed-up over static native, the
speed-up the FLOPs predict, and their ratio (1.0 = wall clock tracks FLOPs exactly). Built in: static
native, static weak and the paper's best weak-first-k (k = 60% of the steps); add searched schedules
with --schedule NAME=PATH (a best.json or schedule file).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flexisearch.models import flops
from flexisearch.models.loading import load_model
from flexisearch.sampling.generate import sample
from flexisearch.sampling.latency import DTYPES, CostTable, profile
from flexisearch.sampling.schedule import Schedule


def measure(model, schedule: Schedule, batch: int, repeats: int, dtype: torch.dtype | None) -> float:
    """Median wall time of `sample` for one batch of `batch` samples."""
    labels, seeds = [i % model.config.num_classes for i in range(batch)], list(range(batch))
    cuda = next(model.parameters()).device.type == "cuda"
    sample(model, schedule, labels, seeds, batch_size=batch, autocast_dtype=dtype)  # warm-up
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sample(model, schedule, labels, seeds, batch_size=batch, autocast_dtype=dtype)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:flexidit-mnist16-lora")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--merge-lora", action="store_true")
    ap.add_argument("--table", help="a cost table to predict with (default: profile now)")
    ap.add_argument("--schedule", action="append", default=[], metavar="NAME=PATH", help="a searched schedule")
    args = ap.parse_args()

    model = load_model(args.model, args.device).merge_lora(args.merge_lora)
    cfg, n = model.config, args.steps
    native, weak = cfg.patch_size, max(cfg.extra_patch_sizes)
    kw = {"guidance_scale": 2.0, "solver": "euler", "model": model.fingerprint()}
    schedules = {"static native": Schedule.static(native, n, **kw), "static weak": Schedule.static(weak, n, **kw),
                 f"paper: weak first {3 * n // 5}": Schedule.weak_first(3 * n // 5, n, weak, native, **kw)}
    for item in args.schedule:
        name, path = item.split("=", 1)
        schedules[name] = Schedule.load(path)
    table = CostTable.load(args.table) if args.table else profile(
        model, args.batches, sorted({s.solver for s in schedules.values()}), dtype=args.dtype)
    dtype = DTYPES[args.dtype] if args.dtype != "float32" else None
    print(f"# {args.model} on {table.key['device']}, {args.dtype}, merge_lora {args.merge_lora}, torch "
          f"{torch.__version__}; median of {args.repeats}; static native: {n} steps, CFG 2.0")
    print(f"{'schedule':<24} {'steps':>5} {'batch':>5} {'predicted s':>11} {'measured s':>10} {'error':>6} "
          f"{'FLOPs frac':>10} {'speed-up':>8} {'by FLOPs':>8} {'ratio':>6}")
    for b in args.batches:
        base = None
        ref_macs = flops.schedule_macs(cfg, schedules["static native"])
        for name, s in schedules.items():
            predicted = table.batch_seconds(s, b)
            t = measure(model, s, b, args.repeats, dtype)
            base = base or t
            # FLOPs of a schedule with another step count are compared with static native at 20 steps too
            frac = flops.schedule_macs(cfg, s) / ref_macs
            print(f"{name:<24} {s.num_steps:>5} {b:>5} {predicted:>11.4f} {t:>10.4f} {predicted / t - 1:>+6.1%} "
                  f"{frac:>10.3f} {base / t:>8.2f} {1 / frac:>8.2f} {base / t * frac:>6.2f}")


if __name__ == "__main__":
    main()
