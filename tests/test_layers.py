"""Identities the flexible tokenizer, de-tokenizer and positions must satisfy (layers.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding

from flexisearch.models.dit import FlexiDiT, FlexiDiTConfig
from flexisearch.models.layers import (
    FlexiDeEmbed,
    FlexiPatchEmbed,
    LoRALinear,
    pi_resize_matrix,
    resize_matrix,
    sincos_2d,
    timestep_embedding,
)

NATIVE, WEAK = 2, 4


def upsample_patch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of one (..., p, p) patch on its own (half-pixel centres, no antialiasing)."""
    lead = x.shape[:-2]
    out = F.interpolate(x.reshape(-1, 1, *x.shape[-2:]), size=(size, size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, size, size)


def upsample_patchwise(z: torch.Tensor, p_from: int, p_to: int) -> torch.Tensor:
    """Image whose every p_to x p_to patch is the resized matching p_from x p_from patch of z."""
    n, c, h, w = z.shape
    gh, gw = h // p_from, w // p_from
    patches = z.reshape(n, c, gh, p_from, gw, p_from).permute(0, 1, 2, 4, 3, 5)  # (n, c, gh, gw, p, p)
    big = upsample_patch(patches, p_to)
    return big.permute(0, 1, 2, 4, 3, 5).reshape(n, c, gh * p_to, gw * p_to)


def test_resize_matrix_is_bilinear_resize() -> None:
    x = torch.randn(5, NATIVE, NATIVE, dtype=torch.float64)
    b = resize_matrix(NATIVE, WEAK)
    assert torch.allclose(upsample_patch(x, WEAK).reshape(5, -1), x.reshape(5, -1) @ b.T, atol=1e-12)


def test_pi_resize_preserves_inner_products() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, NATIVE, NATIVE, generator=gen, dtype=torch.float64)
    w = torch.randn(50, NATIVE, NATIVE, generator=gen, dtype=torch.float64)
    w_big = (w.reshape(50, -1) @ pi_resize_matrix(NATIVE, WEAK).T).reshape(50, WEAK, WEAK)
    lhs = (upsample_patch(x, WEAK) * w_big).sum(dim=(1, 2))
    assert torch.allclose(lhs, (x * w).sum(dim=(1, 2)), atol=1e-12)


@pytest.mark.parametrize("init_std", [0.0, 0.5])
def test_patch_embed_of_upsampled_image_equals_native_tokens(init_std: float) -> None:
    """embed(p=4) of a 16x16 image made of upsampled 2x2 patches == embed(p=2) of the 8x8 image."""
    torch.manual_seed(1)
    embed = FlexiPatchEmbed(in_channels=3, hidden=12, native=NATIVE).double()
    embed.add_patch_size(WEAK, init_std=init_std)
    with torch.no_grad():
        embed.proj.bias.normal_()
    assert (embed.residual[str(WEAK)].abs().max() > 0) == (init_std > 0)
    z = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    image = upsample_patchwise(z, NATIVE, WEAK)
    assert image.shape == (2, 3, 16, 16)
    with torch.no_grad():
        weak, native = embed(image, WEAK), embed(z, NATIVE)
    assert weak.shape == native.shape == (2, 16, 12)
    assert torch.allclose(weak, native, atol=1e-10)


@pytest.mark.parametrize("init_std", [0.0, 0.5])
def test_deembed_downsamples_to_native(init_std: float) -> None:
    """pinv(B) @ weight(p) == native weight: a weak token's patch, projected back, is the native one."""
    torch.manual_seed(2)
    de = FlexiDeEmbed(hidden=12, out_channels=3, native=NATIVE).double()
    with torch.no_grad():
        de.linear.weight.normal_()
        de.linear.bias.normal_()
    de.add_patch_size(WEAK, init_std=init_std)
    down = torch.linalg.pinv(resize_matrix(NATIVE, WEAK))  # (native^2, p^2)
    w, bias = de.weight_bias(WEAK)
    n0 = NATIVE * NATIVE
    with torch.no_grad():
        assert torch.allclose(down @ w.reshape(WEAK * WEAK, -1), de.linear.weight.reshape(n0, -1), atol=1e-10)
        assert torch.allclose(down @ bias.reshape(WEAK * WEAK, -1), de.linear.bias.reshape(n0, -1), atol=1e-10)
        # The same on outputs: every 4x4 output patch, downsampled, is the 2x2 native output patch.
        tokens = torch.randn(2, 9, 12, dtype=torch.float64)
        weak = de(tokens, WEAK, (3, 3)).reshape(2, 3, 3, WEAK, 3, WEAK).permute(0, 1, 2, 4, 3, 5)
        native = de(tokens, NATIVE, (3, 3)).reshape(2, 3, 3, NATIVE, 3, NATIVE).permute(0, 1, 2, 4, 3, 5)
        projected = weak.reshape(2, 3, 3, 3, -1) @ down.T
        assert torch.allclose(projected, native.reshape(2, 3, 3, 3, -1), atol=1e-10)
        if init_std == 0:  # without the residual a weak patch is exactly the upsampled native patch
            assert torch.allclose(weak, upsample_patch(native, WEAK), atol=1e-10)


