"""The flexible video DiT (video_dit.py): 3-D PI-resize identities, the native path, positions, save/load,
config errors and exact FLOPs."""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_3d_sincos_pos_embed
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flexisearch.errors import UserError
from flexisearch.models.flops import breakdown_macs, forward_flops, tokens
from flexisearch.models.layers import FlexiDeEmbed, FlexiPatchEmbed, resize_matrix
from flexisearch.models.video_dit import FlexiVideoDiT, FlexiVideoDiTConfig

NATIVE = (1, 2, 2)
WEAK = ((2, 2, 2), (1, 4, 4))
CONFIG = FlexiVideoDiTConfig(input_size=8, num_frames=4, in_channels=2, hidden_size=32, depth=2, num_heads=2,
                             num_classes=3, prediction="flow")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)


def upsample(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Trilinear resize of (..., t, h, w) patches, each on its own (half-pixel centres)."""
    lead = x.shape[:-3]
    out = F.interpolate(x.reshape(-1, 1, *x.shape[-3:]), size=size, mode="trilinear", align_corners=False)
    return out.reshape(*lead, *size)


def to_patches(v: torch.Tensor, p: tuple[int, int, int]) -> torch.Tensor:
    """(n, c, T, H, W) -> (n, c, gt, gh, gw, pt, ph, pw)."""
    n, c, *shape = v.shape
    g = [s // q for s, q in zip(shape, p)]
    return v.reshape(n, c, g[0], p[0], g[1], p[1], g[2], p[2]).permute(0, 1, 2, 4, 6, 3, 5, 7)


def from_patches(patches: torch.Tensor) -> torch.Tensor:
    n, c, g0, g1, g2, a, b, d = patches.shape
    return patches.permute(0, 1, 2, 5, 3, 6, 4, 7).reshape(n, c, g0 * a, g1 * b, g2 * d)


def random_model(config: FlexiVideoDiTConfig = CONFIG) -> FlexiVideoDiT:
    """A tiny model with every weight random (nothing zero-initialised)."""
    torch.manual_seed(0)
    model = FlexiVideoDiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def flexified(base: FlexiVideoDiT, lora_rank: int = 4) -> FlexiVideoDiT:
    """base with the weak sizes, residual noise, and random (as if trained) LoRA and patch-size embeddings."""
    torch.manual_seed(1)
    model = base.with_patch_sizes(WEAK, init_std=0.05, lora_rank=lora_rank, lora_alpha=float(lora_rank))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name or "patch_size_embed" in name:
                p.normal_(0, 0.1)
    return model.eval()


def inputs(config: FlexiVideoDiTConfig = CONFIG, n: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, config.in_channels, config.num_frames, config.input_size, config.input_size, generator=gen)
    return x, torch.linspace(10.0, 900.0, n), torch.arange(n) % (config.num_classes + 1)


# ---- the 3-D resize ---------------------------------------------------------------------------------

@pytest.mark.parametrize("p_to", [(2, 2, 2), (1, 4, 4), (2, 4, 4), (3, 3, 5)])
def test_resize_matrix_is_trilinear_resize_and_separable(p_to: tuple[int, int, int]) -> None:
    x = torch.randn(5, *NATIVE, dtype=torch.float64)
    b = resize_matrix(NATIVE, p_to)
    assert b.shape == (np.prod(p_to), np.prod(NATIVE))
    torch.testing.assert_close(upsample(x, p_to).reshape(5, -1), x.reshape(5, -1) @ b.T, rtol=0, atol=1e-12)
    axes = [resize_matrix((a,), (c,)).numpy() for a, c in zip(NATIVE, p_to)]  # 1-D linear resizes
    assert np.allclose(b.numpy(), np.kron(np.kron(axes[0], axes[1]), axes[2]), rtol=0, atol=1e-15)


def test_a_length_one_time_axis_is_duplicated() -> None:
    b = resize_matrix(NATIVE, (2, 2, 2))
    assert torch.equal(b, torch.cat([torch.eye(4), torch.eye(4)]).double())
    x = torch.randn(3, *NATIVE, dtype=torch.float64)
    big = upsample(x, (2, 2, 2))
    assert torch.equal(big[:, :1], x) and torch.equal(big[:, 1:], x)


@pytest.mark.parametrize("p_from,p_to", [(2, 4), (2, 8), (3, 7), (1, 6)])
def test_square_2d_resize_matrix_is_still_torchs_bilinear_matrix(p_from: int, p_to: int) -> None:
    """An int size is today's square 2-D patch, bit for bit (a Kronecker product differs in the last bit)."""
    eye = torch.eye(p_from * p_from, dtype=torch.float64).reshape(-1, 1, p_from, p_from)
    cols = F.interpolate(eye, size=(p_to, p_to), mode="bilinear", align_corners=False)
    assert torch.equal(resize_matrix(p_from, p_to), cols.reshape(p_from * p_from, -1).T)


# ---- PI-resize identities of the tokenizer and de-tokenizer ---------------------------------------------

@pytest.mark.parametrize("init_std", [0.0, 0.5])
@pytest.mark.parametrize("weak", WEAK)
def test_embedding_of_upsampled_video_equals_native_tokens(weak: tuple[int, int, int], init_std: float) -> None:
    """embed(weak) of a video whose every weak patch is the upsampled native patch == embed(native) of the original."""
    torch.manual_seed(3)
    embed = FlexiPatchEmbed(in_channels=3, hidden=12, native=NATIVE).double()
    embed.add_patch_size(weak, init_std=init_std)
    with torch.no_grad():
        embed.proj.bias.normal_()
    assert (embed.residual["x".join(map(str, weak))].abs().max() > 0) == (init_std > 0)
    z = torch.randn(2, 3, 2, 4, 6, dtype=torch.float64)  # native grid (2, 2, 3)
    video = from_patches(upsample(to_patches(z, NATIVE), weak))
    with torch.no_grad():
        low, native = embed(video, weak), embed(z, NATIVE)
    assert low.shape == native.shape == (2, 12, 12)
    torch.testing.assert_close(low, native, rtol=0, atol=1e-10)


def test_weak_kernel_is_the_pi_resized_native_one_plus_its_residual() -> None:
    """Any input, residual included, with the resize built here from torch's trilinear interpolation."""
    torch.manual_seed(4)
    embed = FlexiPatchEmbed(in_channels=3, hidden=12, native=NATIVE).double()
    embed.add_patch_size((2, 4, 4), init_std=0.5)
    eye = torch.eye(4, dtype=torch.float64).reshape(4, *NATIVE)
    b = upsample(eye, (2, 4, 4)).reshape(4, -1).T  # column j: the upsampled j-th native pixel
    kernel = (embed.proj.weight.flatten(2) @ torch.linalg.pinv(b.T).T).reshape(12, 3, 2, 4, 4)
    x = torch.randn(2, 3, 4, 8, 8, dtype=torch.float64)
    want = F.conv3d(x, kernel + embed.residual["2x4x4"], embed.proj.bias, stride=(2, 4, 4)).flatten(2).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(embed(x, (2, 4, 4)), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("init_std", [0.0, 0.5])
@pytest.mark.parametrize("weak", WEAK)
def test_deembedding_downsamples_to_native(weak: tuple[int, int, int], init_std: float) -> None:
    """pinv(B) applied to each weak output patch gives the native output patch of the same token."""
    torch.manual_seed(5)
    de = FlexiDeEmbed(hidden=12, out_channels=3, native=NATIVE).double()
    with torch.no_grad():
        de.linear.weight.normal_()
        de.linear.bias.normal_()
    de.add_patch_size(weak, init_std=init_std)
    grid = (2, 2, 3)
    tokens_ = torch.randn(2, 12, 12, dtype=torch.float64)
    down = torch.linalg.pinv(resize_matrix(NATIVE, weak))  # (|native|, |weak|)
    with torch.no_grad():
        low = to_patches(de(tokens_, weak, grid), weak)
        native = to_patches(de(tokens_, NATIVE, grid), NATIVE)
    assert low.shape == (2, 3, *grid, *weak)
    projected = low.reshape(*low.shape[:5], -1) @ down.T
    torch.testing.assert_close(projected, native.reshape(*native.shape[:5], -1), rtol=0, atol=1e-10)
    if init_std == 0:  # without the residual a weak patch is exactly the upsampled native patch
        torch.testing.assert_close(low, upsample(native, weak), rtol=0, atol=1e-10)
    else:
        assert not torch.allclose(low, upsample(native, weak), atol=1e-3)


# ---- the native path ------------------------------------------------------------------------------

def test_native_path_is_bit_identical_after_adding_sizes_lora_and_residuals() -> None:
    base = random_model()
    flexi = flexified(base)
    assert flexi.config.patch_sizes == (NATIVE, (1, 4, 4), (2, 2, 2))
    x, t, y = inputs()
    with torch.no_grad():
        want = base(x, t, y)
        assert torch.equal(flexi(x, t, y), want)
        assert torch.equal(flexi(x, t, y, patch_size=[1, 2, 2]), want)
        for p in WEAK:
            key = "x".join(map(str, p))
            out = flexi(x, t, y, patch_size=p)
            assert out.shape == x.shape[:1] + (2 * CONFIG.in_channels,) + x.shape[2:] and out.isfinite().all()
            for lin in flexi._lora_linears():  # the weak path runs its own adapters...
                lin.lora_b[key].zero_()
            without_lora = flexi(x, t, y, patch_size=p)
            assert not torch.allclose(without_lora, out)
            flexi.patch_size_embed[key].zero_()  # ...and adds its own patch-size embedding
            assert not torch.allclose(flexi(x, t, y, patch_size=p), without_lora)
        with pytest.raises(ValueError, match="not supported"):
            flexi(x, t, y, patch_size=(4, 2, 2))


def test_native_tokens_are_a_plain_conv3d_patchify() -> None:
    model = flexified(random_model())
    conv = torch.nn.Conv3d(CONFIG.in_channels, CONFIG.hidden_size, kernel_size=NATIVE, stride=NATIVE)
    conv.load_state_dict(model.x_embedder.proj.state_dict())
    x, _, _ = inputs()
    with torch.no_grad():
        assert torch.equal(model.x_embedder(x, NATIVE), conv(x).flatten(2).transpose(1, 2))


# ---- positions ------------------------------------------------------------------------------------

def sincos_ref(dim: int, coords: np.ndarray) -> np.ndarray:
    """CogVideoX's 3-D sin-cos of (t, y, x) coordinates: a quarter of the channels for t, then x, then y."""
    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    spatial = 3 * dim // 4
    return np.concatenate([one_axis(dim // 4, coords[:, 0]), one_axis(spatial // 2, coords[:, 2]),
                           one_axis(spatial // 2, coords[:, 1])], axis=1)


def test_native_positions_are_diffusers_3d_sincos() -> None:
    model = FlexiVideoDiT(CONFIG)
    want = get_3d_sincos_pos_embed(32, (4, 4), 4, output_type="pt").reshape(-1, 32)  # (T, H*W, D), time-major
    torch.testing.assert_close(model.pos_embed_1x2x2, want.float(), rtol=0, atol=1e-6)


def test_weak_token_sits_at_the_mean_of_the_native_tokens_it_covers() -> None:
    cfg = dataclasses.replace(CONFIG, extra_patch_sizes=(*WEAK, (4, 8, 8)))
    model = FlexiVideoDiT(cfg)
    assert not any(name.startswith("pos_embed") for name in model.state_dict())  # buffers, not stored
    assert not any(name.startswith("pos_embed") for name, _ in model.named_parameters())
    for p in cfg.extra_patch_sizes:
        s = [q // q0 for q, q0 in zip(p, NATIVE)]
        coords = []
        for i, j, k in np.ndindex(*cfg.grid(p)):  # time-major, as the tokens
            covered = [(a, b, c) for a in range(i * s[0], (i + 1) * s[0]) for b in range(j * s[1], (j + 1) * s[1])
                       for c in range(k * s[2], (k + 1) * s[2])]
            coords.append(np.mean(covered, axis=0))
        coords = np.array(coords)
        assert np.allclose(coords[0], [(v - 1) / 2 for v in s])  # (2, 2, 2): time 0.5; (1, 4, 4): (0, 0.5, 0.5)
        got = getattr(model, f"pos_embed_{'x'.join(map(str, p))}")
        assert got.shape == (len(coords), 32)
        assert np.allclose(got.numpy(), sincos_ref(32, coords), atol=1e-6)


# ---- save / load and config ------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path) -> None:
    model = flexified(random_model())
    before = model.fingerprint()
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["patch_size"] == [1, 2, 2] and stored["extra_patch_sizes"] == [[1, 4, 4], [2, 2, 2]]
    loaded = FlexiVideoDiT.from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.config.extra_patch_sizes == ((1, 4, 4), (2, 2, 2))
    assert loaded.fingerprint() == before
    x, t, y = inputs()
    with torch.no_grad():
        for p in model.config.patch_sizes:
            assert torch.equal(loaded(x, t, y, patch_size=p), model(x, t, y, patch_size=p))


@pytest.mark.parametrize("change,field", [
    ({"patch_size": [1, 3, 2]}, "patch_size"),
    ({"patch_size": [1, 2]}, "patch_size"),
    ({"extra_patch_sizes": [[3, 2, 2]]}, "extra_patch_sizes"),  # 3 does not divide 4 frames
    ({"extra_patch_sizes": [[1, 1, 2]]}, "extra_patch_sizes"),  # smaller than native along height
    ({"extra_patch_sizes": [[1, 2, 2]]}, "extra_patch_sizes"),  # the native size itself
    ({"extra_patch_sizes": [2, 2, 2]}, "extra_patch_sizes"),  # not a list of sizes
    ({"extra_patch_sizes": [[2, 0, 2]]}, "extra_patch_sizes"),
    ({"hidden_size": 40, "num_heads": 2}, "hidden_size"),  # not a multiple of 16
    ({"num_frames": 0}, "num_frames"),
    ({"prediction": "x0"}, "prediction"),
])
def test_config_errors_are_one_line_and_name_the_field(change: dict, field: str) -> None:
    good = json.loads(json.dumps(CONFIG.to_dict()))
    assert FlexiVideoDiTConfig.from_dict(good) == CONFIG
    with pytest.raises(UserError) as err:
        FlexiVideoDiTConfig.from_dict({**good, **change}, source="video.json")
    message = str(err.value)
    assert "\n" not in message and f"'{field}'" in message and message.startswith("video.json")


def test_config_reads_sizes_back_as_tuples() -> None:
    cfg = FlexiVideoDiTConfig.from_dict({**CONFIG.to_dict(), "patch_size": [1, 2, 2],
                                         "extra_patch_sizes": [[2, 2, 2], [1, 4, 4]]})
    assert cfg.patch_size == NATIVE and cfg.extra_patch_sizes == ((2, 2, 2), (1, 4, 4))
    assert FlexiVideoDiTConfig(**{**CONFIG.to_dict(), "extra_patch_sizes": [[2, 2, 2]]}).extra_patch_sizes == ((2, 2, 2),)


# ---- FLOPs ----------------------------------------------------------------------------------------

def counted_flops(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_analytic_count_equals_flop_counter_at_every_size(lora_rank: int) -> None:
    model = flexified(random_model(), lora_rank=lora_rank)
    cfg = model.config
    x, t, y = inputs(n=1)
    for p in cfg.patch_sizes:
        forward = functools.partial(model, x, t, y, patch_size=p)
        first, total = counted_flops(forward), counted_flops(forward)
        assert total == forward_flops(cfg, p), p
        assert (first > total) == (p != NATIVE)  # a weak size forms its kernels once (not counted)
        assert (breakdown_macs(cfg, p)["lora"] > 0) == (bool(lora_rank) and p != NATIVE)


def test_token_counts_and_patch_terms() -> None:
    cfg = dataclasses.replace(CONFIG, extra_patch_sizes=WEAK)
    assert [tokens(cfg, p) for p in cfg.patch_sizes] == [4 * 4 * 4, 2 * 4 * 4, 4 * 2 * 2]
    parts = breakdown_macs(cfg, (2, 2, 2))
    assert parts["patch_embed"] == 32 * 32 * 2 * 8 and parts["deembed"] == 32 * 32 * 8 * 4
    with pytest.raises(ValueError, match="not supported"):
        breakdown_macs(cfg, (2, 4, 4))


# ---- schedules of 3-D sizes, and sampling them ------------------------------------------------------------

def test_a_schedule_of_video_sizes_is_version_3_and_image_schedules_keep_their_versions(tmp_path) -> None:
    from flexisearch.sampling.schedule import Schedule

    kw = {"guidance_scale": 2.0, "solver": "euler", "model": "abc"}
    video = Schedule(cond=((2, 2, 2), [1, 4, 4], (1, 2, 2)), uncond=((2, 2, 2),) * 3, **kw)
    assert video.cond[1] == (1, 4, 4) and video.describe() == "cond (2,2,2)x1 (1,4,4)x1 (1,2,2)x1 | uncond (2,2,2)x3"
    video.save(tmp_path / "v.json")
    doc = json.loads((tmp_path / "v.json").read_text())
    assert doc["version"] == 3 and doc["cond"][0] == [2, 2, 2]
    assert Schedule.load(tmp_path / "v.json") == video
    assert Schedule.static(4, 3, **kw).to_dict()["version"] == 1  # image schedules: version 1 readers still read them
    assert video.resample(6).cond == ((2, 2, 2),) * 2 + ((1, 4, 4),) * 2 + ((1, 2, 2),) * 2
    doc["cond"][0] = [2, 2]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="field 'cond/0'"):
        Schedule.load(tmp_path / "bad.json")


def test_a_video_model_samples_a_3d_schedule_per_seed_and_its_flops_add_up() -> None:
    from flexisearch.models.flops import forward_macs, schedule_macs
    from flexisearch.sampling.generate import sample
    from flexisearch.sampling.schedule import Schedule

    model = flexified(random_model(), lora_rank=2).eval()
    s = Schedule(cond=((2, 2, 2), (1, 4, 4), NATIVE), uncond=((2, 2, 2), (2, 2, 2), (1, 4, 4)), guidance_scale=2.0,
                 solver="euler", model=model.fingerprint())
    labels, seeds = [0, 1, 2], [4, 5, 6]
    out = sample(model, s, labels, seeds, batch_size=2)
    assert out.shape == (3, *CONFIG.sample_shape) and out.isfinite().all()
    assert torch.equal(out[2:], sample(model, s, labels[2:], seeds[2:]))  # a sample depends on its seed alone
    cfg = model.config
    want = sum(forward_macs(cfg, c) + forward_macs(cfg, u) for c, u in s.steps())
    assert schedule_macs(cfg, s) == want


# ---- moving digits ------------------------------------------------------------------------------------------

def test_bounce_reflects_at_both_walls_as_a_step_by_step_simulation() -> None:
    from flexisearch.data.moving_digits import _bounce

    rng = np.random.default_rng(0)
    for _ in range(200):
        room, v0 = int(rng.integers(0, 9)), int(rng.choice([-3, -2, -1, 1, 2, 3]))
        start = int(rng.integers(0, room + 1))
        pos, direction, want = start, 1 if v0 > 0 else -1, []
        for _ in range(12):  # one pixel at a time, turning round at a wall
            want.append(pos)
            for _ in range(abs(v0) if room else 0):
                if not 0 <= pos + direction <= room:
                    direction = -direction
                pos += direction
        assert _bounce(start, v0, 12, room).tolist() == want


def test_moving_digits_are_deterministic_whole_digits_of_known_class_and_motion() -> None:
    from flexisearch.data.moving_digits import moving_digits

    a = moving_digits(12, "train", seed=3, frames=6, canvas=24, digit_size=12)
    b = moving_digits(12, "train", seed=3, frames=6, canvas=24, digit_size=12)
    assert a.videos.shape == (12, 1, 6, 24, 24) and a.videos.min() >= -1 and a.videos.max() <= 1
    assert torch.equal(a.videos, b.videos) and torch.equal(a.labels, b.labels) and torch.equal(a.motions, b.motions)
    other = moving_digits(12, "heldout", seed=3, frames=6, canvas=24, digit_size=12)
    assert not torch.equal(a.videos, other.videos)
    ink = ((a.videos + 1) / 2).sum((1, 3, 4))  # (clips, frames): one whole digit in every frame
    torch.testing.assert_close(ink, ink[:, :1].expand_as(ink), rtol=1e-5, atol=1e-4)
    assert set(a.labels.tolist()) <= set(range(10)) and set(a.motions.tolist()) <= {0, 1, 2, 3}
    with pytest.raises(UserError, match="canvas >= digit_size"):
        moving_digits(2, canvas=8, digit_size=12)


def test_a_video_model_pretrains_and_flexifies_on_moving_digits(tmp_path) -> None:
    """train video-base -> flexify (shared, (t, h, w) weak sizes from a JSON config) -> the weak sizes run."""
    from flexisearch.cli import main
    from flexisearch.models.loading import load_model

    (tmp_path / "base.json").write_text(json.dumps({"frames": 4, "image_size": 8, "hidden_size": 32, "depth": 1,
                                                     "num_heads": 2, "batch_size": 4, "ckpt_every": 2}))
    assert main(["train", "video-base", "--config", str(tmp_path / "base.json"), "--steps", "2",
                 "--out", str(tmp_path / "base")]) == 0
    (tmp_path / "flex.json").write_text(json.dumps({"weak_patch_sizes": [[2, 2, 2], [1, 4, 4]], "batch_size": 4,
                                                     "ckpt_every": 2}))
    assert main(["train", "flexify", "--base", str(tmp_path / "base" / "model"), "--data", "moving-digits",
                 "--config", str(tmp_path / "flex.json"), "--steps", "2", "--out", str(tmp_path / "flex")]) == 0
    base, model = load_model(str(tmp_path / "base" / "model")), load_model(str(tmp_path / "flex" / "model"))
    assert isinstance(model, FlexiVideoDiT) and model.config.extra_patch_sizes == ((1, 4, 4), (2, 2, 2))
    x, t, y = torch.randn(2, 1, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.tensor([3, 10])
    with torch.no_grad():
        assert model(x, t, y, (2, 2, 2)).shape == x.shape and not torch.equal(model(x, t, y), base(x, t, y))
    from PIL import Image

    from flexisearch.sampling.schedule import Schedule

    s = Schedule(cond=((2, 2, 2), (1, 4, 4), (1, 2, 2)), uncond=((2, 2, 2),) * 3, guidance_scale=2.0, solver="euler",
                 model=model.fingerprint())
    s.save(tmp_path / "s.json")
    assert main(["sample", "--model", str(tmp_path / "flex" / "model"), "--schedule", str(tmp_path / "s.json"),
                 "--label", "1", "2", "--n", "3", "--out", str(tmp_path / "clips.gif"), "--quiet"]) == 0
    gif = Image.open(tmp_path / "clips.gif")
    assert gif.n_frames == 4 and gif.size[0] > gif.size[1]  # the frames of a grid of 2 rows of 3 clips
    (tmp_path / "bad.json").write_text(json.dumps({"weak_patch_sizes": [[2, 3, 2]]}))
    assert main(["train", "flexify", "--base", str(tmp_path / "base" / "model"), "--data", "moving-digits",
                 "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "bad")]) == 2


def test_the_papers_per_size_norms_and_biases_act_on_video_sizes() -> None:
    model = random_model().with_patch_sizes(WEAK, weak_bias=True, weak_norms=True)
    x, t, y = inputs()
    with torch.no_grad():
        before = model(x, t, y, (2, 2, 2))
        model.blocks[0].norm1.residual["2x2x2"].normal_()
        assert not torch.allclose(model(x, t, y, (2, 2, 2)), before)
        assert "x_embedder.bias_residual.1x4x4" in model.state_dict()


def test_a_short_search_over_video_sizes_under_an_fvd_bound_exports_a_3d_schedule(tmp_path, monkeypatch) -> None:
    """per_step space over the model's (t, h, w) sizes, FID in a VideoFeatureNet's space (FVD) against reference
    statistics of clips, 3 trials, held-out confirmation, export: best.json holds a version-3 schedule."""
    from flexisearch.cli import main
    from flexisearch.metrics.fid import compute_reference_stats
    from flexisearch.metrics.video_featnet import VideoFeatureNet, VideoFeatureNetConfig

    monkeypatch.chdir(tmp_path)
    flexified(random_model()).save_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    net = VideoFeatureNet(VideoFeatureNetConfig(frames=4, image_size=8, in_channels=2, num_classes=3,
                                                widths=(4, 4, 4), feature_dim=6)).eval()
    net.save_pretrained(tmp_path / "net")
    clips = torch.randn(40, 2, 4, 8, 8, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    compute_reference_stats(net, clips, dataset="noise", split="train").save(tmp_path / "stats")
    (tmp_path / "space.yaml").write_text(json.dumps({
        "study": "video", "model": "model", "feature_net": "net", "reference_stats": "stats",
        "metric": {"name": "fid", "max": 1e6}, "space": {"type": "per_step", "num_steps": 3, "solver": "euler"},
        "reference": {"num_steps": 3, "guidance_scale": 2.0, "solver": "euler"}, "search_samples": 8,
        "heldout_samples": 8, "bootstrap": 5, "n_trials": 3, "cost": {"repeats": 1}}))
    assert main(["search", "--space", "space.yaml", "--quiet"]) == 0
    best = json.loads((tmp_path / "runs" / "video" / "best.json").read_text())
    assert best["schedule"]["version"] == 3 and all(len(p) == 3 for p in best["schedule"]["cond"])
    assert best["cost"]["fraction_of_static_native"] <= 1.0


def test_a_cost_table_of_video_sizes_round_trips_and_prices_a_3d_schedule(tmp_path) -> None:
    """flexisearch profile on a video model: (t, h, w) sizes are lists in the JSON and tuples again when read."""
    from flexisearch.sampling.latency import CostTable, profile
    from flexisearch.sampling.schedule import Schedule

    model = flexified(random_model())
    table = profile(model, [2], ["euler"], warmup=1, repeats=1)
    assert set(table.steps) == {(c, u, 2) for c in model.config.patch_sizes for u in (None, *model.config.patch_sizes)}
    table.save(tmp_path / "t.json")
    assert CostTable.load(tmp_path / "t.json") == table
    s = Schedule(cond=((2, 2, 2), (1, 4, 4), NATIVE), uncond=((1, 4, 4), NATIVE, NATIVE), guidance_scale=2.0,
                 solver="euler", model="x")
    want = (table.setup[2].median + table.steps[((2, 2, 2), (1, 4, 4), 2)].median
            + table.steps[((1, 4, 4), NATIVE, 2)].median + table.steps[(NATIVE, NATIVE, 2)].median
            + 3 * table.solvers[("euler", 2)].median)
    assert table.batch_seconds(s, 2) == pytest.approx(want, rel=1e-12)
    doc = json.loads((tmp_path / "t.json").read_text())
    doc["steps"][0]["cond"] = [1, 0, 2]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"field 'cond' is \[1, 0, 2\], expected a positive integer or a list of them"):
        CostTable.load(tmp_path / "bad.json")


def test_the_video_default_search_runs_on_the_shipped_assets(tmp_path, monkeypatch) -> None:
    """search_spaces/video-default.yaml, shrunk to 4 steps, 2 trials and 16 clips: the shipped video model under the
    shipped FVD net and statistics (embedded: specs) exports a version-3 schedule with held-out FVD and digit accuracy
    intervals, and `flexisearch sample` writes its clips as an animated GIF."""
    from PIL import Image

    from flexisearch.cli import main

    monkeypatch.chdir(tmp_path)
    shrink = ["n_trials=2", "search_samples=16", "heldout_samples=16", "fidelities=[]", "space.num_steps=4",
              "reference.num_steps=4", "bootstrap=10", "cost.batch_size=2", "cost.repeats=1"]
    assert main(["search", "--space", "video-default", "--quiet", *[a for s in shrink for a in ("--set", s)]]) == 0
    best = json.loads((tmp_path / "runs" / "video-default" / "best.json").read_text())
    assert best["schedule"]["version"] == 3 and len(best["schedule"]["cond"]) == 4
    assert all(tuple(p) in {(1, 2, 2), (2, 2, 2), (1, 4, 4)} for p in best["schedule"]["cond"] + best["schedule"]["uncond"])
    for name in ("fid", "class_accuracy"):
        h = best["qualities"][name]["heldout"]
        assert h["n"] == 16 and h["ci95"][0] <= h["value"] <= h["ci95"][1]
    assert main(["sample", "--model", "embedded:video/flexidit-moving-digits", "--schedule",
                 "runs/video-default/best.json", "--n", "1", "--out", "clips.gif", "--quiet"]) == 0
    with Image.open(tmp_path / "clips.gif") as gif:
        assert gif.n_frames == 8 and gif.is_animated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clips.gif", "runs"]
