"""Building blocks shared by the flexible DiT models.

The only parts FlexiDiT changes in a pre-trained DiT are the tokenizer and the de-tokenizer: each
extra (larger) patch size gets weights derived from the native kernel by PI-resize (FlexiViT,
Beyer et al. 2023), plus a small residual in the directions the resize cannot reach.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from functools import lru_cache
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

T = TypeVar("T")
_DERIVED: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()  # owner -> name -> (stamp, value)


def derived(owner: nn.Module, name: str, sources: tuple[torch.Tensor, ...], build: Callable[[], T]) -> T:
    """build(), kept on owner under name until a source tensor changes, so that inference does no per-call
    work that does not depend on the input (resized kernels, merged LoRA). A change is an in-place update
    (optimizer steps and load_state_dict bump the tensor's version), new storage, dtype or device. Nothing is
    kept while autograd records through a source (training): there the weights must stay in the graph."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return build()
    stamp = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
    cache = _DERIVED.setdefault(owner, {})
    hit = cache.get(name)
    if hit is None or hit[0] != stamp:
        hit = cache[name] = (stamp, build())
    return hit[1]


_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


@lru_cache(maxsize=None)
def resize_matrix(p_from: int | tuple[int, ...], p_to: int | tuple[int, ...]) -> torch.Tensor:
    """Matrix B (|p_to| x |p_from|) of a linear resize of a patch of shape p_from to p_to, entries row-major.

    An int is a square 2-D patch (bilinear); a tuple gives one length per axis ((t, h, w): trilinear). The resize
    is separable, the Kronecker product of one 1-D linear resize per axis, so a length-1 axis resized to 2 is
    duplicated. Half-pixel centres (align_corners=False), as jax.image.resize upsamples in FlexiViT.
    """
    shape_from = (p_from, p_from) if isinstance(p_from, int) else tuple(p_from)
    shape_to = (p_to, p_to) if isinstance(p_to, int) else tuple(p_to)
    n_from, n_to = math.prod(shape_from), math.prod(shape_to)
    eye = torch.eye(n_from, dtype=torch.float64, device="cpu").reshape(-1, 1, *shape_from)  # cached: never meta
    cols = F.interpolate(eye, size=shape_to, mode=_LINEAR_MODES[len(shape_from)], align_corners=False)
    return cols.reshape(n_from, n_to).T.contiguous()


@lru_cache(maxsize=None)
def pi_resize_matrix(p_from: int | tuple[int, ...], p_to: int | tuple[int, ...]) -> torch.Tensor:
    """PI-resize map P (|p_to| x |p_from|) for an embedding kernel: w_to = P @ w_from.

    P = pinv(B^T), so <B x, P w> = <x, w> for every patch x: a token embedded from an upsampled
    patch with the resized kernel equals the token of the original patch.
    """
    return torch.linalg.pinv(resize_matrix(p_from, p_to).T)


def null_space_basis(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (n x k) of the null space of m (r x n), float64."""
    _, s, vh = torch.linalg.svd(m, full_matrices=True)
    rank = int((s > 1e-10 * s.max()).sum())
    return vh[rank:].T.contiguous()


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding (len(pos) x dim) of (possibly fractional) positions, as in MAE/DiT."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, stride: float = 1.0) -> torch.Tensor:
    """2-D sin-cos positions ((grid_h*grid_w) x dim) of tokens laid out in the native token frame.

    A token of a patch `stride` times the native one sits at the centre of the native tokens it
    covers: coordinate (i + 0.5) * stride - 0.5, which is i at the native size.
    """
    ys = (torch.arange(grid_h, dtype=torch.float64) + 0.5) * stride - 0.5
    xs = (torch.arange(grid_w, dtype=torch.float64) + 0.5) * stride - 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    # DiT's layout: the first half of the channels encodes x (width), the second half y (height).
    return torch.cat([sincos_1d(dim // 2, gx), sincos_1d(dim // 2, gy)], dim=1).float()


def timestep_embedding(t: torch.Tensor, dim: int, freq_shift: float = 0.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features [cos, sin] (DiT); freq_shift=1 reproduces diffusers' DiT variant."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vector: sinusoidal features then a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.freq_dim, self.freq_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LoRALinear(nn.Linear):
    """nn.Linear with optional low-rank adapters, one per key; the base path is untouched. With `merge`
    set, inference runs an adapter as one linear with W + scale B A (built once, see `derived`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        self.lora_scale: dict[str, float] = {}
        self.merge = False

    def add_adapter(self, key: str, rank: int, alpha: float) -> None:
        a = torch.empty(rank, self.in_features, device=self.weight.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_a[key] = nn.Parameter(a)
        self.lora_b[key] = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device))
        self.lora_scale[key] = alpha / rank

    def forward(self, x: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        if adapter is None or adapter not in self.lora_a:
            return F.linear(x, self.weight, self.bias)
        a, b, scale = self.lora_a[adapter], self.lora_b[adapter], self.lora_scale[adapter]
        if self.merge:
            w = derived(self, adapter, (self.weight, a, b), lambda: torch.addmm(self.weight, b, a, alpha=scale))
            return F.linear(x, w, self.bias)
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, a), b) * scale


class SizeNorm(nn.LayerNorm):
    """LayerNorm without affine parameters (DiT's and PixArt's block norms), plus, for the weak sizes it is given,
    a per-size affine (FlexiDiT's per-patch-size norms): y * (1 + scale(p)) + shift(p), zero at init."""

    def __init__(self, hidden: int, eps: float, sizes: tuple[int, ...] = ()):
        super().__init__(hidden, elementwise_affine=False, eps=eps)
        self.residual = nn.ParameterDict({size_key(p): nn.Parameter(torch.zeros(2, hidden)) for p in sizes})

    def forward(self, x: torch.Tensor, size: str | None = None) -> torch.Tensor:
        x = super().forward(x)
        if size is None or size not in self.residual:
            return x
        scale, shift = self.residual[size]
        return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm/DiT layout), via SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = LoRALinear(dim, 3 * dim)
        self.proj = LoRALinear(dim, dim)

    def forward(self, x: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x, adapter).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, d), adapter)


