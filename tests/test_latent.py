"""Latent models: a tiny DiTPipeline in facebook/DiT-XL-2-256's layout loads as `dit:<dir>` and as a converted
FlexiDiTPipeline directory, its samples reach the metric VAE-decoded, and ImageNet-style .npz FID statistics load."""

import numpy as np
import pytest
import torch
import yaml
from conftest import converted_tiny_dit, tiny_rgb_featnet

from flexisearch.errors import UserError
from flexisearch.metrics.fid import (
    ReferenceStats,
    compute_reference_stats,
    extract_features,
    fid_against_stats,
)
from flexisearch.models.loading import load_model
from flexisearch.optimize.config import load_search_config
from flexisearch.optimize.evaluate import Evaluator
from flexisearch.sampling.generate import sample
from flexisearch.sampling.schedule import Schedule


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    original = converted_tiny_dit(root)
    net = tiny_rgb_featnet()
    net.save_pretrained(root / "net")
    stats = compute_reference_stats(net, torch.rand(64, 3, 8, 8) * 2 - 1, "random", "train")
    stats.save(root / "stats")
    np.savez(root / "stats.npz", mu=stats.mu.numpy(), sigma=stats.cov.numpy())
    return root, original, net, stats


def test_dit_spec_and_converted_pipeline_decode_with_the_checkpoint_vae(dirs):
    root, original, _, _ = dirs
    latents = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        want = original.vae.decode(latents / original.vae.config.scaling_factor).sample.clamp(-1, 1)
    for spec in (f"dit:{root / 'dit'}", str(root / "flexi")):
        model = load_model(spec)
        assert model.config.patch_sizes == (2, 4) and model.config.in_channels == 4
        assert torch.allclose(model.decode_images(latents), want, atol=1e-6)
    assert load_model(f"dit:{root / 'dit'}").fingerprint() == load_model(str(root / "flexi")).fingerprint()


def write_cfg(root, tmp_path, **over):
    doc = {"study": "latent", "model": f"dit:{root / 'dit'}", "feature_net": str(root / "net"),
           "reference_stats": str(root / "stats.npz"),
           "space": {"type": "branch_threshold", "num_steps": 4, "solver": "ddim"},
           "metric": {"name": "fid", "relative": 0.5}, "reference": {"num_steps": 4, "guidance_scale": 2.0, "solver": "ddim"},
           "search_samples": 12, "heldout_samples": 12, "bootstrap": 10, "n_trials": 3, "cost": {"repeats": 1}, **over}
    p = tmp_path / "latent.yaml"
    p.write_text(yaml.safe_dump(doc))
    return load_search_config(p)


def decoded_search_samples(original, evaluator, schedule, n=12):
    """What the search should score, built without the Evaluator: n samples on seeds 0..n-1 with labels cycling
    over the classes, decoded by the original DiTPipeline's VAE as diffusers' DiTPipeline does."""
    labels = [i % evaluator.model.config.num_classes for i in range(n)]
    latents = sample(evaluator.model, schedule, labels, list(range(n)))
    with torch.no_grad():
        images = original.vae.decode(latents / original.vae.config.scaling_factor).sample.clamp(-1, 1)
    return latents, images


def independent_fid(net, images, mu, sigma):
    """FID with numpy alone from the net's features (no torchmetrics, no ReferenceStats). With the covariance
    cov = X^T X (X: the centred features / sqrt(n - 1)), tr sqrt(cov sigma) is the sum of the square roots of the
    eigenvalues of X sigma X^T: an n x n problem instead of a 2048 x 2048 sqrtm."""
    feats = extract_features(net, images).numpy().astype(np.float64)
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    x = (feats - feats.mean(0)) / np.sqrt(len(feats) - 1)
    eig = np.clip(np.linalg.eigvalsh(x @ sigma @ x.T), 0, None)
    diff = feats.mean(0) - mu
    return float(diff @ diff + np.trace(x @ x.T) + np.trace(sigma) - 2 * np.sqrt(eig).sum())


