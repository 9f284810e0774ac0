"""Wan 2.1 text-to-video as a flexible video DiT (wan.py, convert.from_diffusers_wan): exact conversion at the
native size, a bit-identical native path after flexifying, rotary positions of weak tokens, save/load, refusals
and the FLOPs count."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flexisearch.errors import UserError
from flexisearch.models.convert import from_diffusers_wan
from flexisearch.models.flops import forward_flops
from flexisearch.models.layers import size_key
from flexisearch.models.wan import FlexiWan, rotary_angles

NATIVE = (1, 2, 2)
WEAK = ((2, 2, 2), (1, 4, 4))
HEAD_DIM = 16  # Wan's rotary split: 8 channels for time, 4 each for height and width
WAN = {"patch_size": NATIVE, "num_attention_heads": 2, "attention_head_dim": HEAD_DIM, "in_channels": 4,
       "out_channels": 4, "text_dim": 12, "freq_dim": 256, "ffn_dim": 48, "num_layers": 2, "rope_max_seq_len": 32}
SHAPE = (4, 8, 8)  # latent frames, height, width


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)


def random_wan(**changes) -> WanTransformer3DModel:
    """A tiny diffusers Wan with every weight random (norm gains, tables and the head included: nothing zero)."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**WAN, **changes})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def inputs(shape: tuple[int, int, int] = SHAPE, n: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, WAN["in_channels"], *shape, generator=gen)
    t = torch.tensor([30.0, 870.5])[:n]
    text = torch.randn(n, 6, WAN["text_dim"], generator=gen)
    return x, t, text


def flexified(base: FlexiWan) -> FlexiWan:
    """base with the weak sizes, residual noise, and random (as if trained) LoRA, patch-size embeddings, weak biases
    and per-size norms."""
    torch.manual_seed(1)
    model = base.with_patch_sizes(WEAK, init_std=0.05, lora_rank=4, lora_alpha=4.0, weak_bias=True, weak_norms=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in ("lora_b", "patch_size_embed", "bias_residual", "norm1.residual")):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def converted() -> tuple[WanTransformer3DModel, FlexiWan]:
    wan = random_wan()
    return wan, from_diffusers_wan(wan, text_len=6, num_frames=SHAPE[0], input_size=SHAPE[1])


@pytest.mark.parametrize("cross_attn_norm", [True, False])
@torch.no_grad()
def test_conversion_is_exact_at_native(cross_attn_norm: bool) -> None:
    wan = random_wan(cross_attn_norm=cross_attn_norm)
    flexi = from_diffusers_wan(wan, text_len=6)
    assert flexi.config.cross_attn_norm is cross_attn_norm and flexi.config.ffn_dim == WAN["ffn_dim"]
    for shape in (SHAPE, (3, 6, 10)):  # the default sample shape and an odd, non-square one
        x, t, text = inputs(shape)
        ref = wan(x, t, text).sample
        out = flexi.forward_text(x, t, text, None)
        assert out.shape == ref.shape == x.shape
        assert (out - ref).abs().max() <= 1e-5, (shape, (out - ref).abs().max())
    # Masked text tokens are the zero vectors Wan's pipeline pads prompts with (Wan itself attends to all).
    mask = torch.ones(2, 6)
    mask[0, 4:], mask[1, 2:] = 0, 0
    padded = text * mask[..., None]
    assert (flexi.forward_text(x, t, text, mask) - wan(x, t, padded).sample).abs().max() <= 1e-5


