"""VideoFeatureNet: a small 3-D CNN on moving-digit clips whose penultimate layer gives the Fréchet video distance.

FVD is FID in the feature space of a network that sees whole clips: this net, trained to tell a clip's digit and its
motion (training.video_featnet), so its features respond to appearance and to movement. It satisfies fid.py's
FeatureNet protocol for (N, C, T, H, W) clips, so fid_against_stats, compute_reference_stats and bootstrap_ci give
FVD unchanged. per_frame_fid is the complement: FID of every frame as an image under an image feature net, which
sees the frames but not their order or movement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.images import resize_images
from ..errors import UserError
from ..files import Pretrained, fingerprint
from ..validate import ConfigMixin
from .fid import FeatureNet, ReferenceStats, fid_against_stats


@dataclass(frozen=True)
class VideoFeatureNetConfig(ConfigMixin):
    """Everything needed to rebuild a VideoFeatureNet; stored as config.json beside the weights."""

    complete = True

    frames: int = 8
    image_size: int = 32
    in_channels: int = 1
    num_classes: int = 10
    num_motions: int = 4
    widths: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 64

    def check(self, source: str = "config") -> None:
        for name in ("frames", "image_size", "in_channels", "num_classes", "num_motions", "feature_dim"):
            if getattr(self, name) <= 0:
                raise UserError(f"{source}: key '{name}' has {getattr(self, name)!r}, expected a positive int")
        if len(self.widths) != 3 or min(self.widths) <= 0:
            raise UserError(f"{source}: key 'widths' has {list(self.widths)!r}, expected 3 positive ints")
        if self.image_size % 4:
            raise UserError(f"{source}: key 'image_size' has {self.image_size}, expected a multiple of 4")
        if self.frames < 2:
            raise UserError(f"{source}: key 'frames' has {self.frames}, expected at least 2 (motion needs two frames)")


def _conv3d(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout), nn.ReLU())


class VideoFeatureNet(Pretrained, nn.Module):
    """conv-pool(space)-conv-pool(time, space)-conv (3x3x3), (2, 2, 2) average pool, dropout, linear features; ReLU,
    then a digit-class head and a motion-class head.

    GroupNorm, not BatchNorm: features do not depend on batch statistics, so they are the same in training and eval
    mode but for dropout. The first convolution has no norm: normalising each clip there would make the features
    blind to its brightness (a grey background would cost no FVD). Pooling keeps an early and a late half in time:
    a clip's motion class is its starting direction, which a bounce reverses mid-clip. As in DigitFeatureNet,
    features are taken before the ReLU so no unit is dead on a whole set and covariances stay full rank.
    """

    config_class = VideoFeatureNetConfig
    feature_batch_size = 256  # clips per forward when computing FVD features

    def __init__(self, config: VideoFeatureNetConfig | None = None):
        super().__init__()
        self.config = config = config or VideoFeatureNetConfig()
        w1, w2, w3 = config.widths
        self.body = nn.Sequential(
            nn.Conv3d(config.in_channels, w1, 3, padding=1), nn.ReLU(), nn.MaxPool3d((1, 2, 2)),
            _conv3d(w1, w2), nn.MaxPool3d(2),
            _conv3d(w2, w3), nn.AdaptiveAvgPool3d(2), nn.Flatten(), nn.Dropout(0.3),
        )
        self.feature = nn.Linear(8 * w3, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        self.motion_head = nn.Linear(config.feature_dim, config.num_motions)

    @property
    def num_features(self) -> int:
        return self.config.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, S, S) clips in [-1, 1] -> (N, feature_dim) features."""
        c, t, s = self.config.in_channels, self.config.frames, self.config.image_size
        if x.dim() != 5 or tuple(x.shape[1:]) != (c, t, s, s):
            raise UserError(f"video feature net expects clips of shape (N, {c}, {t}, {s}, {s}), got {tuple(x.shape)}")
        return self.feature(self.body(x))

    def classify(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features -> (digit-class logits, motion-class logits)."""
        h = F.relu(features)
        return self.head(h), self.motion_head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Digit-class logits: the classifier accuracy.classifier_accuracy and class_accuracy use."""
        return self.classify(self.features(x))[0]

    def fingerprint(self) -> str:
        """Short content hash of config and weights: reference statistics record the net they belong to."""
        return fingerprint(self.config.to_dict(), self.state_dict())


def video_frames(videos: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """(N, C, T, H, W) clips -> (N*T, C, size, size) frames, clip by clip, resized as the image data are
    (data.images) when size is given and differs; for per-frame reference statistics and per_frame_fid."""
    if videos.dim() != 5:
        raise UserError(f"expected clips of shape (N, C, T, H, W), got {tuple(videos.shape)}")
    frames = videos.transpose(1, 2).flatten(0, 1)
    return frames if size is None else resize_images(frames, size)


def per_frame_fid(net: FeatureNet, videos: torch.Tensor, stats: ReferenceStats) -> float:
    """FID of every frame of the clips as an image, under an image feature net (resized to its config.image_size
    where it has one), against per-frame reference statistics made with the same net."""
    return fid_against_stats(net, video_frames(videos, getattr(net.config, "image_size", None)), stats)


__all__ = ["VideoFeatureNet", "VideoFeatureNetConfig", "per_frame_fid", "video_frames"]