class Mlp(nn.Module):
    """Transformer MLP with tanh-approximated GELU (DiT)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = LoRALinear(dim, hidden)
        self.fc2 = LoRALinear(hidden, dim)

    def forward(self, x: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x, adapter), approximate="tanh"), adapter)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


Size = int | tuple[int, ...]  # a patch size: an int for a square image patch, (t, h, w) for a video patch


def patch_shape(p: Size) -> tuple[int, ...]:
    """The patch's extent per axis: 4 -> (4, 4); (2, 2, 2) stays."""
    return (p, p) if isinstance(p, int) else tuple(p)


def size_key(p: Size) -> str:
    """The name of a patch size in parameter dicts, buffers and LoRA adapters: "4", or "2x2x2"."""
    return str(p) if isinstance(p, int) else "x".join(str(v) for v in p)


class FlexiPatchEmbed(nn.Module):
    """Patchify + linear embedding at any supported patch size (2-D, or 3-D for video), from one native kernel.

    weight(p) = PI-resize(p) applied to the native kernel + residual(p), where residual(p) lives in
    the null space of B(p)^T: it never changes the token of an upsampled native patch, so the
    initialisation is exact, but it lets the weak path see detail the resized kernel cannot. With
    weak_bias, each weak size also has its own bias: the native bias + bias_residual(p), zero at init.
    """

    def __init__(self, in_channels: int, hidden: int, native: Size, extra: tuple[Size, ...] = (), weak_bias: bool = False):
        super().__init__()
        self.in_channels, self.hidden, self.native = in_channels, hidden, native
        shape = patch_shape(native)
        self.proj = (nn.Conv2d if len(shape) == 2 else nn.Conv3d)(in_channels, hidden, kernel_size=shape, stride=shape)
        self.residual = nn.ParameterDict()
        self.bias_residual = nn.ParameterDict() if weak_bias else None
        for p in extra:
            self.add_patch_size(p)

    def add_patch_size(self, p: Size, init_std: float = 0.0) -> None:
        """Register patch size p; init_std > 0 fills the residual with small null-space noise."""
        k = null_space_basis(resize_matrix(self.native, p).T).to(self.proj.weight.device)  # (|p|, r)
        coeff = torch.randn(self.hidden, self.in_channels, k.shape[1], dtype=torch.float64, device=k.device) * init_std
        res = (coeff @ k.T).reshape(self.hidden, self.in_channels, *patch_shape(p))
        self.residual[size_key(p)] = nn.Parameter(res.to(self.proj.weight))
        if self.bias_residual is not None:
            self.bias_residual[size_key(p)] = nn.Parameter(torch.zeros_like(self.proj.bias))

    def weight(self, p: Size) -> torch.Tensor:
        if p == self.native:
            return self.proj.weight
        key = size_key(p)
        return derived(self, key, (self.proj.weight, self.residual[key]), lambda: self._resized(p))

    def _resized(self, p: Size) -> torch.Tensor:
        w0 = self.proj.weight.flatten(2)  # (hidden, C, |native|)
        m = pi_resize_matrix(self.native, p).to(w0)
        return (w0 @ m.T).reshape(self.hidden, self.in_channels, *patch_shape(p)) + self.residual[size_key(p)]

    def bias(self, p: Size) -> torch.Tensor:
        if p == self.native or self.bias_residual is None:
            return self.proj.bias
        return self.proj.bias + self.bias_residual[size_key(p)]

    def forward(self, x: torch.Tensor, p: Size) -> torch.Tensor:
        shape = patch_shape(p)
        conv = F.conv2d if len(shape) == 2 else F.conv3d
        return conv(x, self.weight(p), self.bias(p), stride=shape).flatten(2).transpose(1, 2)


