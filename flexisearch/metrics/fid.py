"""FID in a feature network's space, through torchmetrics' FrechetInceptionDistance.

The feature network is the shipped DigitFeatureNet for the embedded models, or the FID Inception-v3
(flexisearch.inception) for ImageNet-scale models with the usual .npz statistics.

Reference statistics of the real images (mean, covariance, n) are computed once and shipped; FID of
generated samples loads them into the metric's float64 states. An independent numpy/scipy Frechet
distance cross-checks torchmetrics, and a bootstrap gives a confidence interval for a sample set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.linalg
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from ..errors import UserError
from ..files import ASSETS, atomic_write_json, load_weights, read_json, save_weights
from ..validate import read_dataclass

STATS_NAME = "stats.safetensors"
META_NAME = "meta.json"
DEFAULT_REF_STATS_DIR = ASSETS / "ref_stats_mnist16"


class FeatureNet(Protocol):
    """What FID needs of a feature network (DigitFeatureNet, inception.FIDInceptionV3)."""

    config: Any  # .feature_dim
    feature_batch_size: int  # images per forward

    def features(self, x: torch.Tensor) -> torch.Tensor: ...
    def fingerprint(self) -> str: ...


class FeatureExtractor(nn.Module):
    """Lets FrechetInceptionDistance(feature=FeatureExtractor(net)) use a FeatureNet.

    For a custom module torchmetrics 1.9 passes the images given to update() straight to it (its
    `normalize` flag only rescales images for the built-in Inception), so they stay float in [-1, 1].
    Features are returned as float64: compute() casts the FID to the feature dtype.
    """

    def __init__(self, net: FeatureNet):
        super().__init__()
        self.net = net.eval()
        self.num_features = net.config.feature_dim

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)  # never leave eval mode: BatchNorm must not update on generated images

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x.float()).double()


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def extract_features(net: FeatureNet, images: torch.Tensor) -> torch.Tensor:
    """(N, C, S, S) images in [-1, 1] on any device -> (N, feature_dim) float64 features on the CPU (net in eval mode)."""
    net.eval()
    device = _device(net)
    return torch.cat([net.features(chunk.to(device, torch.float32)).double().cpu() for chunk in images.split(net.feature_batch_size)])


@dataclass(frozen=True)
class _StatsMeta:
    """meta.json beside the statistics: which net and data they came from."""

    fingerprint: str
    dataset: str
    split: str
    image_size: int
    n: int
    feature_dim: int


@dataclass
class ReferenceStats:
    """Mean and (unbiased) covariance of real-image features, and which net and data they came from."""

    mu: torch.Tensor  # (d,) float64
    cov: torch.Tensor  # (d, d) float64
    n: int
    fingerprint: str  # FeatureNet.fingerprint() of the net that made the features
    dataset: str
    split: str
    image_size: int

    def meta(self) -> dict:
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("mu", "cov")}
        return {**meta, "feature_dim": self.mu.shape[0]}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        save_weights(directory / STATS_NAME, {"mu": self.mu, "cov": self.cov})
        atomic_write_json(directory / META_NAME, self.meta())

    @classmethod
    def from_npz(cls, path: str | Path, fingerprint: str) -> ReferenceStats:
        """Statistics in the .npz layout of pytorch-fid and guided-diffusion (`mu`, `sigma`, e.g.
        VIRTUAL_imagenet256_labeled.npz), for the feature net whose fingerprint is given: the file
        cannot say which net made it, so it must come from the same (FID Inception) network."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: reference statistics file not found")
        try:
            data = np.load(path, allow_pickle=False)
            arrays = {k: data[k] for k in data.files}
        except Exception as e:  # not a zip, a pickled array, truncated: all one line
            raise UserError(f"{path}: not a readable .npz file ({str(e).splitlines()[0]})") from None
        for key in ("mu", "sigma"):
            if key not in arrays:
                raise UserError(f"{path}: array '{key}' missing (has {sorted(arrays)})")
        mu, sigma = arrays["mu"], arrays["sigma"]
        d = mu.shape[0] if mu.ndim == 1 else -1
        if d < 1 or sigma.shape != (d, d) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise UserError(f"{path}: arrays 'mu' {mu.shape} and 'sigma' {sigma.shape}, expected finite (d,) and (d, d)")
        n = int(arrays["n"]) if "n" in arrays else 0  # 0: not recorded (FID needs only mean and covariance)
        return cls(mu=torch.from_numpy(mu.astype(np.float64)), cov=torch.from_numpy(sigma.astype(np.float64)), n=n,
                   fingerprint=fingerprint, dataset=path.name, split="npz", image_size=0)

    @classmethod
    def load(cls, directory: str | Path) -> ReferenceStats:
        """Load and validate; every problem is a one-line UserError naming the file and field."""
        directory = Path(directory)
        meta_path, stats_path = directory / META_NAME, directory / STATS_NAME
        meta = dataclasses.asdict(read_dataclass(_StatsMeta, read_json(meta_path, META_NAME), str(meta_path)))
        if meta["n"] < 2:
            raise UserError(f"{meta_path}: key 'n' has {meta['n']}, expected at least 2")
        if not stats_path.is_file():
            raise UserError(f"{stats_path}: statistics file not found")
        tensors = load_weights(stats_path)
        d = meta["feature_dim"]
        for key, shape in (("mu", (d,)), ("cov", (d, d))):
            if key not in tensors:
                raise UserError(f"{stats_path}: tensor '{key}' missing")
            t = tensors[key]
            if tuple(t.shape) != shape or t.dtype != torch.float64 or not torch.isfinite(t).all():
                raise UserError(f"{stats_path}: tensor '{key}' has shape {tuple(t.shape)} {t.dtype}, expected finite float64 {shape}")
        return cls(mu=tensors["mu"], cov=tensors["cov"], **{k: v for k, v in meta.items() if k != "feature_dim"})


