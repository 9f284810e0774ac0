"""DigitFeatureNet: a small CNN digit classifier whose 64-d penultimate layer stands in for Inception.

No Inception weights exist offline, so FID here is measured in the feature space of this net,
trained on the MNIST-5k training split (training.featnet builds the shipped assets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..files import ASSETS, Pretrained, fingerprint
from ..validate import ConfigMixin

DEFAULT_FEATNET_DIR = ASSETS / "featnet"


@dataclass(frozen=True)
class FeatureNetConfig(ConfigMixin):
    """Everything needed to rebuild a DigitFeatureNet; stored as config.json beside the weights."""

    complete = True

    image_size: int = 16
    in_channels: int = 1
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64, 64)
    feature_dim: int = 64

    def check(self, source: str = "config") -> None:
        for name in ("image_size", "in_channels", "num_classes", "feature_dim"):
            if getattr(self, name) <= 0:
                raise UserError(f"{source}: key '{name}' has {getattr(self, name)!r}, expected a positive int")
        if len(self.widths) != 4:
            raise UserError(f"{source}: key 'widths' has {list(self.widths)!r}, expected 4 positive ints")
        if self.image_size % 4:
            raise UserError(f"{source}: key 'image_size' has {self.image_size}, expected a multiple of 4")


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitFeatureNet(Pretrained, nn.Module):
    """conv-pool-conv-conv-pool-conv, 2x2 average pool, dropout, linear 64-d features, ReLU, linear classifier.

    Features are taken before the ReLU so no unit is dead on a whole set: covariances stay full rank.
    Works at any image size divisible by 4 (16 for MNIST, 8 for sklearn digits).
    """

    config_class = FeatureNetConfig
    feature_batch_size = 1000  # images per forward when computing FID features

    def __init__(self, config: FeatureNetConfig | None = None):
        super().__init__()
        self.config = config = config or FeatureNetConfig()
        w1, w2, w3, w4 = config.widths
        self.body = nn.Sequential(
            _conv(config.in_channels, w1), nn.MaxPool2d(2),
            _conv(w1, w2), _conv(w2, w3), nn.MaxPool2d(2),
            _conv(w3, w4), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.3),
        )
        self.feature = nn.Linear(4 * w4, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    @property
    def num_features(self) -> int:
        return self.config.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) images in [-1, 1] -> (N, feature_dim) features."""
        c, s = self.config.in_channels, self.config.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise UserError(f"feature net expects images of shape (N, {c}, {s}, {s}), got {tuple(x.shape)}")
        return self.feature(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))

    # ---- weights in and out -------------------------------------------------------------
    def fingerprint(self) -> str:
        """Short content hash of config and weights: reference statistics record the net they belong to."""
        return fingerprint(self.config.to_dict(), self.state_dict())


def default_feature_net() -> DigitFeatureNet:
    """The shipped net trained on 16x16 MNIST-5k (flexisearch/assets/featnet)."""
    return DigitFeatureNet.from_pretrained(DEFAULT_FEATNET_DIR)


__all__ = ["DigitFeatureNet", "FeatureNetConfig", "default_feature_net"]
