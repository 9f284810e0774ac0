"""The metric registry: every quality metric a search can constrain, by the name a config gives it.

  fid         FID against reference statistics (the embedded digit net, or the FID Inception + .npz)
  fid_native  FID against the static native model's own samples on the same seeds (cheaper, lower variance)
  clip        CLIP score of text-to-image samples against their prompts (metrics.clip)
  class_accuracy  the feature net's classifier recognises a sample as the class asked for (metrics.accuracy)

A metric has name, higher_is_better, needs_native, score(images, sample_set, target),
score_with_ci(images, sample_set, target, n_boot, seed) and paired_interval(images, others, sample_set,
n_boot, seed): the difference of its values on two sample sets of the same seeds with a paired bootstrap
interval (None where it has none), by which a trial stops early (Evaluator.evaluate). A new metric is one
module in metrics/ and one line in METRICS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UserError
from ..files import CONFIG_NAME, asset_path, read_json
from .accuracy import ClassAccuracyMetric, check_classifier
from .clip import load_clip_metric
from .featnet import DigitFeatureNet
from .fid import (
    ReferenceStats,
    bootstrap_ci,
    compute_reference_stats,
    fid_against_stats,
    fid_between,
    paired_bootstrap_ci,
)
from .inception import FIDInceptionV3
from .video_featnet import VideoFeatureNet


class FIDMetric:
    """FID of generated images in a feature network's space (lower is better)."""

    higher_is_better = False

    def __init__(self, net: Any, stats: ReferenceStats | None, name: str = "fid"):
        self.net, self.stats, self.name = net, stats, name
        self.needs_native = stats is None  # fid_native: compare with the static native samples

    def score(self, images: torch.Tensor, sample_set: Any = None, target: torch.Tensor | None = None) -> float:
        if self.stats is not None:
            return fid_against_stats(self.net, images, self.stats)
        return fid_between(self.net, images, target)

    def score_with_ci(self, images: torch.Tensor, sample_set: Any, target: torch.Tensor | None, n_boot: int,
                      seed: int = 0) -> tuple[float, float, float]:
        """(value, low, high): the FID and a bootstrap 95% interval over the generated samples."""
        value = self.score(images, sample_set, target)
        stats = self.stats if self.stats is not None else compute_reference_stats(self.net, target, "native samples", "")
        low, high = bootstrap_ci(self.net, images, stats, n_boot=n_boot, seed=seed)
        return value, low, high

    def paired_interval(self, images: torch.Tensor, others: torch.Tensor, sample_set: Any, n_boot: int,
                        seed: int = 0) -> tuple[float, float, float] | None:
        """(FID(images) - FID(others), low, high) on the same seeds; None for fid_native, whose value on
        static native's own samples is 0 at every sample count."""
        if self.stats is None:
            return None
        return paired_bootstrap_ci(self.net, images, others, self.stats, n_boot=n_boot, seed=seed)


def load_feature_net(spec: str | None) -> Any:
    """The FID feature network: a DigitFeatureNet or VideoFeatureNet (FVD) directory or embedded:<name> (default:
    the embedded digit net), or the FID Inception-v3 ('fid-inception' downloads its weights when online; or a local
    .pth/.safetensors)."""
    if spec and (spec == "fid-inception" or Path(spec).suffix in (".pth", ".pt", ".safetensors")):
        return FIDInceptionV3.from_pretrained(spec)
    path = asset_path(spec or "embedded:featnet")
    if (path / CONFIG_NAME).is_file() and "frames" in (read_json(path / CONFIG_NAME, "config.json") or {}):
        return VideoFeatureNet.from_pretrained(path)
    return DigitFeatureNet.from_pretrained(path)


def _fid_metric(cfg: Any, model: Any, native: bool) -> FIDMetric:
    """FID with the config's feature network (default: the embedded digit net) and statistics."""
    net = load_feature_net(cfg.feature_net).to(next(model.parameters()).device)
    size, frames = net.config.image_size, getattr(net.config, "frames", None)
    takes = (net.config.in_channels, *((frames,) if frames else ()), size, size)  # one sample, channels first
    if size is not None and getattr(model, "decode_images", None) is None and takes != model.config.sample_shape:
        raise UserError(f"feature network {cfg.feature_net or 'embedded featnet'} takes samples of shape "
                        f"{list(takes)}, the model makes {list(model.config.sample_shape)}; give feature_net and "
                        "reference_stats for this model")
    if native:
        return FIDMetric(net, None, "fid_native")
    ref = cfg.reference_stats
    if ref and str(ref).endswith(".npz"):
        return FIDMetric(net, ReferenceStats.from_npz(ref, net.fingerprint()))
    if not ref and cfg.feature_net:
        raise UserError(f"metric fid with feature_net {cfg.feature_net}: give reference_stats for it "
                        "(an .npz with mu and sigma, or a directory written by ReferenceStats.save)")
    return FIDMetric(net, ReferenceStats.load(asset_path(ref or "embedded:ref_stats_mnist16")))


def _class_accuracy(cfg: Any, model: Any) -> ClassAccuracyMetric:
    """Class accuracy under the config's feature network (default: the embedded digit net, a classifier)."""
    net = load_feature_net(cfg.feature_net).to(next(model.parameters()).device)
    check_classifier(net, model, cfg.feature_net or "embedded featnet")
    return ClassAccuracyMetric(net)


METRICS: dict[str, Callable[[Any, Any], Any]] = {
    "fid": lambda cfg, model: _fid_metric(cfg, model, native=False),
    "fid_native": lambda cfg, model: _fid_metric(cfg, model, native=True),
    "clip": load_clip_metric,
    "class_accuracy": _class_accuracy,
}
HIGHER_IS_BETTER = {"clip", "class_accuracy"}  # known before a metric is loaded: configs are checked with it


def load_metric(name: str, cfg: Any, model: Any) -> Any:
    """The metric called `name` (METRICS) with a search config's feature network and statistics, for this model."""
    return METRICS[name](cfg, model)
