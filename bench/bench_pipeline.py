"""Wall time of FlexiDiTPipeline against the library sampler (sampler.sample) on the same schedule.

Both draw the same per-sample-seeded noise and return the final samples (output_type="latent", no
progress bars), so the difference is the pipeline's own overhead. Runs alternate between the two
(order swapped every repeat) so that drift in a shared machine's load hits both alike.

    OMP_NUM_THREADS=1 python bench/bench_pipeline.py --repeats 7
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from flexisearch.models.dit import FlexiDiT, FlexiDiTConfig
from flexisearch.sampling.generate import make_scheduler, sample
from flexisearch.sampling.pipeline import FlexiDiTPipeline
from flexisearch.sampling.schedule import Schedule


def build(hidden: int, depth: int, size: int) -> FlexiDiT:
    """A small flow FlexiDiT (native 2, weak 4) with small random weights everywhere."""
    torch.manual_seed(0)
    model = FlexiDiT(FlexiDiTConfig(input_size=size, in_channels=4, hidden_size=hidden, depth=depth, num_heads=4,
                                    num_classes=10, learn_sigma=False, prediction="flow"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.with_patch_sizes((4,)).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    model = build(args.hidden, args.depth, args.size)
    # weak for the first 30% (conditional) / 50% (unconditional) steps: both batched and split CFG steps
    schedule = Schedule.branch_split(round(0.3 * args.steps), args.steps // 2, args.steps, 4, 2, guidance_scale=4.0,
                                     solver="euler", model=model.fingerprint())
    pipe = FlexiDiTPipeline(model, make_scheduler("euler", "flow"))
    pipe.set_progress_bar_config(disable=True)
    labels, seeds = [i % 10 for i in range(args.batch)], list(range(args.batch))
    runs = {
        "sampler.sample": lambda: sample(model, schedule, labels, seeds, batch_size=args.batch),
        "FlexiDiTPipeline": lambda: pipe(labels, schedule, seeds=seeds, output_type="latent").images,
    }
    outputs = {name: fn() for name, fn in runs.items()}  # warm-up (and the pipeline's one-off fingerprint)
    assert torch.equal(*outputs.values()), "pipeline and sampler disagree"
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch threads "
          f"{torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
          f"torch {torch.__version__}")
    print(f"# FlexiDiT hidden {args.hidden} depth {args.depth} {args.size}x{args.size}x4, batch {args.batch}, "
          f"{args.steps} euler steps, CFG 4.0, {schedule.describe()}; median of {args.repeats}")
    base = statistics.median(times["sampler.sample"])
    print(f"| {'method':<16} | median s | min s  | max s  | overhead |")
    print(f"|{'-' * 18}|----------|--------|--------|----------|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name:<16} | {med:8.3f} | {min(ts):6.3f} | {max(ts):6.3f} | {100 * (med / base - 1):+7.1f}% |")


if __name__ == "__main__":
    main()
