"""Conversion of diffusers and facebookresearch/DiT weights into FlexiDiT, checked against the sources."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from safetensors.torch import save_file
from torch import nn

from flexisearch.errors import UserError
from flexisearch.models.convert import (
    from_diffusers_dit,
    from_original_state_dict,
    infer_original_config,
    load_original_checkpoint,
    read_checkpoint,
    to_diffusers_dit,
)
from flexisearch.models.dit import FlexiDiT, FlexiDiTConfig

NUM_CLASSES = 5
TOL = 1e-5


def randomize_(module: nn.Module, seed: int, std: float = 0.2) -> None:
    """Overwrite every parameter (zero-initialised ones included) with N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def inputs(n_real: int = 3, size: int = 8, channels: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch whose labels are real classes plus the null class, over early and late timesteps."""
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(n_real + 1, channels, size, size, generator=gen)
    t = torch.tensor([0, 17, 500, 999][: n_real + 1])
    y = torch.tensor([*range(n_real), NUM_CLASSES])  # last one is the null label
    return x, t, y


# ---- diffusers ------------------------------------------------------------------------------

def diffusers_dit(out_channels: int, norm_eps: float = 1e-5, seed: int = 0) -> DiTTransformer2DModel:
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=out_channels, num_layers=2,
        sample_size=8, num_embeds_ada_norm=NUM_CLASSES, norm_eps=norm_eps,
    )
    randomize_(model, seed)
    shared = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:  # as in every real DiT checkpoint
        block.norm1.emb.load_state_dict(shared)
    return model.eval()


@pytest.mark.parametrize("out_channels,norm_eps", [(8, 1e-5), (4, 1e-2)])
def test_diffusers_outputs_match(out_channels: int, norm_eps: float) -> None:
    ref = diffusers_dit(out_channels, norm_eps)
    flexi = from_diffusers_dit(ref)
    cfg = flexi.config
    assert (cfg.learn_sigma, cfg.timestep_freq_shift, cfg.mlp_norm_eps) == (out_channels == 8, 1.0, norm_eps)
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.num_classes, cfg.input_size) == (16, 2, 2, NUM_CLASSES, 8)
    x, t, y = inputs()
    with torch.no_grad():
        want = ref(x, timestep=t, class_labels=y).sample
        got = flexi(x, t, y)
    assert got.shape == want.shape == (4, out_channels, 8, 8)
    assert (got - want).abs().max().item() <= TOL


def test_diffusers_round_trip() -> None:
    ref = diffusers_dit(8)
    back = to_diffusers_dit(from_diffusers_dit(ref))
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(back(x, timestep=t, class_labels=y).sample, ref(x, timestep=t, class_labels=y).sample)


def test_to_diffusers_refuses_original_timestep_features() -> None:
    with pytest.raises(UserError, match="timestep_freq_shift"):
        to_diffusers_dit(FlexiDiT(FlexiDiTConfig(input_size=8, hidden_size=16, depth=1, num_heads=2)))


def test_unequal_block_embedders_refused() -> None:
    ref = diffusers_dit(8)
    with torch.no_grad():
        ref.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight[0, 0] += 1.0
    with pytest.raises(UserError, match="block 1's conditioning embedder") as info:
        from_diffusers_dit(ref)
    assert "\n" not in str(info.value)


def test_label_table_without_null_class_refused() -> None:
    ref = diffusers_dit(8)
    table = LabelEmbedding(NUM_CLASSES, 16, dropout_prob=0.0)  # class dropout 0: no null row
    for block in ref.transformer_blocks:
        block.norm1.emb.class_embedder = table
    with pytest.raises(UserError, match="null-class row"):
        from_diffusers_dit(ref)


# ---- facebookresearch/DiT: an independent reference of the original module -----------------

def sincos_1d_np(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_np(dim: int, grid: int) -> np.ndarray:
    """The original table: meshgrid(w, h), so the first half of the channels encodes the column."""
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([sincos_1d_np(dim // 2, gw), sincos_1d_np(dim // 2, gh)], axis=1)


class RefTimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.freq_dim = freq_dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class RefLabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class RefAttention(nn.Module):
    """timm's Attention, written out: explicit softmax(q k^T / sqrt(d)) v."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def ref_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = RefAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = RefMlp(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(ref_modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(ref_modulate(self.norm2(x), s2, sc2))


class RefFinalLayer(nn.Module):
    def __init__(self, dim: int, p: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, p * p * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(ref_modulate(self.norm_final(x), shift, scale))


class RefPatchEmbed(nn.Module):
    def __init__(self, p: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class RefDiT(nn.Module):
    """facebookresearch/DiT's DiT (eval mode, no label dropout), with its state-dict layout."""

    def __init__(self, input_size: int = 8, p: int = 2, in_channels: int = 4, dim: int = 16, depth: int = 2,
                 heads: int = 2, num_classes: int = NUM_CLASSES, learn_sigma: bool = True):
        super().__init__()
        self.p, self.out_channels = p, in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = RefPatchEmbed(p, in_channels, dim)
        self.t_embedder = RefTimestepEmbedder(dim)
        self.y_embedder = RefLabelEmbedder(num_classes, dim)
        pos = sincos_2d_np(dim, input_size // p)
        self.pos_embed = nn.Parameter(torch.from_numpy(pos).float().unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList(RefBlock(dim, heads) for _ in range(depth))
        self.final_layer = RefFinalLayer(dim, p, self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        h = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, h, self.p, self.p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.out_channels, h * self.p, h * self.p)


def ref_dit(learn_sigma: bool = True, seed: int = 1) -> RefDiT:
    ref = RefDiT(learn_sigma=learn_sigma)
    pos = ref.pos_embed.detach().clone()
    randomize_(ref, seed)
    ref.pos_embed.data.copy_(pos)  # a fixed table, not a weight
    return ref.eval()


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_original_outputs_match(learn_sigma: bool) -> None:
    ref = ref_dit(learn_sigma)
    state = ref.state_dict()
    cfg = infer_original_config(state, num_heads=2)
    assert (cfg.input_size, cfg.in_channels, cfg.hidden_size, cfg.depth, cfg.patch_size) == (8, 4, 16, 2, 2)
    assert (cfg.num_classes, cfg.learn_sigma, cfg.mlp_ratio, cfg.timestep_freq_shift) == (NUM_CLASSES, learn_sigma, 4.0, 0.0)
    flexi = from_original_state_dict(state, cfg)
    x, t, y = inputs()
    t = t.float() + 0.25  # fractional timesteps are allowed too
    with torch.no_grad():
        assert (flexi(x, t, y) - ref(x, t, y)).abs().max().item() <= TOL


@pytest.mark.parametrize("layout", ["plain", "training"])
def test_load_pt_checkpoint(tmp_path, layout: str) -> None:
    ref = ref_dit()
    state = ref.state_dict()
    if layout == "training":  # train.py's layout: raw and EMA weights, optimizer state, argparse args
        raw = {k: torch.zeros_like(v) for k, v in state.items()}
        state = {"model": raw, "ema": state, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                 "args": argparse.Namespace(model="DiT-S/2", lr=1e-4)}
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    flexi = load_original_checkpoint(path, infer_original_config(ref.state_dict(), num_heads=2))
    x, t, y = inputs()
    with torch.no_grad():
        assert (flexi(x, t, y) - ref(x, t, y)).abs().max().item() <= TOL


def test_load_safetensors_checkpoint(tmp_path) -> None:
    ref = ref_dit(learn_sigma=False)
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    state = read_checkpoint(path)
    flexi = from_original_state_dict(state, infer_original_config(state, num_heads=2))
    x, t, y = inputs()
    with torch.no_grad():
        assert (flexi(x, t, y) - ref(x, t, y)).abs().max().item() <= TOL


class NotATensor:
    """Stands in for arbitrary pickled code that weights_only loading must refuse."""


def test_pickled_object_refused(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"x_embedder.proj.weight": NotATensor()}, path)
    with pytest.raises(UserError, match="refused") as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value)


def test_unreadable_files_refused(tmp_path) -> None:
    with pytest.raises(UserError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        read_checkpoint(garbage)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(UserError, match="expected a state dict"):
        read_checkpoint(tmp_path / "list.pt")


@pytest.mark.parametrize("edit,key", [
    ("drop", "blocks.1.mlp.fc2.bias"),
    ("drop", "y_embedder.embedding_table.weight"),
    ("add", "blocks.0.attn.q_norm.weight"),
    ("reshape", "final_layer.adaLN_modulation.1.weight"),
    ("reshape", "final_layer.linear.weight"),
    ("reshape", "pos_embed"),
])
def test_bad_original_state_dicts_name_the_key(edit: str, key: str) -> None:
    state = ref_dit().state_dict()
    cfg = infer_original_config(state, num_heads=2)
    if edit == "drop":
        del state[key]
    elif edit == "add":
        state[key] = torch.ones(16)
    else:
        state[key] = state[key][..., :-1]
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as info:
        from_original_state_dict(state, cfg)
    assert "\n" not in str(info.value)


def test_preset_checkpoint_at_other_resolution(tmp_path) -> None:
    """A DiT-S/8 checkpoint for 16x16 latents (128 px) loads under its preset name."""
    ref = RefDiT(input_size=16, p=8, dim=384, depth=12, heads=6, num_classes=1000).eval()  # default init: no zeros
    path = tmp_path / "DiT-S-8-128.pt"
    torch.save(ref.state_dict(), path)
    flexi = load_original_checkpoint(path, "DiT-S/8")
    assert (flexi.config.input_size, flexi.config.num_heads, flexi.config.num_classes) == (16, 6, 1000)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    t, y = torch.tensor([3, 900]), torch.tensor([7, 1000])
    with torch.no_grad():
        assert (flexi(x, t, y) - ref(x, t, y)).abs().max().item() <= TOL


def test_preset_must_fit_checkpoint(tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(ref_dit().state_dict(), path)
    with pytest.raises(UserError, match="hidden_size 16, preset DiT-S/2 expects 384"):
        load_original_checkpoint(path, "DiT-S/2")
    with pytest.raises(UserError, match="unknown preset"):
        load_original_checkpoint(path, "DiT-M/2")
