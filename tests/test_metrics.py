"""Feature net, shipped assets, reference statistics, FID and its bootstrap interval."""

import json
import shutil

import numpy as np
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from flexisearch.data.images import load_digits8, load_mnist
from flexisearch.errors import UserError
from flexisearch.metrics.accuracy import ClassAccuracyMetric, classifier_accuracy, correct, mean_ci
from flexisearch.metrics.featnet import (
    DEFAULT_FEATNET_DIR,
    DigitFeatureNet,
    FeatureNetConfig,
    default_feature_net,
)
from flexisearch.metrics.fid import (
    DEFAULT_REF_STATS_DIR,
    FeatureExtractor,
    ReferenceStats,
    bootstrap_ci,
    compute_reference_stats,
    default_reference_stats,
    extract_features,
    fid_against_stats,
    fid_between,
    frechet_distance_np,
    paired_bootstrap_ci,
)
from flexisearch.training.featnet import train_feature_net

# From the numbers measured when the assets were built (featnet/MODEL_CARD.md), with margin: real-vs-real
# 0.41 (held-out vs reference) and 0.45 (train halves), digits 0-4 only 52.7, Gaussian noise 405.
REAL_FID_MAX = 2.0
NOISE_FID_MIN = 150.0


# Tiny convolutions: on a shared 2-core machine OpenMP oversubscription made 40 training steps take 44 s instead
# of 2 s (measured), so the module runs on one thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net():
    return default_feature_net()


@pytest.fixture(scope="module")
def stats():
    return default_reference_stats()


@pytest.fixture(scope="module")
def train():
    return load_mnist(16, "train")


@pytest.fixture(scope="module")
def heldout():
    return load_mnist(16, "heldout")


def _noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


def test_shipped_assets_match_their_meta(net, stats):
    meta = json.loads((DEFAULT_REF_STATS_DIR / "meta.json").read_text())
    assert meta["fingerprint"] == stats.fingerprint == net.fingerprint()
    assert (meta["dataset"], meta["split"], meta["n"], meta["image_size"]) == ("mnist", "train", 4000, 16)
    assert net.num_features == meta["feature_dim"] == 64
    assert stats.mu.shape == (64,) and stats.cov.shape == (64, 64)
    assert torch.allclose(stats.cov, stats.cov.T) and torch.linalg.eigvalsh(stats.cov).min() > 0
    assert sum(p.numel() for p in net.parameters()) <= 100_000
    size = sum(f.stat().st_size for d in (DEFAULT_FEATNET_DIR, DEFAULT_REF_STATS_DIR) for f in d.iterdir())
    assert size < 1_000_000


def test_shipped_stats_are_those_of_the_training_images(net, stats, train):
    fresh = compute_reference_stats(net, train[0])
    assert torch.allclose(fresh.mu, stats.mu, atol=1e-5) and torch.allclose(fresh.cov, stats.cov, atol=1e-4)


def test_shipped_net_heldout_accuracy(net, heldout):
    assert classifier_accuracy(net, *heldout) >= 0.98


def test_fid_real_is_low_noise_is_high_and_a_degraded_set_is_between(net, stats, train, heldout):
    x = train[0]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    floor = fid_against_stats(net, heldout[0], stats)
    halves = fid_between(net, x[perm[:2000]], x[perm[2000:]])
    noise = fid_against_stats(net, _noise(1000), stats)
    # Held-out digits 0-4 only: a generator that dropped half the classes must fail the "real" threshold
    # and pass the noise one, so neither threshold is vacuous.
    hx, hy = heldout
    dropped = fid_against_stats(net, torch.cat([hx[hy < 5], hx[hy < 5]]), stats)
    assert floor < REAL_FID_MAX and halves < REAL_FID_MAX
    assert noise > NOISE_FID_MIN
    assert REAL_FID_MAX < dropped < NOISE_FID_MIN


@pytest.mark.parametrize("kind", ["heldout", "noise", "between"])
def test_torchmetrics_fid_matches_scipy(net, stats, heldout, kind):
    images = _noise(500) if kind == "noise" else heldout[0]
    feats = extract_features(net, images).numpy()
    mu, cov = feats.mean(0), np.cov(feats, rowvar=False)
    if kind == "between":
        other = extract_features(net, _noise(300, seed=1)).numpy()
        ours = fid_between(net, _noise(300, seed=1), images)
        ref = frechet_distance_np(mu, cov, other.mean(0), np.cov(other, rowvar=False))
    else:
        ours = fid_against_stats(net, images, stats)
        ref = frechet_distance_np(mu, cov, stats.mu.numpy(), stats.cov.numpy())
    assert abs(ours - ref) <= 1e-3 * abs(ref)