@torch.no_grad()
def test_native_path_is_bit_identical_after_flexifying_and_weak_sizes_run(converted) -> None:
    _, base = converted
    model = flexified(base)
    x, t, text = inputs()
    assert torch.equal(model.forward_text(x, t, text, None), base.forward_text(x, t, text, None))
    for p in WEAK:
        out = model.forward_text(x, t, text, None, patch_size=p)
        assert out.shape == x.shape and out.isfinite().all(), p
        model.blocks[0].norm1.residual[size_key(p)].zero_()  # the per-size norm is in the weak path
        assert not torch.equal(model.forward_text(x, t, text, None, patch_size=p), out), p
    lora = {n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_a." in n}
    assert lora == {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    with pytest.raises(ValueError, match="not supported"):
        model.forward_text(x, t, text, None, patch_size=(2, 4, 4))


def test_native_rotary_angles_are_diffusers_wan_rope() -> None:
    rope = WanRotaryPosEmbed(HEAD_DIM, NATIVE, max_seq_len=32)
    cos, sin = rope(torch.zeros(1, 1, *SHAPE))  # (1, tokens, 1, head_dim), each angle twice
    angles = rotary_angles(HEAD_DIM, (4, 4, 4))
    assert torch.equal(angles.cos().float().repeat_interleave(2, dim=1), cos[0, :, 0])
    assert torch.equal(angles.sin().float().repeat_interleave(2, dim=1), sin[0, :, 0])
    # Wan's split: pairs 0-3 turn with time, 4-5 with height, 6-7 with width.
    grid = angles.reshape(4, 4, 4, -1)
    assert torch.equal(grid[1, 0, 0, :4], 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    assert (grid[1, 0, 0, 4:] == 0).all() and (grid[0, 2, 3, :4] == 0).all()


@pytest.mark.parametrize("weak", WEAK)
def test_weak_token_turns_by_the_centre_of_the_native_tokens_it_covers(weak: tuple[int, int, int]) -> None:
    native = rotary_angles(HEAD_DIM, (4, 4, 4)).reshape(4, 4, 4, -1)
    grid = tuple(4 // (w // n) for w, n in zip(weak, NATIVE))
    stride = tuple(float(w // n) for w, n in zip(weak, NATIVE))
    angles = rotary_angles(HEAD_DIM, grid, stride).reshape(*grid, -1)
    st, sh, sw = (int(s) for s in stride)
    for i in range(grid[0]):
        for j in range(grid[1]):
            for k in range(grid[2]):
                covered = native[i * st:(i + 1) * st, j * sh:(j + 1) * sh, k * sw:(k + 1) * sw]
                torch.testing.assert_close(angles[i, j, k], covered.mean(dim=(0, 1, 2)), rtol=0, atol=1e-12)


@torch.no_grad()
def test_save_load_round_trip(converted, tmp_path) -> None:
    _, base = converted
    model = flexified(base)
    gen = torch.Generator().manual_seed(3)
    model.set_prompts(torch.randn(2, 5, 12, generator=gen), torch.ones(2, 5), ["a digit", "two digits"],
                      torch.randn(1, 12, generator=gen), torch.ones(1), num_search=1)
    model.save_pretrained(tmp_path)
    loaded = FlexiWan.from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.captions == model.captions
    assert loaded.fingerprint() == model.fingerprint() != base.fingerprint()
    x, t, _ = inputs()
    y = torch.tensor([0, model.null_class])
    for p in (NATIVE, *WEAK):
        assert torch.equal(loaded(x, t, y, p), model(x, t, y, p)), p


@pytest.mark.parametrize("change, field", [
    ({"image_dim": 8}, "image_dim"),
    ({"added_kv_proj_dim": 8}, "added_kv_proj_dim"),
    ({"qk_norm": None}, "qk_norm"),
    ({"out_channels": 5}, "out_channels"),
])
def test_refused_configs_are_one_line_and_name_the_field(change: dict, field: str) -> None:
    with pytest.raises(UserError) as e:
        from_diffusers_wan(WanTransformer3DModel(**{**WAN, **change}))
    assert f"'{field}'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("p", [NATIVE, *WEAK])
@torch.no_grad()
def test_analytic_flops_equal_the_flop_counter(converted, p: tuple[int, int, int]) -> None:
    model = flexified(converted[1])
    x, t, _ = inputs(n=1)
    y = torch.tensor([model.null_class])
    model(x, t, y, p)  # forms the weak sizes' kernels once (layers.derived): a weight transform, not counted
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y, p)
    assert counter.get_total_flops() == forward_flops(model.config, p)
