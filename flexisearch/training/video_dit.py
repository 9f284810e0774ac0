"""The recipe of the embedded video default: pretrain a static class-conditional FlexiVideoDiT on moving digits
(rectified flow, native (1, 2, 2) patches); flexify it with training.dit.train_flexify (data 'moving-digits',
(t, h, w) weak sizes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.moving_digits import load_moving_digits
from ..errors import UserError
from ..models.video_dit import FlexiVideoDiT, FlexiVideoDiTConfig
from .dit import BaseTrainConfig
from .loop import pretrain


@dataclass(frozen=True)
class VideoBaseTrainConfig(BaseTrainConfig):
    """BaseTrainConfig for a video DiT on the moving-digits train split (data.moving_digits.load_moving_digits):
    clips of `frames` frames of image_size x image_size, native patches (1, patch_size, patch_size)."""

    data: str = "moving-digits"
    frames: int = 8
    depth: int = 4
    steps: int = 2600  # 57 min at 0.76 steps/s on the 2 cores: the 60-minute budget
    batch_size: int = 32


def train_video_base(config: VideoBaseTrainConfig, out_dir: str | Path) -> FlexiVideoDiT:
    """Rectified-flow pretraining (as training.dit.train_base) of a class-conditional video DiT; writes
    out_dir/model (EMA) and out_dir/raw."""
    if config.data != "moving-digits":
        raise UserError(f"video-base config: field 'data' is {config.data!r}, expected 'moving-digits'")
    clips = load_moving_digits(config.frames, config.image_size, "train")
    torch.manual_seed(config.seed)
    model = FlexiVideoDiT(FlexiVideoDiTConfig(
        input_size=config.image_size, num_frames=config.frames, in_channels=clips.videos.shape[1],
        hidden_size=config.hidden_size, depth=config.depth, num_heads=config.num_heads,
        patch_size=(1, config.patch_size, config.patch_size), num_classes=10, learn_sigma=False, prediction="flow"))
    return pretrain("video-pretrain", Path(out_dir), config, model, clips.videos, clips.labels, config.class_dropout)


__all__ = ["VideoBaseTrainConfig", "train_video_base"]