def test_feature_extractor_plugs_into_torchmetrics_and_stays_in_eval(net, heldout):
    fid = FrechetInceptionDistance(feature=FeatureExtractor(net), normalize=True)
    running_mean = net.body[0][1].running_mean.clone()
    fid.train()
    fid.update(heldout[0][:500], real=True)
    fid.update(heldout[0][500:], real=False)
    assert not net.training and torch.equal(net.body[0][1].running_mean, running_mean)
    assert fid.compute().dtype == torch.float64


def test_bootstrap_ci_contains_point_and_widens_with_fewer_samples(net, stats, heldout):
    x = heldout[0]  # class-sorted: subsets must be random, or they miss whole classes
    low, high = bootstrap_ci(net, x, stats, n_boot=200)
    assert 0 <= low < fid_against_stats(net, x, stats) < high
    small = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:250]]
    low_s, high_s = bootstrap_ci(net, small, stats, n_boot=200)
    assert 0 <= low_s < fid_against_stats(net, small, stats) < high_s
    assert high_s - low_s > 1.5 * (high - low)
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # a worse "generator": interval away from 0 and real FIDs
    low_b, high_b = bootstrap_ci(net, blurred, stats, n_boot=200)
    assert REAL_FID_MAX < low_b < fid_against_stats(net, blurred, stats) < high_b


def test_paired_fid_difference_resamples_the_same_rows_of_both_sets(net, stats, heldout):
    """The paired interval of FID(a) - FID(b), written out with scipy's sqrtm (frechet_distance_np): the same
    resampled rows of both sets, percentiles shifted by the resamples' mean minus the point difference."""
    x = heldout[0][torch.randperm(len(heldout[0]), generator=torch.Generator().manual_seed(0))[:300]]
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # the same "seeds", a worse generator
    diff, low, high = paired_bootstrap_ci(net, blurred, x, stats, n_boot=30, seed=3)
    assert diff == pytest.approx(fid_against_stats(net, blurred, stats) - fid_against_stats(net, x, stats), rel=1e-6)
    fa, fb = extract_features(net, blurred).numpy(), extract_features(net, x).numpy()
    mu, cov = stats.mu.numpy(), stats.cov.numpy()

    def fid(f: np.ndarray) -> float:
        return frechet_distance_np(f.mean(0), np.cov(f, rowvar=False), mu, cov)

    rng = np.random.default_rng(3)
    boot = np.array([fid(fa[i]) - fid(fb[i]) for i in (rng.integers(0, 300, 300) for _ in range(30))])
    want = np.quantile(boot, [0.025, 0.975]) - (boot.mean() - (fid(fa) - fid(fb)))
    assert (low, high) == pytest.approx(tuple(want), rel=1e-6)
    assert REAL_FID_MAX < low < diff < high
    # pairing: the interval of the difference is narrower than the two sets' own intervals side by side
    (la, ha), (lb, hb) = bootstrap_ci(net, blurred, stats, n_boot=30, seed=3), bootstrap_ci(net, x, stats, n_boot=30, seed=3)
    assert high - low < (ha - la) + (hb - lb)
    assert paired_bootstrap_ci(net, x, x, stats, n_boot=10) == (0.0, 0.0, 0.0)


def test_paired_accuracy_difference_is_the_mean_of_per_sample_differences(net, heldout):
    x, y = heldout[0][:400], heldout[1][:400]
    noisy = x + 1.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    sample_set = type("S", (), {"labels": tuple(y.tolist())})()
    metric = ClassAccuracyMetric(net)
    diff, low, high = metric.paired_interval(noisy, x, sample_set, n_boot=200)
    assert diff == pytest.approx(classifier_accuracy(net, noisy, y) - classifier_accuracy(net, x, y), abs=1e-12)
    assert low < diff < high < 0
    per_sample = correct(net, noisy, y).double() - correct(net, x, y).double()  # not two independent means
    assert (low, high) == mean_ci(per_sample, 200)


def test_fid_refuses_stats_of_another_net(stats, heldout):
    torch.manual_seed(0)
    with pytest.raises(UserError, match="feature net"):
        fid_against_stats(DigitFeatureNet().eval(), heldout[0], stats)


