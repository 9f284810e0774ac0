"""FlexiTextDiT: a text-conditioned FlexiDiT in the layout of PixArt-alpha, driven through a prompt table.

Architecture (PixArt-alpha, Chen et al. 2023; diffusers' PixArtTransformer2DModel):
  - adaLN-single: one timestep embedder t -> e (hidden), one shared linear SiLU(e) -> 6*hidden, and
    per block a learned `scale_shift_table` (6 x hidden) added to it; the final layer modulates
    with its own (2 x hidden) table plus e itself.
  - each block: self-attention (modulated, gated), cross-attention to the projected text tokens
    (no norm, no gate, as in PixArt), MLP (modulated, gated).
  - caption projection: Linear(caption_channels -> hidden), GELU(tanh), Linear(hidden -> hidden).
  - flexible patch embedding / de-embedding (layers.FlexiPatchEmbed / FlexiDeEmbed), a learned
    patch-size embedding and optional per-size LoRA on self-attention (qkv, proj) and MLP (fc1, fc2).
    Cross-attention is plain nn.Linear: it can never carry LoRA and stays frozen when flexifying
    (the paper's best text-to-image recipe).

Conditioning through a prompt table. The sampler and the search were written for class labels:
`model(x, t, y, patch_size)` with y a LongTensor and `model.null_class` for the unconditional
branch. A FlexiTextDiT keeps exactly that interface: it carries a table of precomputed text-encoder
token embeddings (`prompt_embeds`, rows x text_len x caption_channels) and masks, one row per
caption plus a last row for the empty caption, and y indexes the rows. `config.num_classes` is the
number of caption rows, `null_class` the empty caption's row. Rows [0, num_search_prompts) are the
prompts a search may use, rows [num_search_prompts, num_classes) are held out for confirmation
(optimize.sample_sets builds both sample sets); `captions[row]` is the caption text a CLIP metric needs.
`set_prompts` swaps in a new table (e.g. prompts from a file), `forward_text` takes arbitrary
encoder states. The fingerprint covers the network only (config without the table size, and the
weights, not the table): a schedule belongs to the network and stays valid for any prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..files import fingerprint, read_json
from .dit import FlexiDiTConfig
from .flexible import FlexibleDiT
from .layers import (
    Attention,
    FlexiDeEmbed,
    FlexiPatchEmbed,
    Mlp,
    SizeNorm,
    TimestepEmbedder,
    sincos_1d,
)

PROMPTS_NAME = "prompts.json"
MASK_BIAS = -10000.0  # additive bias of a masked text token (diffusers' PixArt; never NaN, unlike -inf)
# Not part of the network: excluded from the fingerprint (see the module docstring).
_TABLE_KEYS = ("prompt_embeds", "prompt_mask")
_TABLE_FIELDS = ("num_classes", "num_search_prompts")


@dataclass(frozen=True)
class FlexiTextDiTConfig(FlexiDiTConfig):
    """FlexiDiTConfig plus the text side. Defaults: PixArt-XL/2 at 256 px (32x32x4 latents, T5-XXL).

    num_classes is the number of caption rows in the prompt table (the null row comes after them);
    mlp_norm_eps is the eps of both block norms (PixArt's norm_eps).
    """

    num_classes: int = 0
    caption_channels: int = 4096
    text_len: int = 120
    interpolation_scale: float = 1.0  # positions are divided by it (diffusers' PixArt interpolation_scale)
    num_search_prompts: int = 0  # rows [0, n) for the search, [n, num_classes) held out; 0: no split
    text_encoder: str = "t5-v1_1-xxl"  # what made the prompt table (text_encoder.py knows "all-MiniLM-L6-v2")

    def check(self, source: str = "config") -> None:
        super().check(source)
        if self.caption_channels < 1 or self.text_len < 1:
            raise UserError(f"{source}: fields 'caption_channels' and 'text_len' must be positive")
        if self.interpolation_scale <= 0:
            raise UserError(f"{source}: field 'interpolation_scale' must be positive")
        if self.num_search_prompts > self.num_classes:
            raise UserError(f"{source}: field 'num_search_prompts' ({self.num_search_prompts}) exceeds "
                            f"num_classes ({self.num_classes})")


def is_text_config(d: Any) -> bool:
    return isinstance(d, dict) and "caption_channels" in d


def text_sincos_2d(dim: int, grid: int, stride: float, interpolation_scale: float) -> torch.Tensor:
    """PixArt's 2-D sin-cos positions: native token i sits at i / interpolation_scale; a token of a
    patch `stride` times larger sits at the centre of the native tokens it covers (as layers.sincos_2d)."""
    pos = ((torch.arange(grid, dtype=torch.float64) + 0.5) * stride - 0.5) / interpolation_scale
    gy, gx = torch.meshgrid(pos, pos, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, gx), sincos_1d(dim // 2, gy)], dim=1).float()


class CaptionProjection(nn.Module):
    """PixArt's caption projection: text-encoder tokens -> hidden (GELU tanh in between)."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class CrossAttention(nn.Module):
    """Multi-head cross-attention (queries from image tokens, keys/values from text tokens).

    Plain nn.Linear layers: no LoRA adapter can be attached, so a flexified model's cross-attention
    is exactly the pre-trained one at every patch size.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, d // h).transpose(1, 2)
        kv = self.kv(ctx).reshape(b, ctx.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TextDiTBlock(nn.Module):
    """PixArt block: adaLN-single modulated self-attention, cross-attention, modulated MLP."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, eps: float, norm_sizes: tuple[int, ...] = ()):
        super().__init__()
        self.norm1 = SizeNorm(hidden, eps, norm_sizes)
        self.attn = Attention(hidden, heads)
        self.cross_attn = CrossAttention(hidden, heads)
        self.norm2 = SizeNorm(hidden, eps, norm_sizes)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden) / hidden**0.5)

    def forward(self, x: torch.Tensor, t6: torch.Tensor, ctx: torch.Tensor, bias: torch.Tensor | None,
                adapter: str | None) -> torch.Tensor:
        mod = self.scale_shift_table[None] + t6.reshape(x.shape[0], 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)  # (N, 1, D) each
        x = x + gate_msa * self.attn(self.norm1(x, adapter) * (1 + scale_msa) + shift_msa, adapter)
        x = x + self.cross_attn(x, ctx, bias)
        return x + gate_mlp * self.mlp(self.norm2(x, adapter) * (1 + scale_mlp) + shift_mlp, adapter)