class FlexiDeEmbed(nn.Module):
    """Final linear tokens -> patches at any supported patch size (2-D or 3-D), from one native map.

    weight(p) = B(p) applied to the native map (a weak token predicts the upsampled native patch)
    + residual(p) orthogonal to range(B(p)): downsampling the output still gives the native map. With
    weak_bias, the weak bias (B(p) applied to the native bias) gets its own bias_residual(p), zero at init.
    """

    def __init__(self, hidden: int, out_channels: int, native: Size, extra: tuple[Size, ...] = (), weak_bias: bool = False):
        super().__init__()
        self.hidden, self.out_channels, self.native = hidden, out_channels, native
        self.linear = nn.Linear(hidden, math.prod(patch_shape(native)) * out_channels)
        self.residual = nn.ParameterDict()
        self.bias_residual = nn.ParameterDict() if weak_bias else None
        for p in extra:
            self.add_patch_size(p)

    def add_patch_size(self, p: Size, init_std: float = 0.0) -> None:
        k = null_space_basis(resize_matrix(self.native, p).T)  # orthogonal complement of range(B)
        coeff = torch.randn(k.shape[1], self.out_channels * self.hidden, dtype=torch.float64) * init_std
        volume = math.prod(patch_shape(p))
        self.residual[size_key(p)] = nn.Parameter((k @ coeff).reshape(volume * self.out_channels, self.hidden)
                                                  .to(self.linear.weight))
        if self.bias_residual is not None:
            self.bias_residual[size_key(p)] = nn.Parameter(torch.zeros(volume * self.out_channels).to(self.linear.bias))

    def weight_bias(self, p: Size) -> tuple[torch.Tensor, torch.Tensor]:
        if p == self.native:
            return self.linear.weight, self.linear.bias
        key = size_key(p)
        sources = (self.linear.weight, self.linear.bias, self.residual[key])
        if self.bias_residual is not None:
            sources += (self.bias_residual[key],)
        return derived(self, key, sources, lambda: self._resized(p))

    def _resized(self, p: Size) -> tuple[torch.Tensor, torch.Tensor]:
        b = resize_matrix(self.native, p).to(self.linear.weight)  # (|p|, |native|)
        c, n0 = self.out_channels, math.prod(patch_shape(self.native))
        w = (b @ self.linear.weight.reshape(n0, c * self.hidden)).reshape(-1, self.hidden)
        bias = (b @ self.linear.bias.reshape(n0, c)).reshape(-1)
        if self.bias_residual is not None:
            bias = bias + self.bias_residual[size_key(p)]
        return w + self.residual[size_key(p)], bias

    def forward(self, x: torch.Tensor, p: Size, grid: tuple[int, ...]) -> torch.Tensor:
        """Tokens (N, prod(grid), hidden) -> (N, C, *extent): each token's patch put back at its grid position."""
        w, bias = self.weight_bias(p)
        x = F.linear(x, w, bias)
        shape, k = patch_shape(p), len(grid)
        x = x.reshape(x.shape[0], *grid, *shape, self.out_channels)
        x = x.permute(0, 2 * k + 1, *(a for i in range(1, k + 1) for a in (i, k + i)))  # (N, C, g1, p1, g2, p2, ...)
        return x.reshape(x.shape[0], self.out_channels, *(g * q for g, q in zip(grid, shape)))