def test_wrong_image_size_is_a_user_error(net):
    with pytest.raises(UserError, match=r"\(N, 1, 16, 16\)"):
        extract_features(net, torch.zeros(4, 1, 8, 8))


def _one_line_error(fn, *match):
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(m in msg for m in match), msg


def test_corrupt_or_missing_assets_are_user_errors(tmp_path):
    net_dir, stats_dir = tmp_path / "featnet", tmp_path / "stats"
    shutil.copytree(DEFAULT_FEATNET_DIR, net_dir)
    shutil.copytree(DEFAULT_REF_STATS_DIR, stats_dir)
    assert DigitFeatureNet.from_pretrained(net_dir).fingerprint() == ReferenceStats.load(stats_dir).fingerprint

    cfg = json.loads((net_dir / "config.json").read_text())
    (net_dir / "config.json").write_text(json.dumps({**cfg, "depth": 3}))
    _one_line_error(lambda: DigitFeatureNet.from_pretrained(net_dir), "config.json", "depth")
    (net_dir / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "widths"}))
    _one_line_error(lambda: DigitFeatureNet.from_pretrained(net_dir), "config.json", "widths")
    (net_dir / "config.json").write_text("{not json")
    _one_line_error(lambda: DigitFeatureNet.from_pretrained(net_dir), "config.json")
    (net_dir / "config.json").write_text(json.dumps({**cfg, "feature_dim": 32}))
    _one_line_error(lambda: DigitFeatureNet.from_pretrained(net_dir), "model.safetensors", "'feature.")
    (net_dir / "config.json").write_text(json.dumps(cfg))
    (net_dir / "model.safetensors").write_bytes((net_dir / "model.safetensors").read_bytes()[:-100])
    _one_line_error(lambda: DigitFeatureNet.from_pretrained(net_dir), "model.safetensors")
    (net_dir / "model.safetensors").unlink()
    _one_line_error(lambda: DigitFeatureNet.from_pretrained(net_dir), "model.safetensors", "not found")
    _one_line_error(lambda: DigitFeatureNet.from_pretrained(tmp_path / "nowhere"), "nowhere")

    meta = json.loads((stats_dir / "meta.json").read_text())
    (stats_dir / "meta.json").write_text(json.dumps({**meta, "extra": 1}))
    _one_line_error(lambda: ReferenceStats.load(stats_dir), "meta.json", "extra")
    (stats_dir / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "n"}))
    _one_line_error(lambda: ReferenceStats.load(stats_dir), "meta.json", "'n'")
    (stats_dir / "meta.json").write_text(json.dumps({**meta, "feature_dim": 32}))
    _one_line_error(lambda: ReferenceStats.load(stats_dir), "stats.safetensors", "mu")
    (stats_dir / "meta.json").unlink()
    _one_line_error(lambda: ReferenceStats.load(stats_dir), "meta.json", "not found")
    (stats_dir / "meta.json").write_text(json.dumps(meta))
    (stats_dir / "stats.safetensors").write_bytes(b"\x00" * 64)
    _one_line_error(lambda: ReferenceStats.load(stats_dir), "stats.safetensors")


def test_training_lowers_loss_on_8x8_digits_and_is_reproducible(tmp_path):
    x, y = load_digits8(8, "train")
    net, losses = train_feature_net(x, y, steps=40, seed=0, batch_size=64)
    assert net.config == FeatureNetConfig(image_size=8)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    again, _ = train_feature_net(x, y, steps=40, seed=0, batch_size=64)
    assert again.fingerprint() == net.fingerprint()
    held_x, held_y = load_digits8(8, "heldout")
    assert classifier_accuracy(net, held_x, held_y) > 0.5
    net.save_pretrained(tmp_path / "net8")
    loaded = DigitFeatureNet.from_pretrained(tmp_path / "net8")
    assert loaded.fingerprint() == net.fingerprint()
    assert torch.equal(extract_features(loaded, held_x), extract_features(net, held_x))
    assert extract_features(net, held_x).shape == (len(held_x), 64)


def test_reference_stats_round_trip(tmp_path, net, heldout):
    s = compute_reference_stats(net, heldout[0], split="heldout")
    s.save(tmp_path / "s")
    loaded = ReferenceStats.load(tmp_path / "s")
    assert loaded.meta() == s.meta() and torch.equal(loaded.mu, s.mu) and torch.equal(loaded.cov, s.cov)
    assert fid_against_stats(net, heldout[0], loaded) == pytest.approx(0.0, abs=1e-6)