def compute_reference_stats(net: FeatureNet, images: torch.Tensor, dataset: str = "mnist", split: str = "train") -> ReferenceStats:
    """Feature mean and covariance of real images, tagged with the net's fingerprint."""
    if len(images) < 2:
        raise UserError(f"reference statistics need at least 2 images, got {len(images)}")
    feats = extract_features(net, images)
    return ReferenceStats(mu=feats.mean(0), cov=torch.cov(feats.T), n=len(feats), fingerprint=net.fingerprint(),
                          dataset=dataset, split=split, image_size=int(images.shape[-1]))


def default_reference_stats() -> ReferenceStats:
    """The shipped statistics of the 4000 16x16 MNIST-5k training images (flexisearch/assets/ref_stats_mnist16)."""
    return ReferenceStats.load(DEFAULT_REF_STATS_DIR)


def _fid_metric(net: FeatureNet) -> FrechetInceptionDistance:
    """A torchmetrics FID on the net's device; callers move images there too."""
    return FrechetInceptionDistance(feature=FeatureExtractor(net), reset_real_features=False, normalize=True).to(_device(net))


def _check_count(images: torch.Tensor) -> None:
    if len(images) < 2:
        raise UserError(f"FID needs at least 2 images, got {len(images)}")


def _check_stats(net: FeatureNet, stats: ReferenceStats) -> None:
    fp = net.fingerprint()
    if stats.fingerprint != fp:
        raise UserError(f"reference statistics were made with feature net {stats.fingerprint}, this net is {fp}")


def fid_against_stats(net: FeatureNet, images: torch.Tensor, stats: ReferenceStats) -> float:
    """torchmetrics FID of images against stored reference statistics (loaded as the metric's real-feature sums)."""
    _check_stats(net, stats)
    _check_count(images)
    fid = _fid_metric(net)
    device = _device(net)
    mu, cov = stats.mu.to(device), stats.cov.to(device)
    n = max(stats.n, 2)  # any count rebuilds the same mean and covariance; .npz statistics may not record it
    fid.real_features_sum = mu * n
    fid.real_features_cov_sum = cov * (n - 1) + n * torch.outer(mu, mu)
    fid.real_features_num_samples = torch.tensor(n, device=device)
    for chunk in images.split(net.feature_batch_size):
        fid.update(chunk.to(device), real=False)
    return float(fid.compute())


