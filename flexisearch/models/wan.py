"""FlexiWan: Wan 2.1 text-to-video (diffusers' WanTransformer3DModel) as a flexible video DiT.

Architecture (Wan, Wan Team 2025; diffusers' transformer_wan.py), with diffusers' weight layout:
  - Conv3d patch embedding of (t, h, w) patches, native (1, 2, 2); no additive positions.
  - timestep: sinusoidal features ([cos, sin]), SiLU MLP -> e, one shared linear SiLU(e) -> 6*hidden, and per
    block a learned `scale_shift_table` (1 x 6 x hidden) added to it; the output layer modulates with its own
    (1 x 2 x hidden) table plus e.
  - text: Linear(text_dim -> hidden), GELU(tanh), Linear; every block cross-attends to all text tokens.
  - each block: modulated, gated self-attention with an RMSNorm across heads on q and k and 3-D rotary positions;
    cross-attention (after an affine LayerNorm if cross_attn_norm; no gate) with the same q/k norms; modulated,
    gated FFN (GELU tanh).

What is flexible (the FlexiDiT paper's video recipe): the patch embedding and de-embedding (layers.FlexiPatchEmbed /
FlexiDeEmbed: the weak sizes (2, 2, 2) and (1, 4, 4) come from the native kernel by PI-resize), a learned
patch-size embedding, optional per-size norms, and per-size LoRA on self-attention (qkv, proj) and FFN (fc1, fc2).
Cross-attention is plain nn.Linear: it never carries LoRA and stays frozen. Rotary positions live in the native
token frame: a weak token is turned by the angles of the centre of the native tokens it covers.

Conditioning goes through FlexiTextDiT's prompt table (rows of text-encoder states; see text_dit.py), so
`model(x, t, y, patch_size)` works as for the other models; `forward_text` takes encoder states directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .flexible import FlexibleDiT
from .layers import (
    FlexiDeEmbed,
    FlexiPatchEmbed,
    LoRALinear,
    Mlp,
    SizeNorm,
    TimestepEmbedder,
    size_key,
)
from .text_dit import CaptionProjection, FlexiTextDiT
from .video_dit import FlexiVideoDiTConfig, Size

ROPE_THETA = 10000.0  # diffusers' WanRotaryPosEmbed default, which WanTransformer3DModel keeps


@dataclass(frozen=True)
class FlexiWanConfig(FlexiVideoDiTConfig):
    """FlexiVideoDiTConfig plus Wan's text side; Wan's names where diffusers has them. Defaults: Wan 2.1 T2V 1.3B
    (umT5-XXL text), 20 latent frames (77 video frames) of 60 x 60 latents (480 px).

    Inputs of any extent the patch sizes divide run; (num_frames, input_size) is the shape the sampler draws.
    num_classes is the number of caption rows in the prompt table (FlexiTextDiTConfig's meaning); mlp_ratio is
    Wan's ffn_dim / hidden_size (`ffn_dim` gives the integer back) and mlp_norm_eps is Wan's eps (every norm).
    """

    input_size: int = 60
    in_channels: int = 16
    hidden_size: int = 1536
    depth: int = 30
    num_heads: int = 12
    mlp_ratio: float = 8960 / 1536
    num_classes: int = 0
    learn_sigma: bool = False
    prediction: str = "flow"
    num_frames: int = 20
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    cross_attn_norm: bool = True
    num_search_prompts: int = 0  # rows [0, n) for the search, [n, num_classes) held out; 0: no split
    text_encoder: str = "umt5-xxl"

    @property
    def ffn_dim(self) -> int:
        return round(self.hidden_size * self.mlp_ratio)

    @property
    def caption_channels(self) -> int:
        """text_dim under FlexiTextDiTConfig's name, which the prompt table and the FLOPs count read."""
        return self.text_dim

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def check(self, source: str = "config") -> None:
        super().check(source)
        for name in ("text_dim", "text_len", "freq_dim", "ffn_dim"):
            if not 1 <= getattr(self, name) <= 1 << 20:
                raise UserError(f"{source}: field '{name}' is {getattr(self, name)}, expected an integer from 1 to "
                                f"{1 << 20}")
        if self.freq_dim % 2:
            raise UserError(f"{source}: field 'freq_dim' is {self.freq_dim}, expected an even number ([cos, sin])")
        if self.head_dim % 2 or self.head_dim < 6:
            raise UserError(f"{source}: field 'hidden_size' gives a head dimension of {self.head_dim} with "
                            f"num_heads={self.num_heads}; Wan's rotary split needs an even one of at least 6")
        if self.num_search_prompts > self.num_classes:
            raise UserError(f"{source}: field 'num_search_prompts' ({self.num_search_prompts}) exceeds "
                            f"num_classes ({self.num_classes})")


def rotary_angles(head_dim: int, grid: Size, stride: tuple[float, float, float] = (1.0, 1.0, 1.0),
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Rotary angles ((gt*gh*gw) x head_dim/2, float64) of tokens in the native token frame, time-major.

    Wan's split of a head's channel pairs: 2*(head_dim//6) channels each for height and width, the rest for time;
    pair i of an axis with d channels turns by position / theta^(2i/d). A token of a patch `stride` times the
    native one (per axis) sits at the centre of the native tokens it covers: coordinate (i + 0.5) * stride - 0.5,
    which is Wan's integer i at the native size (cos and sin then equal diffusers' WanRotaryPosEmbed).
    """
    spatial = 2 * (head_dim // 6)
    dims = (head_dim - 2 * spatial, spatial, spatial)
    axes = [(torch.arange(g, dtype=torch.float64, device=device) + 0.5) * s - 0.5 for g, s in zip(grid, stride)]
    coords = torch.meshgrid(*axes, indexing="ij")
    freqs = [1.0 / ROPE_THETA ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d) for d in dims]
    return torch.cat([c.reshape(-1, 1) * f for c, f in zip(coords, freqs)], dim=1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding of (N, heads, L, head_dim): channel pair (2i, 2i+1) turned by angle i."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, L, D) -> (N, heads, L, D / heads)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA of per-head tensors, heads merged back: (N, L, D)."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class WanSelfAttention(nn.Module):
    """Self-attention: fused qkv and output projection (LoRA-capable), RMSNorm across heads on q and k, rotary."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = LoRALinear(dim, 3 * dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.proj = LoRALinear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], adapter: str | None) -> torch.Tensor:
        q, k, v = self.qkv(x, adapter).chunk(3, dim=-1)
        q = rotate(_heads(self.norm_q(q), self.heads), *rope)
        k = rotate(_heads(self.norm_k(k), self.heads), *rope)
        return self.proj(_attend(q, k, _heads(v, self.heads)), adapter)


class WanCrossAttention(nn.Module):
    """Cross-attention to the text tokens, RMSNorm across heads on q and k. Plain nn.Linear: never LoRA, so a
    flexified model's cross-attention is the pre-trained one at every patch size."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(ctx).chunk(2, dim=-1)
        q = _heads(self.norm_q(self.q(x)), self.heads)
        return self.proj(_attend(q, _heads(self.norm_k(k), self.heads), _heads(v, self.heads)))


class WanBlock(nn.Module):
    """Wan block: modulated, gated self-attention; cross-attention; modulated, gated FFN."""

    def __init__(self, config: FlexiWanConfig):
        super().__init__()
        d, eps = config.hidden_size, config.mlp_norm_eps
        sizes = config.norm_sizes
        self.norm1 = SizeNorm(d, eps, sizes)
        self.attn = WanSelfAttention(d, config.num_heads, eps)
        self.norm2 = nn.LayerNorm(d, eps) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(d, config.num_heads, eps)
        self.norm3 = SizeNorm(d, eps, sizes)
        self.mlp = Mlp(d, config.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x: torch.Tensor, t6: torch.Tensor, ctx: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                adapter: str | None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.scale_shift_table + t6).chunk(6, dim=1)
        x = x + self.attn(self.norm1(x, adapter) * (1 + scale_msa) + shift_msa, rope, adapter) * gate_msa
        x = x + self.cross_attn(self.norm2(x), ctx)
        return x + self.mlp(self.norm3(x, adapter) * (1 + scale_mlp) + shift_mlp, adapter) * gate_mlp


class FlexiWan(FlexiTextDiT):
    """Wan 2.1 T2V as a flexible video DiT; forward(x, t, y, patch_size) with x (N, C, T, H, W) and y indexing the
    prompt table (FlexiTextDiT's), forward_text with text-encoder states; any (t, h, w) in config.patch_sizes."""

    config_class = FlexiWanConfig

    def __init__(self, config: FlexiWanConfig, captions: Sequence[str] | None = None):
        FlexibleDiT.__init__(self)  # FlexiTextDiT's PixArt layers are not built: only its prompt table is shared
        config.check()
        self.config = config
        d = config.hidden_size
        self.x_embedder = FlexiPatchEmbed(config.in_channels, d, config.patch_size, config.extra_patch_sizes,
                                          config.weak_bias)
        self.patch_size_embed = nn.ParameterDict(
            {size_key(p): nn.Parameter(torch.zeros(d)) for p in config.extra_patch_sizes})
        self.t_embedder = TimestepEmbedder(d, config.freq_dim, config.timestep_freq_shift)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.text_embedder = CaptionProjection(config.text_dim, d)
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.depth))
        self.norm_out = SizeNorm(d, config.mlp_norm_eps, config.norm_sizes)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, d) / d**0.5)
        self.deembed = FlexiDeEmbed(d, config.out_channels, config.patch_size, config.extra_patch_sizes,
                                    config.weak_bias)
        self._init_prompt_table(captions)
        self.initialize_weights()
        self._add_all_lora()

    def initialize_weights(self) -> None:
        """Wan's init: xavier linears and patch embedding, zero biases, small time and text MLPs, zero head."""
        self._init_linears()
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                    self.text_embedder.linear_1, self.text_embedder.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.zeros_(self.deembed.linear.weight)

    def _like(self, config: FlexiWanConfig) -> FlexiWan:
        return type(self)(config, self.captions)

    def forward_text(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None,
                     patch_size: Size | None = None) -> torch.Tensor:
        """x: (N, C, T, H, W), t: (N,) timesteps (0..1000), text: (N, L, text_dim) encoder states, text_mask: (N, L)
        1 = token. Wan attends to every text token: a masked one enters as a zero vector, as Wan's pipeline pads."""
        p = self.config.patch_size if patch_size is None else self._size(patch_size)
        if p not in self.config.patch_sizes:
            raise ValueError(f"patch size {p} not supported; model has {self.config.patch_sizes}")
        if any(s % q for s, q in zip(x.shape[2:], p)):
            raise ValueError(f"input extent {tuple(x.shape[2:])} is not divisible by patch size {p}")
        grid = tuple(s // q for s, q in zip(x.shape[2:], p))
        adapter = None if p == self.config.patch_size else size_key(p)
        h = self.x_embedder(x, p)
        if adapter is not None:
            h = h + self.patch_size_embed[adapter]
        stride = tuple(v / v0 for v, v0 in zip(p, self.config.patch_size))
        angles = rotary_angles(self.config.head_dim, grid, stride, x.device)
        rope = angles.cos().float(), angles.sin().float()
        emb = self.t_embedder(t.expand(x.shape[0]) if t.dim() == 0 else t)
        t6 = self.t_block(emb).unflatten(1, (6, -1))
        if text_mask is not None:
            text = text.masked_fill(~text_mask.bool()[..., None], 0)
        ctx = self.text_embedder(text.to(h.dtype))
        for block in self.blocks:
            h = self._block(block, h, t6, ctx, rope, adapter)
        shift, scale = (self.scale_shift_table + emb[:, None]).chunk(2, dim=1)
        return self.deembed(self.norm_out(h, adapter) * (1 + scale) + shift, p, grid)


__all__ = ["FlexiWan", "FlexiWanConfig", "rotary_angles", "rotate"]
