"""FID Inception-v3: architecture of pytorch-fid's weights file, FID pooling variants, features, loading and saving."""

import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flexisearch.errors import UserError
from flexisearch.metrics.inception import (
    FID_WEIGHTS_URL,
    FIDInceptionV3,
    InceptionConfig,
)

# Counted layer by layer from torchvision's block definitions: 27,161,264 for torchvision's Inception3
# (1000 classes, with the auxiliary head); the auxiliary head is conv0 768*128 + BN 2*128, conv1
# 128*768*5*5 + BN 2*768, fc 768*1000 + 1000 = 3,326,696, leaving 23,834,568; the FID net's fc has 1008
# classes, 8*2048 + 8 = 16,392 more.
FID_INCEPTION_PARAMS = 23_850_960


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (conftest.one_thread)


def random_inception(seed: int = 0, spread: float = 0.2, shift: float = 0.1) -> FIDInceptionV3:
    """Random weights and BatchNorm statistics scaled (He init) so activations stay O(1) through the net:
    BN scales and running variances uniform in 1 +- spread, biases and running means N(0, shift^2)."""
    torch.manual_seed(seed)
    net = FIDInceptionV3()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, math.sqrt(2 / m.weight[0].numel()))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(1 - spread, 1 + spread)
                m.bias.normal_(0, shift)
                m.running_mean.normal_(0, shift)
                m.running_var.uniform_(1 - spread, 1 + spread)
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0, 0.05)
                m.bias.normal_(0, 0.1)
    return net


@pytest.fixture(scope="module")
def net():
    return random_inception()


@pytest.fixture(scope="module")
def pth(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "weights.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def one_line_error(fn, *args) -> str:
    with pytest.raises(UserError) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message
    return message


# ---- architecture ---------------------------------------------------------------------------

def test_state_dict_has_the_layout_of_the_fid_weights_file(net):
    sd = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == FID_INCEPTION_PARAMS
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7dbl_2.conv.weight": (128, 128, 7, 1),
        "Mixed_6e.branch7x7_2.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "Mixed_7c.branch_pool.bn.bias": (192,),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 94 and all(c.bias is None for c in convs)
    assert all(bn.eps == 0.001 for bn in bns)
    assert len(sd) == 94 * 6 + 2  # conv weight, 5 BatchNorm entries each, fc weight and bias
    assert not any(k.startswith("AuxLogits") for k in sd)


def test_fid_branch_pools_ignore_padding_and_the_last_block_max_pools(net):
    """The last channels of each block are its pool branch: TF-style average (padding not counted) in
    Mixed_5b-d, 6b-e and 7b, max pooling in Mixed_7c; torchvision's own pooling would give other values."""
    def pool_branch(block, x, pool):
        return block.branch_pool(pool(x))

    def avg(include_pad):
        return lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=include_pad)

    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, cin, width in [("Mixed_5b", 192, 32), ("Mixed_5d", 288, 64), ("Mixed_6b", 768, 192),
                                 ("Mixed_6e", 768, 192), ("Mixed_7b", 1280, 192), ("Mixed_7c", 2048, 192)]:
            block = getattr(net, name)
            x = torch.rand(1, cin, 5, 5, generator=gen) * 2
            out = block(x)[:, -width:]
            if name == "Mixed_7c":
                assert torch.allclose(out, pool_branch(block, x, lambda t: F.max_pool2d(t, 3, 1, 1)), atol=1e-5)
                assert not torch.allclose(out, pool_branch(block, x, avg(False)), atol=1e-3)
            else:
                assert torch.allclose(out, pool_branch(block, x, avg(False)), atol=1e-5), name
                assert not torch.allclose(out, pool_branch(block, x, avg(True)), atol=1e-3), name


# ---- features and logits ------------------------------------------------------------------

def test_features_of_any_size_and_grey_images(net, images):
    with torch.no_grad():
        small = net.features(images)
        assert small.shape == (2, 2048) and small.dtype == torch.float32
        assert torch.isfinite(small).all() and (small[0] - small[1]).abs().max() > 1e-3
        # images of any size are bilinearly resized to 299 (align_corners=False) first
        resized = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        assert torch.equal(net.features(resized), small)
        assert torch.equal(net.features(images.double()), small)
        grey = images[:, :1]
        assert torch.equal(net.features(grey), net.features(grey.repeat(1, 3, 1, 1)))
        logits = net(images)
        assert logits.shape == (2, 1008) and torch.equal(logits, net.fc(small))


