"""Predicted vs measured sampling time, and measured speed-up vs the speed-up FLOPs predict.

    python bench/bench_latency.py [--model embedded:flexidit-mnist16-lora] [--batches 1 64] [--repeats 5]
                                  [--merge-lora] [--schedule NAME=best.json ...] [--device cuda] [--dtype bfloat16]

For each batch size, in rounds (see `measure`), profiles the model (flexisearch.sampling.latency.profile; or
reads --table) and times `sample` for one batch of each schedule; prints the medians over rounds: the
prediction of the cost table, the measurement and its spread (interquartile range over the median), the
prediction's error, the FLOPs fraction, the measured speed-up over static native, the speed-up the FLOPs
predict, and their ratio (1.0 = wall clock tracks FLOPs exactly). Built in: static native, static weak and the
paper's best weak-first-k (k = 60% of the steps); add searched schedules with --schedule NAME=PATH (a best.json
or schedule file).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from flexisearch.models import flops
from flexisearch.models.loading import load_model
from flexisearch.sampling.generate import sample
from flexisearch.sampling.latency import DTYPES, CostTable, device_name, profile
from flexisearch.sampling.schedule import Schedule


def measure(model, schedules: dict[str, Schedule], batch: int, args: argparse.Namespace,
            dtype: torch.dtype | None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Predicted and measured wall times of `sample` for one batch of `batch` samples per schedule, round after
    round: each round profiles the cost table (one timed run per part; or reads --table), then runs every schedule
    once, so that a drift of the machine's speed (this VM's runs minutes apart differ by 10-20%) shifts the
    prediction and the measurement alike. At least --repeats rounds, and at least --min-seconds of static native."""
    labels, seeds = [i % model.config.num_classes for i in range(batch)], list(range(batch))
    cuda = next(model.parameters()).device.type == "cuda"
    solvers = sorted({s.solver for s in schedules.values()})

    def run(schedule: Schedule) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sample(model, schedule, labels, seeds, batch_size=batch, autocast_dtype=dtype)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    first = {name: run(s) for name, s in schedules.items()}  # warm-up
    rounds = max(args.repeats, math.ceil(args.min_seconds / first["static native"]))
    predicted: dict[str, list[float]] = {name: [] for name in schedules}
    measured: dict[str, list[float]] = {name: [] for name in schedules}
    given = CostTable.load(args.table) if args.table else None
    for _ in range(rounds):
        table = given or profile(model, [batch], solvers, dtype=args.dtype, warmup=1, repeats=1)
        for name, s in schedules.items():
            predicted[name].append(table.batch_seconds(s, batch))
            measured[name].append(run(s))
    return predicted, measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:flexidit-mnist16-lora")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5, help="rounds at least (each schedule once a round)")
    ap.add_argument("--min-seconds", type=float, default=10.0, help="rounds at least this long in static native")
    ap.add_argument("--merge-lora", action="store_true")
    ap.add_argument("--table", help="a cost table to predict with (default: profile it in every round)")
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
    dtype = DTYPES[args.dtype] if args.dtype != "float32" else None
    print(f"# {args.model} on {device_name(next(model.parameters()).device)}, {args.dtype}, merge_lora "
          f"{args.merge_lora}, torch {torch.__version__}; medians over rounds (IQR: their spread, measured); static "
          f"native: {n} steps, CFG 2.0")
    print(f"{'schedule':<24} {'steps':>5} {'batch':>5} {'rounds':>6} {'predicted s':>11} {'measured s':>10} "
          f"{'IQR':>6} {'error':>6} {'FLOPs frac':>10} {'speed-up':>8} {'by FLOPs':>8} {'ratio':>6}")
    ref_macs = flops.schedule_macs(cfg, schedules["static native"])
    for b in args.batches:
        predicted, measured = measure(model, schedules, b, args, dtype)
        base = statistics.median(measured["static native"])
        for name, s in schedules.items():
            pred, t = statistics.median(predicted[name]), statistics.median(measured[name])
            q = statistics.quantiles(measured[name], n=4, method="inclusive")
            # FLOPs of a schedule with another step count are compared with static native at 20 steps too
            frac = flops.schedule_macs(cfg, s) / ref_macs
            print(f"{name:<24} {s.num_steps:>5} {b:>5} {len(measured[name]):>6} {pred:>11.4f} {t:>10.4f} "
                  f"{(q[2] - q[0]) / t:>6.1%} {pred / t - 1:>+6.1%} {frac:>10.3f} {base / t:>8.2f} "
                  f"{1 / frac:>8.2f} {base / t * frac:>6.2f}")


if __name__ == "__main__":
    main()
