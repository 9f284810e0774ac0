"""The recipe of the embedded video default: pretrain a static class-conditional FlexiVideoDiT on moving digits
(rectified flow, native (1, 2, 2) patches); flexify it with training.dit.train_flexify (data 'moving-digits',
(t, h, w) weak sizes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.moving_digits import load_moving_digits
from ..models.video_dit import FlexiVideoDiT, FlexiVideoDiTConfig
from .loop import pretrain


@dataclass(frozen=True)
class VideoBaseTrainConfig:
    """Pretraining of a static video DiT on the moving-digits train split (data.moving_digits.load_moving_digits)."""

    frames: int = 8
    canvas: int = 16
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    steps: int = 3000
    batch_size: int = 32
    lr: float = 6e-4
    warmup: int = 100
    class_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0
    ckpt_every: int = 200


def train_video_base(config: VideoBaseTrainConfig, out_dir: str | Path) -> FlexiVideoDiT:
    """Rectified-flow pretraining (as training.dit.train_base) of a class-conditional video DiT; writes
    out_dir/model (EMA) and out_dir/raw."""
    clips = load_moving_digits(config.frames, config.canvas, "train")
    torch.manual_seed(config.seed)
    model = FlexiVideoDiT(FlexiVideoDiTConfig(
        input_size=config.canvas, num_frames=config.frames, in_channels=clips.videos.shape[1],
        hidden_size=config.hidden_size, depth=config.depth, num_heads=config.num_heads, num_classes=10,
        learn_sigma=False, prediction="flow"))
    return pretrain("video-pretrain", Path(out_dir), config, model, clips.videos, clips.labels, config.class_dropout)


__all__ = ["VideoBaseTrainConfig", "train_video_base"]