def test_bad_image_shapes_are_user_errors(net):
    assert "(N, 1 or 3, H, W)" in one_line_error(net.features, torch.zeros(1, 2, 8, 8))
    one_line_error(net.features, torch.zeros(3, 8, 8))


def test_never_leaves_eval_mode_and_weights_are_frozen(net, images):
    before = net.Conv2d_1a_3x3.bn.running_mean.clone()
    net.train()
    assert not any(m.training for m in net.modules())
    assert not any(p.requires_grad for p in net.parameters())
    with torch.no_grad():
        net.features(images)
    assert torch.equal(net.Conv2d_1a_3x3.bn.running_mean, before)


def test_config(net):
    assert net.config.to_dict() == {"feature_dim": 2048, "in_channels": 3, "num_classes": 1008, "image_size": None}
    assert "feature_dim 2048" in one_line_error(FIDInceptionV3, InceptionConfig(feature_dim=768))


# ---- loading and saving -------------------------------------------------------------------

def test_round_trip_through_pth_and_safetensors(net, pth, images, tmp_path):
    with torch.no_grad():
        want = net.features(images)
    st = tmp_path / "inception.safetensors"
    net.save_pretrained(st)
    assert [p.name for p in tmp_path.iterdir()] == ["inception.safetensors"]  # no temp file left behind
    for path in (pth, st):
        loaded = FIDInceptionV3.from_pretrained(path)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            assert torch.equal(loaded.features(images), want)
        assert loaded.fingerprint() == net.fingerprint()
        assert len(loaded.fingerprint()) == 16 and int(loaded.fingerprint(), 16) >= 0


def test_fingerprint_follows_the_weights(net, tmp_path):
    state = net.state_dict()
    state["Mixed_6c.branch7x7_1.conv.weight"] = state["Mixed_6c.branch7x7_1.conv.weight"].clone()
    state["Mixed_6c.branch7x7_1.conv.weight"][0, 0, 0, 0] += 1e-3
    torch.save(state, tmp_path / "changed.pth")
    assert FIDInceptionV3.from_pretrained(tmp_path / "changed.pth").fingerprint() != net.fingerprint()
    other = random_inception(seed=1)
    first = other.fingerprint()
    other.load_state_dict(net.state_dict())  # the cached fingerprint does not outlive the weights
    assert other.fingerprint() == net.fingerprint() != first


def test_files_without_batchnorm_counters_load(net, images, tmp_path):
    """Checkpoints from before PyTorch 0.4.1 have no num_batches_tracked; eval-mode BatchNorm does not use it."""
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    loaded = FIDInceptionV3.from_pretrained(tmp_path / "old.pth")
    with torch.no_grad():
        assert torch.equal(loaded.features(images), net.features(images))


