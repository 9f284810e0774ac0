"""Flexify on real hardware: memory per GPU, Ray Train's overhead, and the latent cache against encoding.

    python bench/bench_train.py memory [--preset DiT-XL/2 | PixArt-XL/2-256] [--batch 32]
    python bench/bench_train.py throughput [--steps 200] [--batch 64]
    python bench/bench_train.py cache [--batch 8] [--repeats 3]

memory: the memory a flexify worker holds for a DiT preset or PixArt-XL/2 at 256 px (T5-XXL states of 120 tokens
in, the text encoder not on the GPU while training; random weights: nothing is downloaded),
computed from the model: weights, gradients and AdamW moments of what trains, the EMA copy, and the
activations autograd keeps for the backward pass, measured per sample (sum of the distinct tensors
saved for backward, parameters excluded) in one forward of the recipe's loss, float32 and under
bf16 autocast (on CPU; CUDA's autocast casts the same matmuls).
throughput: optimizer steps per second of the same flexify run (embedded base, shared) in this
process and on one Ray Train worker given as many CPUs as this process has torch threads (Ray sets a worker's
thread count to its CPUs), timed from the run's log after its first 10 steps, so start-up (Ray, the
worker's imports) is not counted.
cache: one training batch of 256x256 images from the latent cache against encoding it with an
AutoencoderKL of Stable Diffusion's VAE layout (as DiT-XL/2 uses; random weights).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flexisearch.models.dit import PRESETS, FlexiDiT
from flexisearch.models.flexible import FlexibleDiT
from flexisearch.models.text_dit import FlexiTextDiT, FlexiTextDiTConfig
from flexisearch.training.dit import FlexifyConfig, train_flexify
from flexisearch.training.objectives import objective_for

GIB = 2**30


PIXART = "PixArt-XL/2-256"


def base_model(preset: str) -> FlexibleDiT:
    """A DiT preset, or PixArt-XL/2 at 256 px (FlexiTextDiTConfig's defaults) with one random 120-token prompt."""
    if preset != PIXART:
        return FlexiDiT(PRESETS[preset])
    model = FlexiTextDiT(FlexiTextDiTConfig())
    cfg = model.config
    model.set_prompts(torch.randn(1, cfg.text_len, cfg.caption_channels), torch.ones(1, cfg.text_len), ["a prompt"],
                      torch.randn(cfg.text_len, cfg.caption_channels), torch.ones(cfg.text_len))
    return model


def saved_bytes(model: FlexibleDiT, mode: str, dtype: torch.dtype | None, batch: int) -> int:
    """Bytes autograd saves for backward in one forward of flexify's loss on a batch (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    objective = objective_for(model.config)
    size = model.config.input_size
    noised = objective.noised(torch.randn(batch, model.config.in_channels, size, size), torch.Generator().manual_seed(0))
    y = torch.zeros(batch, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=dtype is not None):
        if mode == "lora":  # the native teacher runs without grad; the weak student is what autograd keeps
            with torch.no_grad():
                model(noised.xt, noised.t, y, model.config.patch_size)
            model(noised.xt, noised.t, y, 4).sum()
        else:  # shared: the worst batch, all at the native size
            objective.losses(model(noised.xt, noised.t, y, model.config.patch_size), noised).sum()
    return sum(seen.values())


def activation_bytes(model: FlexibleDiT, mode: str, dtype: torch.dtype | None) -> tuple[int, int]:
    """(bytes per sample, bytes per step) saved for backward: from batches of 1 and 2; the per-step part is what
    does not grow with the batch (under autocast: the bf16 copies of the weights)."""
    one, two = (saved_bytes(model, mode, dtype, b) for b in (1, 2))
    return two - one, 2 * one - two


def memory(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    base = base_model(args.preset)
    print(f"# {args.preset} with weak patch size 4, flexify worker memory at a local batch of {args.batch} "
          f"(torch {torch.__version__}, {platform.machine()})")
    print(f"{'mode':<7} {'params':>7} {'trained':>8} {'weights':>8} {'grads+Adam':>11} {'EMA':>6} "
          f"{'act/sample fp32':>16} {'act/sample bf16':>16} {'bf16 weight copies':>19} {'total bf16':>11}")
    for mode in ("shared", "lora"):
        model = base.with_patch_sizes((4,), lora_rank=32 if mode == "lora" else 0, lora_alpha=32.0)
        trained = [p for n, p in model.named_parameters()
                   if mode == "shared" or any(k in n for k in ("residual", "patch_size_embed", "lora_"))]
        n_all, n_trained = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in trained)
        for p in model.parameters():
            p.requires_grad_(any(p is q for q in trained))
        act32, _ = activation_bytes(model, mode, None)
        act16, copies = activation_bytes(model, mode, torch.bfloat16)
        weights, states, ema = 4 * n_all, 12 * n_trained, 4 * n_all  # fp32 weights; grad + 2 moments; EMA copy
        total = weights + states + ema + copies + args.batch * act16
        print(f"{mode:<7} {n_all / 1e6:>6.0f}M {n_trained / 1e6:>7.1f}M {weights / GIB:>7.2f}G {states / GIB:>10.2f}G "
              f"{ema / GIB:>5.2f}G {act32 / 2**20:>14.0f}Mi {act16 / 2**20:>14.0f}Mi {copies / GIB:>18.2f}G "
              f"{total / GIB:>10.1f}G")


def _steps_per_s(run: Path) -> float:
    log = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    return (log[-1]["step"] - log[9]["step"]) / (log[-1]["elapsed_s"] - log[9]["elapsed_s"])


def throughput(args: argparse.Namespace) -> None:
    from flexisearch.training.ray_train import train_flexify_ray

    cfg = FlexifyConfig(base="embedded:dit-mnist16-base", mode="shared", steps=args.steps, batch_size=args.batch,
                        ckpt_every=args.steps)
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-", dir="."))
    try:
        train_flexify(cfg, tmp / "single")
        train_flexify_ray(cfg, tmp / "ray", num_workers=1, cpus_per_worker=torch.get_num_threads())
        single, ray = _steps_per_s(tmp / "single"), _steps_per_s(tmp / "ray")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"# flexify (embedded base, shared, batch {args.batch}, {args.steps} steps), torch {torch.__version__}, "
          f"{platform.machine()}, {torch.get_num_threads()} threads")
    print(f"{'run':<22} {'steps/s':>8} {'vs single':>10}")
    print(f"{'single process':<22} {single:>8.2f} {'1.00':>10}")
    print(f"{'Ray Train, 1 worker':<22} {ray:>8.2f} {ray / single:>10.2f}   (the worker has as many CPUs as this "
          "process has threads)")


def cache(args: argparse.Namespace) -> None:
    from diffusers import AutoencoderKL
    from PIL import Image

    from flexisearch.data.images import read_image
    from flexisearch.data.latents import LatentCache

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-", dir="."))
    try:
        gen = torch.Generator().manual_seed(0)
        for i in range(args.batch):
            (tmp / "images" / str(i % 2)).mkdir(parents=True, exist_ok=True)
            arr = torch.randint(0, 256, (300, 400, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(tmp / "images" / str(i % 2) / f"{i}.png")
        t0 = time.perf_counter()
        store = LatentCache.build(tmp / "images", vae, 256, tmp / "cache")
        build_s = time.perf_counter() - t0
        files = sorted((tmp / "images").glob("*/*.png"))
        idx = torch.arange(args.batch)
        read, encode = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            store.batch(idx, gen)
            read.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with torch.no_grad():
                x = torch.stack([read_image(p, 256) for p in files])
                vae.encode(x).latent_dist.sample(gen) * vae.config.scaling_factor
            encode.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r, e = statistics.median(read), statistics.median(encode)
    print(f"# a batch of {args.batch} images (400x300 PNG -> 256x256) for a latent DiT, SD-VAE layout "
          f"(83.7M params), CPU, {torch.get_num_threads()} threads; building the cache (with flips) took "
          f"{build_s:.1f} s")
    print(f"{'source':<28} {'s/batch':>8} {'vs cache':>9}")
    print(f"{'latent cache':<28} {r:>8.4f} {'1':>9}")
    print(f"{'decode PNG + VAE encode':<28} {e:>8.3f} {e / r:>8.0f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("memory")
    p.add_argument("--preset", default="DiT-XL/2", choices=[k for k in PRESETS if k.endswith("/2")] + [PIXART])
    p.add_argument("--batch", type=int, default=32)
    p = sub.add_parser("throughput")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p = sub.add_parser("cache")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    {"memory": memory, "throughput": throughput, "cache": cache}[args.what](args)


if __name__ == "__main__":
    main()