def test_objective_scores_decoded_pixels(dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run folder (static native's samples are kept there)
    root, original, net, _ = dirs
    evaluator = Evaluator(write_cfg(root, tmp_path))
    s = Schedule.static(2, 4, guidance_scale=2.0, solver="ddim", model=evaluator.fingerprint)  # the reference
    latents, images = decoded_search_samples(original, evaluator, s)
    assert images.shape == (12, 3, 8, 8) and latents.shape == (12, 4, 8, 8)
    assert torch.allclose(evaluator.samples(s, evaluator.search_set), images, atol=1e-5)
    npz = np.load(root / "stats.npz")
    want = independent_fid(net, images, npz["mu"], npz["sigma"])
    assert want > 0 and evaluator.quality(s) == pytest.approx(want, rel=1e-4, abs=0)
    assert evaluator.quality(evaluator.reference) == evaluator.quality(s)


def test_npz_statistics_match_the_directory_format(dirs):
    root, _, net, stats = dirs
    images = torch.rand(20, 3, 8, 8) * 2 - 1
    from_npz = ReferenceStats.from_npz(root / "stats.npz", net.fingerprint())
    assert fid_against_stats(net, images, from_npz) == pytest.approx(fid_against_stats(net, images, stats), rel=1e-9)


def test_bad_npz_and_unloadable_hub_id_are_one_line_errors(dirs, tmp_path):
    root, _, net, _ = dirs
    d = 8
    cases = {
        "missing.npz": None,
        "nosigma.npz": {"mu": np.zeros(d)},
        "shape.npz": {"mu": np.zeros(d), "sigma": np.zeros((d, d + 1))},
        "nan.npz": {"mu": np.full(d, np.nan), "sigma": np.eye(d)},
        "pickled.npz": {"mu": np.array([{"a": 1}], dtype=object), "sigma": np.eye(d)},
    }
    for name, arrays in cases.items():
        if arrays is not None:
            np.savez(tmp_path / name, **arrays)
        with pytest.raises(UserError) as e:
            ReferenceStats.from_npz(tmp_path / name, net.fingerprint())
        assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"dit:facebook/DiT-XL-2-256.*cannot load the DiTPipeline"):
        load_model("dit:facebook/DiT-XL-2-256")  # offline in tests (HF_HUB_OFFLINE=1), not in the cache
    with pytest.raises(UserError, match="give reference_stats"):
        Evaluator(write_cfg(root, tmp_path, reference_stats=None))


def test_fid_inception_features_and_npz_statistics_drive_the_search_metric(dirs, tmp_path, monkeypatch):
    """The FID Inception-v3 (random weights here; the real ones download when online) plugs into the metric."""
    monkeypatch.chdir(tmp_path)  # the run folder (static native's samples are kept there)
    from flexisearch.metrics.inception import FIDInceptionV3

    root, original, _, _ = dirs
    torch.manual_seed(0)
    net = FIDInceptionV3()
    net.save_pretrained(tmp_path / "inception.safetensors")
    feats = extract_features(net, torch.rand(24, 3, 8, 8) * 2 - 1).numpy()
    np.savez(tmp_path / "imagenet.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    evaluator = Evaluator(write_cfg(root, tmp_path, feature_net=str(tmp_path / "inception.safetensors"),
                                    reference_stats=str(tmp_path / "imagenet.npz")))
    s = Schedule.static(2, 4, guidance_scale=2.0, solver="ddim", model=evaluator.fingerprint)  # the reference
    _, images = decoded_search_samples(original, evaluator, s)
    assert ReferenceStats.from_npz(tmp_path / "imagenet.npz", net.fingerprint()).mu.shape == (2048,)
    want = independent_fid(net, images, feats.mean(0), np.cov(feats, rowvar=False))
    # random Inception weights make tiny features (FID ~1e-12 here): compare relatively, with no absolute slack
    assert want > 0 and evaluator.quality(evaluator.reference) == pytest.approx(want, rel=1e-4, abs=0)