def test_bad_weight_files_are_one_line_user_errors(net, tmp_path):
    load = FIDInceptionV3.from_pretrained
    assert "not found" in one_line_error(load, tmp_path / "nope.pth")

    state = net.state_dict()
    del state["Mixed_5c.branch1x1.bn.running_var"], state["fc.bias"]
    torch.save(state, tmp_path / "missing.pth")
    message = one_line_error(load, tmp_path / "missing.pth")
    assert "missing.pth" in message and "2 " in message and "'Mixed_5c.branch1x1.bn.running_var'" in message

    state = {**net.state_dict(), "AuxLogits.fc.weight": torch.zeros(1008, 768)}
    torch.save(state, tmp_path / "aux.pth")
    assert "unexpected" in one_line_error(load, tmp_path / "aux.pth")

    state = {**net.state_dict(), "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    torch.save(state, tmp_path / "imagenet1000.pth")
    message = one_line_error(load, tmp_path / "imagenet1000.pth")
    assert "'fc.bias'" in message and "(1000,)" in message and "(1008,)" in message

    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    assert "expected a state dict" in one_line_error(load, tmp_path / "list.pth")
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    assert "text.pt: not loadable" in one_line_error(load, tmp_path / "text.pt")
    torch.save({"x": urllib.error.URLError("pickled object")}, tmp_path / "object.pth")
    assert "object.pth: not loadable" in one_line_error(load, tmp_path / "object.pth")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    assert "not loadable" in one_line_error(load, tmp_path / "broken.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"")
    assert ".safetensors" in one_line_error(load, tmp_path / "weights.npz")
    assert ".safetensors" in one_line_error(net.save_pretrained, tmp_path / "out.pth")


def test_fid_inception_spec_fetches_the_official_file(net, monkeypatch):
    calls = []

    def fake_load(url, **kwargs):
        calls.append((url, kwargs))
        return net.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_load)
    loaded = FIDInceptionV3.from_pretrained("fid-inception")
    assert loaded.fingerprint() == net.fingerprint()
    assert calls == [(FID_WEIGHTS_URL, {"map_location": "cpu", "weights_only": True, "progress": False})]
    assert FID_WEIGHTS_URL.endswith("/fid_weights/pt_inception-2015-12-05-6726825d.pth")


def test_fid_inception_offline_says_to_pass_a_local_path(monkeypatch):
    def offline(url, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    message = one_line_error(FIDInceptionV3.from_pretrained, "fid-inception")
    assert "offline" in message and "local path" in message and "pt_inception-2015-12-05-6726825d.pth" in message


def test_fid_inception_corrupt_cache_names_the_cached_file(monkeypatch):
    def corrupt(url, **kwargs):
        raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", corrupt)
    message = one_line_error(FIDInceptionV3.from_pretrained, "fid-inception")
    assert "checkpoints/pt_inception-2015-12-05-6726825d.pth: not loadable" in message


# ---- independent reference forward pass ----------------------------------------------------
# pytorch-fid's FID Inception-v3 rebuilt from the published architecture (torchvision's Inception3 blocks with
# pytorch-fid's FIDInceptionA/C/E_1/E_2 patches) in plain tensor ops, reading the weights by state-dict name.
# Strides and paddings come from torchvision's block definitions, not from the module under test.

def _ref_conv(sd, name, x, stride=1, padding=0):
    """torchvision's BasicConv2d: conv (no bias), BatchNorm in eval mode with eps 0.001, ReLU."""
    x = F.conv2d(x, sd[f"{name}.conv.weight"], None, stride=stride, padding=padding)
    x = F.batch_norm(x, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"], sd[f"{name}.bn.weight"],
                     sd[f"{name}.bn.bias"], training=False, eps=0.001)
    return F.relu(x)


def _ref_tf_avg_pool(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _ref_inception_a(sd, p, x):  # FIDInceptionA
    c = lambda n, t, **kw: _ref_conv(sd, f"{p}.{n}", t, **kw)  # noqa: E731
    branch1x1 = c("branch1x1", x)
    branch5x5 = c("branch5x5_2", c("branch5x5_1", x), padding=2)
    branch3x3dbl = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x), padding=1), padding=1)
    branch_pool = c("branch_pool", _ref_tf_avg_pool(x))
    return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


def _ref_inception_b(sd, p, x):  # torchvision InceptionB
    c = lambda n, t, **kw: _ref_conv(sd, f"{p}.{n}", t, **kw)  # noqa: E731
    branch3x3 = c("branch3x3", x, stride=2)
    branch3x3dbl = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x), padding=1), stride=2)
    branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
    return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)


def _ref_inception_c(sd, p, x):  # FIDInceptionC
    c = lambda n, t, **kw: _ref_conv(sd, f"{p}.{n}", t, **kw)  # noqa: E731
    branch1x1 = c("branch1x1", x)
    branch7x7 = c("branch7x7_1", x)
    branch7x7 = c("branch7x7_2", branch7x7, padding=(0, 3))
    branch7x7 = c("branch7x7_3", branch7x7, padding=(3, 0))
    branch7x7dbl = c("branch7x7dbl_1", x)
    branch7x7dbl = c("branch7x7dbl_2", branch7x7dbl, padding=(3, 0))
    branch7x7dbl = c("branch7x7dbl_3", branch7x7dbl, padding=(0, 3))
    branch7x7dbl = c("branch7x7dbl_4", branch7x7dbl, padding=(3, 0))
    branch7x7dbl = c("branch7x7dbl_5", branch7x7dbl, padding=(0, 3))
    branch_pool = c("branch_pool", _ref_tf_avg_pool(x))
    return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


