"""Wall-clock sampling time of static native, static weak and mixed schedules against their FLOPs.

    python bench/bench_sampling.py [--model embedded:flexidit-mnist16-lora] [--repeats 3]

For each schedule and batch size: median seconds per batch, the measured speed-up over static
native, the speed-up the FLOPs predict, and their ratio (1.0 = wall clock tracks FLOPs exactly).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from flexisearch.models import flops
from flexisearch.models.loading import load_model
from flexisearch.sampling.generate import sample
from flexisearch.sampling.schedule import Schedule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="embedded:flexidit-mnist16-lora")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (CUDA)")
    args = ap.parse_args()
    model = load_model(args.model, args.device)
    cfg, n = model.config, args.steps
    native, weak = cfg.patch_size, max(cfg.extra_patch_sizes)
    kw = dict(guidance_scale=2.0, solver="euler", model=model.fingerprint())
    schedules = {
        "static native": Schedule.static(native, n, **kw),
        "static weak": Schedule.static(weak, n, **kw),
        f"weak first {n // 2}": Schedule.weak_first(n // 2, n, weak, native, **kw),
        f"split {n // 4}/{3 * n // 4}": Schedule.branch_split(n // 4, 3 * n // 4, n, weak, native, **kw),
    }
    ref = flops.schedule_macs(cfg, schedules["static native"])
    print(f"# {args.model} on {args.device} ({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}), "
          f"{n} Euler steps, CFG 2.0, median of {args.repeats}")
    print(f"{'schedule':<16} {'batch':>5} {'s/batch':>9} {'FLOPs ratio':>11} {'speed-up':>9} {'predicted':>9} {'measured/pred':>13}")
    dtype = torch.bfloat16 if args.bf16 else None
    for b in args.batches:
        base = None
        for name, s in schedules.items():
            labels, seeds = [i % cfg.num_classes for i in range(b)], list(range(b))
            sample(model, s, labels, seeds, batch_size=b, autocast_dtype=dtype)  # warm-up
            times = []
            for _ in range(args.repeats):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                sample(model, s, labels, seeds, batch_size=b, autocast_dtype=dtype)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            base = base or t
            frac = flops.schedule_macs(cfg, s) / ref
            print(f"{name:<16} {b:>5} {t:>9.3f} {frac:>11.3f} {base / t:>9.2f} {1 / frac:>9.2f} {(base / t) * frac:>13.2f}")


if __name__ == "__main__":
    main()
