"""Quality metrics a search constrains: FID against reference statistics, FID against the static
native model's own samples on the same seeds (a cheaper, lower-variance proxy), and CLIP score."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .features import DigitFeatureNet
from .metrics import ReferenceStats, bootstrap_ci, compute_reference_stats, fid_against_stats, fid_between

ASSETS = Path(__file__).parent / "assets"


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


def load_feature_net(spec: str | None) -> Any:
    """The FID feature network: a DigitFeatureNet directory (default: the embedded one), or the FID
    Inception-v3 ('fid-inception' downloads its weights when online; or a local .pth/.safetensors)."""
    if spec and (spec == "fid-inception" or Path(spec).suffix in (".pth", ".pt", ".safetensors")):
        from .inception import FIDInceptionV3

        return FIDInceptionV3.from_pretrained(spec)
    return DigitFeatureNet.from_pretrained(spec or ASSETS / "featnet")


def load_metric(cfg: Any, model: Any) -> Any:
    """The metric a search config asks for, with the model's default feature network and statistics."""
    name = cfg.metric.name
    if name == "clip":
        from .text_quality import load_clip_metric

        return load_clip_metric(cfg, model)
    net = load_feature_net(cfg.feature_net).to(next(model.parameters()).device)
    if net.config.image_size is not None and getattr(model, "decode_images", None) is None and (
            net.config.image_size != model.config.input_size or net.config.in_channels != model.config.in_channels):
        raise UserError(f"feature network {cfg.feature_net or 'embedded featnet'} takes {net.config.in_channels}x"
                        f"{net.config.image_size}px images, the model makes {model.config.in_channels}x"
                        f"{model.config.input_size}px; give feature_net and reference_stats for this model")
    if name == "fid_native":
        return FIDMetric(net, None, "fid_native")
    ref = cfg.reference_stats
    if ref and str(ref).endswith(".npz"):
        return FIDMetric(net, ReferenceStats.from_npz(ref, net.fingerprint()))
    if not ref and cfg.feature_net:
        raise UserError(f"metric fid with feature_net {cfg.feature_net}: give reference_stats for it "
                        "(an .npz with mu and sigma, or a directory written by ReferenceStats.save)")
    return FIDMetric(net, ReferenceStats.load(ref or ASSETS / "ref_stats_mnist16"))