def test_weak_kernels_are_the_resized_native_ones_plus_their_residuals() -> None:
    """Any input, residuals included: embedding at p uses PI-resize(native kernel) + residual, with the resize
    built here from F.interpolate; de-embedding gives each token's native patch upsampled (bias included) plus
    the residual's patch."""
    torch.manual_seed(4)
    embed = FlexiPatchEmbed(in_channels=3, hidden=12, native=NATIVE).double()
    embed.add_patch_size(WEAK, init_std=0.5)
    de = FlexiDeEmbed(hidden=12, out_channels=3, native=NATIVE).double()
    de.add_patch_size(WEAK, init_std=0.5)
    with torch.no_grad():
        for t in (embed.proj.bias, de.linear.weight, de.linear.bias):
            t.normal_()
    eye = torch.eye(NATIVE * NATIVE, dtype=torch.float64).reshape(-1, NATIVE, NATIVE)
    b = upsample_patch(eye, WEAK).reshape(NATIVE * NATIVE, -1).T  # (p^2, native^2): column j = upsampled e_j
    kernel = (embed.proj.weight.flatten(2) @ torch.linalg.pinv(b.T).T).reshape(12, 3, WEAK, WEAK)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    want = F.conv2d(x, kernel + embed.residual[str(WEAK)], embed.proj.bias, stride=WEAK).flatten(2).transpose(1, 2)
    tokens = torch.randn(5, 1, 12, dtype=torch.float64)
    native = de.linear(tokens[:, 0]).reshape(5, NATIVE, NATIVE, 3).permute(0, 3, 1, 2)  # (n, c, p0, p0)
    residual = (tokens[:, 0] @ de.residual[str(WEAK)].T).reshape(5, WEAK, WEAK, 3).permute(0, 3, 1, 2)
    with torch.no_grad():
        torch.testing.assert_close(embed(x, WEAK), want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(de(tokens, WEAK, (1, 1)), upsample_patch(native, WEAK) + residual, rtol=1e-10,
                                   atol=1e-10)


def randomized_model(config: FlexiDiTConfig) -> FlexiDiT:
    model = FlexiDiT(config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised layers included
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_native_path_unchanged_by_new_patch_sizes(lora_rank: int) -> None:
    model = randomized_model(FlexiDiTConfig(input_size=8, hidden_size=16, depth=2, num_heads=2, num_classes=5))
    flexi = model.with_patch_sizes((WEAK,), init_std=0.1, lora_rank=lora_rank)
    assert flexi.config.patch_sizes == (NATIVE, WEAK)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 400, 999]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        assert torch.equal(flexi(x, t, y, patch_size=NATIVE), model(x, t, y))
        assert flexi(x, t, y, patch_size=WEAK).shape == (3, 8, 8, 8)


def sincos_np(dim: int, coords: np.ndarray) -> np.ndarray:
    """DiT's (MAE's) sin-cos embedding of (x, y) coordinates: first half x (column), second half y (row)."""
    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    return np.concatenate([one_axis(coords[:, 0]), one_axis(coords[:, 1])], axis=1)


def test_native_positions_match_dit() -> None:
    grid = 4
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    coords = np.stack([cols.reshape(-1), rows.reshape(-1)], axis=1).astype(np.float64)  # token order: row-major
    assert np.allclose(sincos_2d(32, grid, grid).numpy(), sincos_np(32, coords), atol=1e-6)


def test_weak_token_sits_at_mean_of_native_tokens_it_covers() -> None:
    cfg = FlexiDiTConfig(input_size=16, hidden_size=32, depth=1, num_heads=2, num_classes=5, extra_patch_sizes=(WEAK, 8))
    model = FlexiDiT(cfg)
    native_grid = cfg.input_size // NATIVE
    for p in (WEAK, 8):
        s, grid = p // NATIVE, cfg.input_size // p
        coords = []
        for i in range(grid):  # row of the weak token
            for j in range(grid):  # column
                covered = [(c, r) for r in range(i * s, (i + 1) * s) for c in range(j * s, (j + 1) * s)]
                assert all(r < native_grid and c < native_grid for c, r in covered)
                coords.append(np.mean(covered, axis=0))
        assert np.allclose(coords[0], [(s - 1) / 2] * 2)  # e.g. the first p=4 token sits at (0.5, 0.5)
        want = sincos_np(cfg.hidden_size, np.array(coords))
        assert np.allclose(getattr(model, f"pos_embed_{p}").numpy(), want, atol=1e-6)


@pytest.mark.parametrize("shift", [0, 1])
def test_timestep_features(shift: int) -> None:
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    got = timestep_embedding(t, 256, freq_shift=shift)
    if shift:  # diffusers' DiT: Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)
        want = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    else:  # the original DiT: frequencies exp(-log(10000) k / half), then [cos, sin]
        args = t[:, None] * torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)[None]
        want = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("rank,alpha", [(4, 4.0), (2, 8.0)])