def _ref_inception_d(sd, p, x):  # torchvision InceptionD
    c = lambda n, t, **kw: _ref_conv(sd, f"{p}.{n}", t, **kw)  # noqa: E731
    branch3x3 = c("branch3x3_2", c("branch3x3_1", x), stride=2)
    branch7x7x3 = c("branch7x7x3_1", x)
    branch7x7x3 = c("branch7x7x3_2", branch7x7x3, padding=(0, 3))
    branch7x7x3 = c("branch7x7x3_3", branch7x7x3, padding=(3, 0))
    branch7x7x3 = c("branch7x7x3_4", branch7x7x3, stride=2)
    branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
    return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


def _ref_inception_e(sd, p, x, pool):  # FIDInceptionE_1 (pool: TF average) and FIDInceptionE_2 (pool: max)
    c = lambda n, t, **kw: _ref_conv(sd, f"{p}.{n}", t, **kw)  # noqa: E731
    branch1x1 = c("branch1x1", x)
    branch3x3 = c("branch3x3_1", x)
    branch3x3 = torch.cat([c("branch3x3_2a", branch3x3, padding=(0, 1)),
                           c("branch3x3_2b", branch3x3, padding=(1, 0))], 1)
    branch3x3dbl = c("branch3x3dbl_2", c("branch3x3dbl_1", x), padding=1)
    branch3x3dbl = torch.cat([c("branch3x3dbl_3a", branch3x3dbl, padding=(0, 1)),
                              c("branch3x3dbl_3b", branch3x3dbl, padding=(1, 0))], 1)
    branch_pool = c("branch_pool", pool(x))
    return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


def _ref_fid_features(sd, images01):
    """pytorch-fid's InceptionV3([3]) (resize_input, normalize_input) on images in [0, 1]: pool3 features."""
    x = F.interpolate(images01, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    # block 0
    x = _ref_conv(sd, "Conv2d_1a_3x3", x, stride=2)
    x = _ref_conv(sd, "Conv2d_2a_3x3", x)
    x = _ref_conv(sd, "Conv2d_2b_3x3", x, padding=1)
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    # block 1
    x = _ref_conv(sd, "Conv2d_3b_1x1", x)
    x = _ref_conv(sd, "Conv2d_4a_3x3", x)
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    # block 2
    x = _ref_inception_a(sd, "Mixed_5b", x)
    x = _ref_inception_a(sd, "Mixed_5c", x)
    x = _ref_inception_a(sd, "Mixed_5d", x)
    x = _ref_inception_b(sd, "Mixed_6a", x)
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = _ref_inception_c(sd, name, x)
    # block 3
    x = _ref_inception_d(sd, "Mixed_7a", x)
    x = _ref_inception_e(sd, "Mixed_7b", x, _ref_tf_avg_pool)
    x = _ref_inception_e(sd, "Mixed_7c", x, lambda t: F.max_pool2d(t, kernel_size=3, stride=1, padding=1))
    return F.adaptive_avg_pool2d(x, output_size=(1, 1)).flatten(1)


def test_features_match_an_independent_reference_forward_pass():
    """Random weights and random BatchNorm statistics (every branch and channel distinct): the module's features
    and logits equal the reference built from the published architecture, so a wrong branch order in any block's
    concatenation, a wrong pool variant, stride, padding or normalisation is caught."""
    net = random_inception(seed=3, spread=0.5, shift=0.3)  # wide: every branch and channel distinct
    sd = net.state_dict()
    images01 = torch.rand(2, 3, 75, 75, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = _ref_fid_features(sd, images01)
        got = net.features(images01 * 2 - 1)
        logits = net(images01 * 2 - 1)
    assert got.shape == want.shape == (2, 2048)
    assert want.std() > 0.1 and (want[0] - want[1]).abs().max() > 1e-2  # non-degenerate features
    # float32 summation order differs between the two only in rounding: ~1e-6 of the feature scale
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()
    want_logits = F.linear(want, sd["fc.weight"], sd["fc.bias"])
    assert (logits - want_logits).abs().max() <= 1e-5 * want_logits.abs().max()