def fid_between(net: FeatureNet, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """torchmetrics FID between two image sets, e.g. samples of a schedule vs the static native model's samples."""
    _check_count(images_a)
    _check_count(images_b)
    fid = _fid_metric(net)
    device = _device(net)
    for chunk in images_a.split(net.feature_batch_size):
        fid.update(chunk.to(device), real=True)
    for chunk in images_b.split(net.feature_batch_size):
        fid.update(chunk.to(device), real=False)
    return float(fid.compute())


def frechet_distance_np(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet distance of two Gaussians with scipy's sqrtm (as pytorch-fid does): an independent cross-check."""
    mu1, cov1, mu2, cov2 = (np.asarray(a, dtype=np.float64) for a in (mu1, cov1, mu2, cov2))
    covmean = np.real(scipy.linalg.sqrtm(cov1 @ cov2))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def _sqrt_psd(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _bootstrap_fids(feats: np.ndarray, stats: ReferenceStats, draws: list[np.ndarray]) -> np.ndarray:
    """FID against the statistics of each resample (row indices) of the features.

    A fast Frechet distance: tr sqrtm(C R) = sum sqrt(eig(R^1/2 C R^1/2)), symmetric, so eigvalsh; one
    d x d covariance at a time (Inception features are 2048-d)."""
    ref_mu, ref_cov = stats.mu.numpy(), stats.cov.numpy()
    ref_sqrt = _sqrt_psd(ref_cov)
    fids = []
    for idx in draws:
        mu, cov = feats[idx].mean(0), np.cov(feats[idx], rowvar=False)
        eig = np.linalg.eigvalsh(ref_sqrt @ cov @ ref_sqrt)
        fids.append(((mu - ref_mu) ** 2).sum() + np.trace(cov) + np.trace(ref_cov) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())
    return np.array(fids)


def _draws(n: int, n_boot: int, seed: int) -> list[np.ndarray]:
    """The set itself, then n_boot resamples with replacement."""
    rng = np.random.default_rng(seed)
    return [np.arange(n)] + [rng.integers(0, n, n) for _ in range(n_boot)]


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of values[1:] (resamples) shifted by their bootstrap bias: resampling with
    replacement duplicates samples and adds the finite-sample FID bias a second time, so the raw percentiles
    sit above the point estimate values[0]; they are shifted down by the mean of the resamples minus it."""
    point, boot = values[0], values[1:]
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]) - (boot.mean() - point)
    return float(low), float(high)


def bootstrap_ci(net: FeatureNet, images: torch.Tensor, stats: ReferenceStats, n_boot: int = 200,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Bootstrap confidence interval (low, high) for the FID of a fixed sample set against reference stats.

    Features are computed once; each resample (with replacement) recomputes mean and covariance. The
    percentiles are shifted by the bootstrap bias (_percentile_interval) and the low end is clipped at 0
    (FID >= 0). The interval is for the FID at this sample count, i.e. what a fresh set of as many samples
    would score, not for the infinite-sample FID.
    """
    _check_stats(net, stats)
    _check_count(images)
    feats = extract_features(net, images).numpy()
    low, high = _percentile_interval(_bootstrap_fids(feats, stats, _draws(len(feats), n_boot, seed)), level)
    return max(low, 0.0), high


def paired_bootstrap_ci(net: FeatureNet, images: torch.Tensor, others: torch.Tensor, stats: ReferenceStats,
                        n_boot: int = 200, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(difference, low, high): FID(images) - FID(others) against the same statistics, with a bootstrap interval
    that resamples the same rows of both sets: for samples of two schedules on the same seeds (common random
    numbers), which share most of their sampling noise and their finite-sample bias."""
    _check_stats(net, stats)
    _check_count(images)
    if len(images) != len(others):
        raise ValueError(f"paired FID needs as many images in both sets, got {len(images)} and {len(others)}")
    draws = _draws(len(images), n_boot, seed)
    diff = (_bootstrap_fids(extract_features(net, images).numpy(), stats, draws)
            - _bootstrap_fids(extract_features(net, others).numpy(), stats, draws))
    return (float(diff[0]), *_percentile_interval(diff, level))


__all__ = [
    "FeatureExtractor", "ReferenceStats", "bootstrap_ci", "compute_reference_stats",
    "default_reference_stats", "extract_features", "fid_against_stats", "fid_between", "frechet_distance_np",
    "paired_bootstrap_ci",
]