def test_lora_adapter_starts_as_the_identity_update_and_scales_by_alpha_over_rank(rank: int, alpha: float) -> None:
    """LoRA (Hu et al. 2021, as in peft): A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0, so the
    adapter starts as no change; the update is (alpha / rank) B A x, and only the named adapter applies."""
    torch.manual_seed(0)
    layer = LoRALinear(256, 48)
    layer.add_adapter("p4", rank, alpha)
    a, b = layer.lora_a["p4"], layer.lora_b["p4"]
    bound = 1 / math.sqrt(256)
    assert a.shape == (rank, 256) and b.shape == (48, rank) and torch.equal(b, torch.zeros_like(b))
    assert 0.98 * bound < a.abs().max().item() <= bound
    assert a.device == layer.weight.device and b.device == layer.weight.device
    x = torch.randn(5, 256)
    assert torch.equal(layer(x, "p4"), F.linear(x, layer.weight, layer.bias))
    with torch.no_grad():
        b.normal_()
    want = F.linear(x, layer.weight, layer.bias) + (alpha / rank) * x @ a.T @ b.T
    torch.testing.assert_close(layer(x, "p4"), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert torch.equal(layer(x, "p2"), F.linear(x, layer.weight, layer.bias))


def test_weak_sizes_built_from_a_config_start_as_exact_pi_resize() -> None:
    """Sizes given at construction (a config with extra patch sizes) get zero residuals: before their weights are
    loaded or trained they are exactly the PI-resized native kernels."""
    embed = FlexiPatchEmbed(in_channels=3, hidden=12, native=NATIVE, extra=(WEAK,))
    de = FlexiDeEmbed(hidden=12, out_channels=3, native=NATIVE, extra=(WEAK,))
    assert embed.residual[str(WEAK)].shape == (12, 3, WEAK, WEAK) and not embed.residual[str(WEAK)].any()
    assert de.residual[str(WEAK)].shape == (WEAK * WEAK * 3, 12) and not de.residual[str(WEAK)].any()


def test_each_weak_size_keeps_its_own_derived_weights() -> None:
    """Two weak sizes (and two LoRA adapters) in one layer: each size's kernels, de-embedding and merged weight
    are its own, whichever was built first."""
    torch.manual_seed(5)
    embed = FlexiPatchEmbed(in_channels=1, hidden=8, native=NATIVE, extra=(4, 8))
    de = FlexiDeEmbed(hidden=8, out_channels=1, native=NATIVE, extra=(4, 8))
    lin = LoRALinear(8, 8)
    for key in ("4", "8"):
        lin.add_adapter(key, 2, 2.0)
        with torch.no_grad():
            lin.lora_b[key].normal_()
    lin.merge = True
    x, tokens = torch.randn(1, 1, 16, 16), torch.randn(1, 4, 8)
    with torch.no_grad():
        for p in (4, 8, 4):
            assert embed(x, p).shape == (1, (16 // p) ** 2, 8) and de(tokens[:, :1], p, (1, 1)).shape == (1, 1, p, p)
        for key in ("4", "8", "4"):
            want = F.linear(tokens, lin.weight, lin.bias) + 1.0 * tokens @ lin.lora_a[key].T @ lin.lora_b[key].T
            torch.testing.assert_close(lin(tokens, key), want, rtol=1e-5, atol=1e-5)


def test_weak_biases_and_norms_start_at_todays_weak_path_and_leave_the_native_path() -> None:
    """The paper's options: a bias per weak embed / de-embed and an affine per weak size on every norm, zero at
    init (the weak path is exactly the one without them), trained apart from the native path; stored only when
    set, so a model without them keeps its config and fingerprint."""
    from conftest import random_flexidit

    base = random_flexidit(extra=())
    plain = base.with_patch_sizes((4,), init_std=0.05)
    torch.manual_seed(0)
    plain = base.with_patch_sizes((4,), init_std=0.05)
    torch.manual_seed(0)
    rich = base.with_patch_sizes((4,), init_std=0.05, weak_bias=True, weak_norms=True)
    assert "weak_bias" not in plain.config.to_dict() and rich.config.to_dict()["weak_norms"] is True
    added = sorted(set(rich.state_dict()) - set(plain.state_dict()))
    assert "x_embedder.bias_residual.4" in added and "final_layer.deembed.bias_residual.4" in added
    assert "blocks.1.norm2.residual.4" in added and "final_layer.norm_final.residual.4" in added
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(rich(x, t, y, 4), plain(x, t, y, 4))
        for name in added:
            rich.get_parameter(name).normal_(0, 0.1)
        assert torch.equal(rich(x, t, y, 2), plain(x, t, y, 2)) and not torch.allclose(rich(x, t, y, 4), plain(x, t, y, 4))
