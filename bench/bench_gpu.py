"""One command for a GPU machine: CUDA correctness, then the sampling-speed tables.

    python bench/bench_gpu.py [--model embedded:flexidit-mnist16-lora] [--device cuda]

Checks (each prints PASS or FAIL with its numbers; exit 1 if any fails):
  - the CUDA model computes what the CPU model computes (fp32, one forward per patch size);
  - bf16 autocast samples agree with fp32 samples (mean absolute difference under 0.05 in [-1, 1] pixels);
  - per-sample seeds: a sample is the same whether drawn alone or in a batch, and the same on a rerun.
Then runs bench/bench_latency.py for fp32 and bf16 at batch 1, 8 and 64 (predicted vs measured, speed-up vs FLOPs).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from flexisearch.models.loading import load_model
from flexisearch.sampling.generate import sample
from flexisearch.sampling.schedule import Schedule


def check(name: str, ok: bool, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:flexidit-mnist16-lora")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device", file=sys.stderr)
        return 2
    cpu, gpu = load_model(args.model, "cpu"), load_model(args.model, args.device)
    cfg = cpu.config
    native, weak = cfg.patch_size, max(cfg.extra_patch_sizes)
    ok = True
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t, y = torch.tensor([999.0, 600.0, 300.0, 10.0]), torch.arange(4) % cfg.num_classes
    for p in cfg.patch_sizes:
        with torch.no_grad():
            diff = (cpu(x, t, y, p) - gpu(x.cuda(), t.cuda(), y.cuda(), p).cpu()).abs().max().item()
        ok &= check(f"forward at patch size {p}, CUDA vs CPU", diff < 1e-3, f"max |diff| {diff:.2e}")

    s = Schedule.weak_first(12, 20, weak, native, guidance_scale=2.0, solver="euler", model=gpu.fingerprint())
    labels, seeds = [i % cfg.num_classes for i in range(16)], list(range(100, 116))
    fp32 = sample(gpu, s, labels, seeds, batch_size=16)
    bf16 = sample(gpu, s, labels, seeds, batch_size=16, autocast_dtype=torch.bfloat16)
    mad = (fp32 - bf16).abs().mean().item()
    ok &= check("bf16 autocast vs fp32 samples", mad < 0.05, f"mean |diff| {mad:.4f}")
    alone = sample(gpu, s, labels[3:4], seeds[3:4], batch_size=1)
    again = sample(gpu, s, labels, seeds, batch_size=16)
    d_alone, d_again = (alone[0] - fp32[3]).abs().max().item(), (again - fp32).abs().max().item()
    ok &= check("a sample drawn alone equals it in a batch of 16", d_alone < 1e-3, f"max |diff| {d_alone:.2e}")
    ok &= check("rerun with the same seeds", d_again < 1e-5, f"max |diff| {d_again:.2e}")

    bench = Path(__file__).with_name("bench_latency.py")
    for dtype in ("float32", "bfloat16"):
        subprocess.run([sys.executable, str(bench), "--model", args.model, "--device", args.device, "--dtype", dtype,
                        "--batches", "1", "8", "64", "--repeats", "5", "--merge-lora"], check=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