class FlexiTextDiT(FlexibleDiT):
    """Text-conditioned FlexiDiT; forward(x, t, y, patch_size) with y indexing the prompt table."""

    config_class = FlexiTextDiTConfig
    is_text_model = True

    def __init__(self, config: FlexiTextDiTConfig, captions: Sequence[str] | None = None):
        super().__init__()
        config.check()
        self.config = config
        d = config.hidden_size
        self.x_embedder = FlexiPatchEmbed(config.in_channels, d, config.patch_size, config.extra_patch_sizes,
                                          config.weak_bias)
        self.t_embedder = TimestepEmbedder(d, freq_shift=config.timestep_freq_shift)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))  # adaLN-single
        self.caption_projection = CaptionProjection(config.caption_channels, d)
        self.patch_size_embed = nn.ParameterDict({str(p): nn.Parameter(torch.zeros(d)) for p in config.extra_patch_sizes})
        self.blocks = nn.ModuleList(TextDiTBlock(d, config.num_heads, config.mlp_ratio, config.mlp_norm_eps,
                                                 config.norm_sizes) for _ in range(config.depth))
        self.norm_final = SizeNorm(d, 1e-6, config.norm_sizes)
        self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)
        self.deembed = FlexiDeEmbed(d, config.out_channels, config.patch_size, config.extra_patch_sizes, config.weak_bias)
        for p in config.patch_sizes:
            g = config.input_size // p
            self.register_buffer(f"pos_embed_{p}", text_sincos_2d(d, g, p / config.patch_size, config.interpolation_scale),
                                 persistent=False)
        self._init_prompt_table(captions)
        self.initialize_weights()
        self._add_all_lora()

    def initialize_weights(self) -> None:
        """PixArt's init: xavier linears, small timestep/caption MLPs, zero cross-attention output and de-embedding."""
        self._init_linears()
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                    self.caption_projection.linear_1, self.caption_projection.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.deembed.linear.weight)
        nn.init.zeros_(self.deembed.linear.bias)

    # ---- the prompt table -----------------------------------------------------------------
    def _init_prompt_table(self, captions: Sequence[str] | None) -> None:
        """Empty table buffers of config.num_classes caption rows and the null row (set_prompts fills them)."""
        config = self.config
        rows = config.num_classes + 1
        self.register_buffer("prompt_embeds", torch.zeros(rows, config.text_len, config.caption_channels))
        mask = torch.zeros(rows, config.text_len)
        mask[:, 0] = 1  # an all-masked row would be meaningless; set_prompts fills real masks
        self.register_buffer("prompt_mask", mask)
        self.captions: list[str] = list(captions) if captions is not None else [""] * rows
        if len(self.captions) != rows:
            raise ValueError(f"{len(self.captions)} captions for a table of {rows} rows (null row included)")

    def prompt_rows(self, which: str) -> list[int]:
        """Rows of the table for 'search' or 'heldout' prompts (all caption rows when there is no split)."""
        n, s = self.config.num_classes, self.config.num_search_prompts
        if which not in ("search", "heldout"):
            raise ValueError(f"prompt set {which!r}: expected 'search' or 'heldout'")
        if not 0 < s < n:
            return list(range(n))
        return list(range(s)) if which == "search" else list(range(s, n))

    def set_prompts(self, embeds: torch.Tensor, mask: torch.Tensor, captions: Sequence[str],
                    null_embeds: torch.Tensor, null_mask: torch.Tensor, num_search: int = 0) -> None:
        """Replace the prompt table: embeds (P, L, C) and mask (P, L) for P captions, then the empty caption.

        Rows [0, num_search) become search prompts and the rest held out (0: no split). L may be
        shorter than config.text_len (padded with masked zeros), never longer.
        """
        p, length, c = embeds.shape
        if c != self.config.caption_channels or length > self.config.text_len or len(captions) != p:
            raise UserError(f"prompt table: got {p} captions, embeddings {tuple(embeds.shape)}; the model takes "
                            f"(*, <= {self.config.text_len}, {self.config.caption_channels})")
        if not 0 <= num_search <= p:
            raise UserError(f"prompt table: num_search {num_search} not in [0, {p}]")
        emb = torch.zeros(p + 1, self.config.text_len, c)
        msk = torch.zeros(p + 1, self.config.text_len)
        emb[:p, :length], msk[:p, :length] = embeds.float().cpu(), mask.float().cpu()
        emb[p, :null_embeds.shape[-2]], msk[p, :null_mask.shape[-1]] = null_embeds.float().cpu(), null_mask.float().cpu()
        if (msk.sum(1) == 0).any():
            raise UserError("prompt table: a row has no unmasked token")
        device = self.prompt_embeds.device
        self.prompt_embeds = emb.to(device)
        self.prompt_mask = msk.to(device)
        self.captions = [*captions, ""]
        self.config = dataclasses.replace(self.config, num_classes=p, num_search_prompts=num_search)

    def prompt_fingerprint(self) -> str:
        hsh = hashlib.sha256(json.dumps(self.captions).encode())
        for key in _TABLE_KEYS:
            hsh.update(getattr(self, key).detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return hsh.hexdigest()[:16]

    # ---- forward ---------------------------------------------------------------------------
    def _like(self, config: FlexiTextDiTConfig) -> FlexiTextDiT:
        return FlexiTextDiT(config, self.captions)  # same prompt table

    def _deembed(self) -> nn.Module:
        return self.deembed

    def forward_text(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None,
                     patch_size: int | None = None) -> torch.Tensor:
        """x: (N, C, H, W), t: (N,), text: (N, L, caption_channels) encoder states, text_mask: (N, L) 1 = keep."""
        h, p, adapter = self._tokens(x, patch_size)
        n = x.shape[0]
        emb = self.t_embedder(t.expand(n) if t.dim() == 0 else t)
        t6 = self.t_block(emb)
        ctx = self.caption_projection(text.to(h.dtype))
        bias = None
        if text_mask is not None:
            bias = ((1 - text_mask.to(h.dtype)) * MASK_BIAS)[:, None, None, :]
        for block in self.blocks:
            h = self._block(block, h, t6, ctx, bias, adapter)
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)
        h = self.norm_final(h, adapter) * (1 + scale) + shift
        g = self.config.input_size // p
        return self.deembed(h, p, (g, g))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        """x: (N, C, H, W), t: (N,) timesteps, y: (N,) prompt rows (null_class = empty caption)."""
        y = y.to(self.prompt_embeds.device)
        return self.forward_text(x, t, self.prompt_embeds[y], self.prompt_mask[y], patch_size)

    # ---- weights in and out ------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Content hash of the network (config and weights; not the prompt table, which is input data)."""
        cfg = {k: v for k, v in self.config.to_dict().items() if k not in _TABLE_FIELDS}
        return fingerprint(cfg, self.state_dict(), torch.float32, skip=_TABLE_KEYS)

    def _side_files(self) -> dict[str, Any]:
        return {PROMPTS_NAME: {"captions": self.captions[:-1], "num_search_prompts": self.config.num_search_prompts}}

    @classmethod
    def _from_files(cls, config: FlexiTextDiTConfig, directory: Path) -> FlexiTextDiT:
        prompts = read_json(directory / PROMPTS_NAME, PROMPTS_NAME)
        captions = prompts.get("captions") if isinstance(prompts, dict) else None
        if not isinstance(captions, list) or len(captions) != config.num_classes or not all(isinstance(c, str) for c in captions):
            raise UserError(f"{directory / PROMPTS_NAME}: field 'captions' must list {config.num_classes} strings")
        return cls(config, [*captions, ""])


__all__ = ["FlexiTextDiT", "FlexiTextDiTConfig", "is_text_config"]
