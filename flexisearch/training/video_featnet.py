"""Training of the video feature network (metrics.video_featnet) and the FVD assets built with it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.moving_digits import DIRECTIONS, load_moving_digits
from ..errors import UserError
from ..files import atomic_write_bytes
from ..metrics.featnet import default_feature_net
from ..metrics.fid import (
    bootstrap_ci,
    compute_reference_stats,
    extract_features,
    fid_against_stats,
)
from ..metrics.video_featnet import (
    VideoFeatureNet,
    VideoFeatureNetConfig,
    per_frame_fid,
    video_frames,
)
from .featnet import fit


def train_video_feature_net(videos: torch.Tensor, labels: torch.Tensor, motions: torch.Tensor, steps: int = 600,
                            seed: int = 0, batch_size: int = 32, lr: float = 3e-3,
                            config: VideoFeatureNetConfig | None = None) -> tuple[VideoFeatureNet, list[float]]:
    """Train a VideoFeatureNet on clips (N, C, T, S, S) to tell their digit and their motion; returns (net in eval
    mode, per-step losses: the sum of both label-smoothed cross entropies).

    AdamW with a one-cycle schedule and dropout, as train_feature_net; no augmentation: moving_digits draws every
    clip's position and direction afresh, so more clips are the cheap augmentation.
    Seeded: the same clips, seed and thread count give the same weights.
    """
    if videos.dim() != 5 or not len(videos) == len(labels) == len(motions):
        raise UserError(f"expected clips (N, C, T, S, S) with N labels and motions, got {tuple(videos.shape)}, "
                        f"{len(labels)} labels, {len(motions)} motions")
    if config is None:
        config = VideoFeatureNetConfig(frames=videos.shape[2], image_size=videos.shape[-1], in_channels=videos.shape[1],
                                       num_motions=len(DIRECTIONS))

    def batch_loss(net: nn.Module, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        digit, motion = net.classify(net.features(videos[idx]))
        return (F.cross_entropy(digit, labels[idx], label_smoothing=0.1)
                + F.cross_entropy(motion, motions[idx], label_smoothing=0.1))

    return fit(lambda: VideoFeatureNet(config), batch_loss, len(videos), steps, seed, batch_size, lr)


@torch.no_grad()
def video_accuracy(net: VideoFeatureNet, videos: torch.Tensor, labels: torch.Tensor,
                   motions: torch.Tensor) -> tuple[float, float]:
    """(digit accuracy, motion accuracy) of the net's two heads on clips, from one pass of features."""
    digit, motion = net.classify(extract_features(net, videos).float())
    return ((digit.argmax(1) == labels).double().mean().item(), (motion.argmax(1) == motions).double().mean().item())


def build_video_feature_assets(out_dir: str | Path, seed: int = 0, steps: int = 600, batch_size: int = 32,
                               frames: int = 8, canvas: int = 16, n_train: int | None = None,
                               n_heldout: int | None = None) -> dict:
    """Train the net on moving-digits train clips, measure it on held-out clips, and write out_dir/video_featnet,
    out_dir/ref_stats_moving_digits (FVD: features of the training clips) and out_dir/ref_stats_moving_digits_frames
    (per-frame FID: the shipped image feature net on every frame of the training clips).

    The clips are data.moving_digits.load_moving_digits(frames, canvas, split) (all, or the first n_train /
    n_heldout), those the video models train on.
    Measured with 32 x 32 clips of 8 frames: 600 steps on 4000 clips took 290 s (0.5 s a step at batch 32, load
    average 5) and reached 0.81 digit and 0.87 motion accuracy on 500 held-out clips (motion cannot reach 1: in 19%
    of held-out clips the first step does not go the labelled way, the digit starting at an edge and bouncing at
    once); the loss was still falling.
    Returns the measured numbers that also go into video_featnet/MODEL_CARD.md.
    """
    out_dir = Path(out_dir)
    train = load_moving_digits(frames, canvas, "train", n_train)
    held = load_moving_digits(frames, canvas, "heldout", n_heldout)
    t0 = time.perf_counter()
    net, losses = train_video_feature_net(train.videos, train.labels, train.motions, steps=steps, seed=seed,
                                          batch_size=batch_size)
    wall = time.perf_counter() - t0
    net.save_pretrained(out_dir / "video_featnet")
    stats = compute_reference_stats(net, train.videos, dataset="moving_digits", split="train")
    stats.save(out_dir / "ref_stats_moving_digits")
    image_net = default_feature_net()
    frame_stats = compute_reference_stats(image_net, video_frames(train.videos, image_net.config.image_size),
                                          dataset="moving_digits_frames", split="train")
    frame_stats.save(out_dir / "ref_stats_moving_digits_frames")

    static = held.videos[:, :, :1].expand_as(held.videos)  # first frame held: same frames, no motion
    noise = torch.randn(held.videos.shape, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    digit_acc, motion_acc = video_accuracy(net, held.videos, held.labels, held.motions)
    m = {
        "train_wall_s": round(wall, 1),
        "final_train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "heldout_digit_accuracy": digit_acc,
        "heldout_motion_accuracy": motion_acc,
        "fvd_heldout_vs_ref": fid_against_stats(net, held.videos, stats),
        "fvd_heldout_vs_ref_ci95": bootstrap_ci(net, held.videos, stats, seed=seed),
        "fvd_static_vs_ref": fid_against_stats(net, static, stats),
        "fvd_noise_vs_ref": fid_against_stats(net, noise, stats),
        "frame_fid_heldout_vs_ref": per_frame_fid(image_net, held.videos, frame_stats),
        "frame_fid_static_vs_ref": per_frame_fid(image_net, static, frame_stats),
        "fingerprint": net.fingerprint(),
        "image_net_fingerprint": image_net.fingerprint(),
    }
    card = f"""# VideoFeatureNet: the feature network for FVD on moving digits in flexisearch

- Architecture: `{json.dumps(net.config.to_dict())}`, {sum(p.numel() for p in net.parameters())} parameters.
- Data: load_moving_digits({frames}, {canvas}, "train") ({len(train.labels)} clips); held-out: {len(held.labels)} clips of the "heldout" split.
- Training: {steps} steps at batch {batch_size}, AdamW (lr 3e-3, one-cycle), label smoothing 0.1, dropout 0.3, seed {seed}, {m['train_wall_s']} s wall with {torch.get_num_threads()} torch threads.
- Held-out accuracy: digit {digit_acc:.4f}, motion {motion_acc:.4f}.
- Reference statistics: ../ref_stats_moving_digits (this net, the {len(train.labels)} training clips) and ../ref_stats_moving_digits_frames (the shipped image featnet, every frame of them).

Measured ("static": each held-out clip's first frame repeated, real frames without motion; noise: N(0, 1) clamped):

```json
{json.dumps(m, indent=1)}
```
"""
    atomic_write_bytes(out_dir / "video_featnet" / "MODEL_CARD.md", card.encode())
    return m


__all__ = ["build_video_feature_assets", "train_video_feature_net", "video_accuracy"]
