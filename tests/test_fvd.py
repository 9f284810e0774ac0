"""The video feature net and FVD through fid.py's machinery, per-frame FID, and training on moving digits.

Tiny nets on 4-frame 16x16 clips of 8x8 digits: checks of the plumbing against independent computations, not of
the shipped quality."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flexisearch.data.moving_digits import load_moving_digits, moving_digits
from flexisearch.errors import UserError
from flexisearch.metrics.accuracy import classifier_accuracy
from flexisearch.metrics.featnet import (
    DigitFeatureNet,
    FeatureNetConfig,
    default_feature_net,
)
from flexisearch.metrics.fid import (
    FeatureExtractor,
    ReferenceStats,
    bootstrap_ci,
    compute_reference_stats,
    fid_against_stats,
    frechet_distance_np,
)
from flexisearch.metrics.video_featnet import (
    VideoFeatureNet,
    VideoFeatureNetConfig,
    per_frame_fid,
    video_frames,
)
from flexisearch.training.video_featnet import (
    build_video_feature_assets,
    train_video_feature_net,
    video_accuracy,
)

SHAPE = {"frames": 4, "canvas": 16, "digit_size": 8}
CONFIG = VideoFeatureNetConfig(frames=4, image_size=16, widths=(8, 16, 16), feature_dim=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (conftest.one_thread)


@pytest.fixture(scope="module")
def train():
    return moving_digits(400, "train", seed=0, **SHAPE)


@pytest.fixture(scope="module")
def held():
    return moving_digits(200, "heldout", seed=0, **SHAPE)


@pytest.fixture(scope="module")
def trained(train):
    return train_video_feature_net(train.videos, train.labels, train.motions, steps=60, seed=0, batch_size=32,
                                   lr=1e-2, config=CONFIG)


def _stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(0), np.cov(feats, rowvar=False)


def test_fvd_equals_scipy_on_the_nets_own_features(trained, train, held):
    net = trained[0]
    stats = compute_reference_stats(net, train.videos, dataset="moving_digits")
    with torch.no_grad():  # features straight from the net, not through fid.extract_features
        ref, ours = net.features(train.videos).double().numpy(), net.features(held.videos).double().numpy()
    assert np.allclose(stats.mu.numpy(), ref.mean(0)) and np.allclose(stats.cov.numpy(), np.cov(ref, rowvar=False))
    fvd = fid_against_stats(net, held.videos, stats)
    assert fvd == pytest.approx(frechet_distance_np(*_stats(ours), *_stats(ref)), rel=1e-6)
    assert fid_against_stats(net, train.videos, stats) == pytest.approx(0.0, abs=1e-6)
    shifted = (held.videos + 0.5).clamp(-1, 1)  # grey background: a different distribution of clips
    assert fid_against_stats(net, shifted, stats) > 3 * fvd > 0
    low, high = bootstrap_ci(net, held.videos, stats, n_boot=50)
    assert 0 <= low < fvd < high


def test_features_shape_determinism_protocol_and_round_trip(tmp_path, held):
    torch.manual_seed(0)
    net = VideoFeatureNet(CONFIG).eval()
    with torch.no_grad():
        feats = net.features(held.videos)
        assert feats.shape == (len(held.videos), 8) and torch.equal(feats, net.features(held.videos))
    assert net.num_features == net.config.feature_dim == 8 and isinstance(net.feature_batch_size, int)
    assert FeatureExtractor(net).num_features == 8
    with pytest.raises(UserError, match=r"\(N, 1, 4, 16, 16\)"):
        net.features(held.videos[:, :, :3])
    with pytest.raises(UserError, match=r"\(N, 1, 4, 16, 16\)"):
        net.features(held.videos[:, :, 0])
    net.save_pretrained(tmp_path / "v")
    loaded = VideoFeatureNet.from_pretrained(tmp_path / "v")
    assert loaded.config == CONFIG and loaded.fingerprint() == net.fingerprint()
    with torch.no_grad():
        assert torch.equal(loaded.features(held.videos), feats)
    stats = compute_reference_stats(net, held.videos, dataset="moving_digits", split="heldout")
    stats.save(tmp_path / "s")
    assert fid_against_stats(loaded, held.videos, ReferenceStats.load(tmp_path / "s")) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UserError, match="frames"):
        VideoFeatureNetConfig.from_dict({**CONFIG.to_dict(), "frames": 1})


def test_training_lowers_loss_and_is_deterministic_in_seed(trained, train, held):
    net, losses = trained
    assert len(losses) == 60 and np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])
    again, again_losses = train_video_feature_net(train.videos, train.labels, train.motions, steps=60, seed=0,
                                                  batch_size=32, lr=1e-2, config=CONFIG)
    assert again.fingerprint() == net.fingerprint() and again_losses == losses
    other, _ = train_video_feature_net(train.videos[:64], train.labels[:64], train.motions[:64], steps=2, seed=1)
    assert other.config == VideoFeatureNetConfig(frames=4, image_size=16)  # shape read off the clips
    digit, motion = video_accuracy(net, held.videos, held.labels, held.motions)
    assert digit == classifier_accuracy(net, held.videos, held.labels)  # forward is the digit head
    assert motion > 0.4  # chance is 0.25


def test_per_frame_fid_is_the_image_fid_of_the_frames(train, held):
    clips = held.videos
    frames = video_frames(clips)
    assert frames.shape == (200 * 4, 1, 16, 16) and torch.equal(frames[4 * 7 + 2], clips[7, :, 2])
    for size in (8, 16):  # resized to the image net's size, and not
        torch.manual_seed(0)
        image_net = DigitFeatureNet(FeatureNetConfig(image_size=size, widths=(4, 4, 8, 8), feature_dim=8)).eval()
        direct = clips.permute(0, 2, 1, 3, 4).reshape(-1, 1, 16, 16)
        if size != 16:
            direct = F.interpolate(direct, size=size, mode="bilinear", antialias=True).clamp(-1, 1)
        stats = compute_reference_stats(image_net, video_frames(train.videos, size), dataset="moving_digits_frames")
        got = per_frame_fid(image_net, clips, stats)
        assert got == pytest.approx(fid_against_stats(image_net, direct, stats), rel=1e-9) and got > 0
        with torch.no_grad():
            feats = image_net.features(direct).double().numpy()
        assert got == pytest.approx(frechet_distance_np(*_stats(feats), stats.mu.numpy(), stats.cov.numpy()), rel=1e-6)


def test_build_writes_a_net_and_statistics_that_load_back(tmp_path):
    m = build_video_feature_assets(tmp_path, steps=2, n_train=64, n_heldout=32, frames=4, canvas=16)
    net = VideoFeatureNet.from_pretrained(tmp_path / "video_featnet")
    stats = ReferenceStats.load(tmp_path / "ref_stats_moving_digits")
    frames = ReferenceStats.load(tmp_path / "ref_stats_moving_digits_frames")
    assert net.fingerprint() == stats.fingerprint == m["fingerprint"] and stats.n == 64
    assert frames.fingerprint == default_feature_net().fingerprint() and frames.n == 64 * 4
    # the build's 32 held-out clips are the first 32 of the fixed split: clips are drawn one after another
    first = load_moving_digits(4, 16, "heldout", 64).videos[:32]
    assert fid_against_stats(net, first, stats) == pytest.approx(m["fvd_heldout_vs_ref"], rel=1e-9)
    assert 0 <= m["heldout_digit_accuracy"] <= 1 and "motion" in (tmp_path / "video_featnet" / "MODEL_CARD.md").read_text()
