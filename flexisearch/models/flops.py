"""Exact analytic compute of one FlexiDiT forward at a given patch size (an int; for a FlexiVideoDiT a
(t, h, w) tuple: the count is the same with 3-D patches).

Counts multiply-accumulates (MACs) of every matrix product for one sample (batch 1): the patch
embedding, the timestep MLP, the adaLN linears, qkv, attention scores (q @ k^T), attention times
values, the attention output projection, the MLP, LoRA adapters when they run, the final adaLN
and the de-embedding. Embedding lookups and elementwise work (norms, activations, softmax,
modulation, residual adds, position embeddings) are excluded, as in the DiT paper's Gflops column,
which counts MACs: DiT-XL/2 at 256 px is 118.6 G MACs. FLOPs = 2 x MACs; names say which.

The weak patch sizes' kernels are fixed linear maps of the native ones (PI-resize); forming them is
a weight transform independent of the batch and is not counted either.
"""

from __future__ import annotations

import math
from typing import Protocol

from .dit import FlexiDiTConfig
from .layers import Size, patch_shape


class StepSizes(Protocol):
    """What schedule_macs reads of a schedule (sampling.schedule.Schedule has it)."""

    cond: tuple[int, ...]
    uncond: tuple[int, ...]
    uses_cfg: bool

_FREQ_DIM = 256  # width of the sinusoidal timestep features (layers.TimestepEmbedder)


def tokens(config: FlexiDiTConfig, patch_size: Size) -> int:
    """Number of tokens of one input at this patch size."""
    return math.prod(config.grid(patch_size))


def _block_macs(config: FlexiDiTConfig, n: int, lora: bool) -> dict[str, int]:
    """MACs of one transformer block on n tokens. A cross-attention block would add its terms here."""
    d = config.hidden_size
    m = int(d * config.mlp_ratio)
    macs = {
        "adaln": d * 6 * d,
        "qkv": n * d * 3 * d,
        "attn_scores": n * n * d,  # per head n x n x head_dim, summed over heads
        "attn_values": n * n * d,
        "attn_proj": n * d * d,
        "mlp": n * d * m * 2,
        "lora": 0,
    }
    if lora:  # rank-r down and up projection next to qkv, proj, fc1 and fc2
        r = config.lora_rank
        macs["lora"] = n * r * ((d + 3 * d) + (d + d) + (d + m) + (m + d))
    length = _text_len(config)
    if length:  # text model (PixArt layout): adaLN-single has no per-block linear; cross-attention to L text tokens
        macs["adaln"] = 0
        macs["cross_q"] = n * d * d
        macs["cross_kv"] = length * d * 2 * d
        macs["cross_scores"] = n * length * d
        macs["cross_values"] = n * length * d
        macs["cross_proj"] = n * d * d
    return macs


def _text_len(config: FlexiDiTConfig) -> int:
    """Text tokens every forward attends to (the padded table length: masked tokens are computed too); 0 for class models."""
    return int(getattr(config, "text_len", 0)) if getattr(config, "caption_channels", None) else 0


def breakdown_macs(config: FlexiDiTConfig, patch_size: Size) -> dict[str, int]:
    """MACs of one forward (batch 1) at patch_size, per component; block terms summed over depth."""
    if patch_size not in config.patch_sizes:
        raise ValueError(f"patch size {patch_size} not supported; config has {config.patch_sizes}")
    n, d, volume = tokens(config, patch_size), config.hidden_size, math.prod(patch_shape(patch_size))
    lora = bool(config.lora_rank) and patch_size != config.patch_size
    macs = {
        "patch_embed": n * d * config.in_channels * volume,
        "timestep_mlp": _FREQ_DIM * d + d * d,
    }
    for key, value in _block_macs(config, n, lora).items():
        macs[key] = value * config.depth
    macs["final_adaln"] = d * 2 * d
    macs["deembed"] = n * d * volume * config.out_channels
    length = _text_len(config)
    if length:  # one shared t -> 6d linear, the caption projection MLP, and a final modulation without a linear
        macs["adaln_single"] = d * 6 * d
        macs["caption_projection"] = length * (config.caption_channels * d + d * d)
        macs["final_adaln"] = 0
    return macs


def forward_macs(config: FlexiDiTConfig, patch_size: Size) -> int:
    """MACs of one forward of one sample at patch_size."""
    return sum(breakdown_macs(config, patch_size).values())


def forward_flops(config: FlexiDiTConfig, patch_size: Size) -> int:
    """FLOPs (2 x MACs) of one forward of one sample at patch_size."""
    return 2 * forward_macs(config, patch_size)


def format_count(n: float) -> str:
    """A count with four significant digits and an SI prefix: 118.6e9 -> '118.6 G'."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {prefix}"
    return f"{n:.4g}"


def schedule_macs(config: FlexiDiTConfig, schedule: StepSizes) -> int:
    """MACs per sample of a whole schedule: every step's conditional forward, plus the unconditional
    one when guidance is on (scale != 1), each at its own patch size."""
    per_size = {p: forward_macs(config, p) for p in set(schedule.cond) | set(schedule.uncond)}
    total = sum(per_size[p] for p in schedule.cond)
    if schedule.uses_cfg:
        total += sum(per_size[p] for p in schedule.uncond)
    return total
