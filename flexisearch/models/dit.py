"""FlexiDiT: a class-conditional DiT whose every forward can run at one of several patch sizes.

Architecture follows facebookresearch/DiT (adaLN-Zero blocks, sin-cos positions, a null class for
classifier-free guidance, optional learned sigma). What is flexible: the patch embedding and the
final de-embedding (layers.FlexiPatchEmbed / FlexiDeEmbed), a learned patch-size embedding (zero
at init) and optional per-size LoRA adapters on attention and MLP projections.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..validate import ConfigMixin
from .flexible import FlexibleDiT
from .layers import (
    Attention,
    FlexiDeEmbed,
    FlexiPatchEmbed,
    Mlp,
    SizeNorm,
    TimestepEmbedder,
    modulate,
    sincos_2d,
    size_key,
)


@dataclass(frozen=True)
class FlexiDiTConfig(ConfigMixin):
    """Everything needed to rebuild a FlexiDiT; stored as config.json beside the weights."""

    input_size: int = 32
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 2
    extra_patch_sizes: tuple[int, ...] = ()
    num_classes: int = 1000
    learn_sigma: bool = True
    prediction: str = "epsilon"  # "epsilon" (DDPM-trained DiT), "v_prediction" (DDPM betas, v) or "flow" (rectified flow)
    timestep_freq_shift: float = 0.0  # 0: original DiT, 1: diffusers' DiTTransformer2DModel
    mlp_norm_eps: float = 1e-6
    lora_rank: int = 0  # > 0: one LoRA adapter per extra patch size on attention and MLP
    lora_alpha: float = 0.0
    weak_bias: bool = False  # the paper's option: each extra size's embed / de-embed has its own bias
    weak_norms: bool = False  # the paper's option: per-patch-size norms (an affine per extra size on every norm)

    def to_dict(self) -> dict:
        """The stored fields; the recipe options only when set, so models without them keep their fingerprints."""
        d = super().to_dict()
        return {k: v for k, v in d.items() if k not in _OPTIONS or v}

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def patch_sizes(self) -> tuple[int, ...]:
        return (self.patch_size, *self.extra_patch_sizes)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample (channels first)."""
        return self.in_channels, self.input_size, self.input_size

    def grid(self, p: int) -> tuple[int, ...]:
        """Tokens along each axis at patch size p."""
        return self.input_size // p, self.input_size // p

    @property
    def norm_sizes(self) -> tuple[int, ...]:
        """The sizes with norms of their own (weak_norms)."""
        return self.extra_patch_sizes if self.weak_norms else ()

    _COUNTS: typing.ClassVar[tuple[str, ...]] = ("input_size", "in_channels", "hidden_size", "depth", "num_heads",
                                                  "patch_size", "num_classes")

    def check(self, source: str = "config") -> None:
        for name in self._COUNTS:
            low = 0 if name == "num_classes" else 1  # a text model converted without its prompt table has none
            if not low <= getattr(self, name) <= 1 << 20:  # beyond any DiT; checked before anything is allocated
                raise UserError(f"{source}: field '{name}' is {getattr(self, name)}, expected an integer from {low} "
                                f"to {1 << 20}")
        if self.prediction not in ("epsilon", "v_prediction", "flow"):
            raise UserError(f"{source}: field 'prediction' is {self.prediction!r}, expected 'epsilon', 'v_prediction' "
                            "or 'flow'")
        if self.hidden_size % self.num_heads:
            raise UserError(f"{source}: field 'hidden_size' must be divisible by num_heads={self.num_heads}")
        self._check_sizes(source)

    def _check_sizes(self, source: str) -> None:
        for p in self.patch_sizes:
            if p <= 0 or self.input_size % p:
                raise UserError(f"{source}: patch size {p} does not divide input_size={self.input_size}")
        for p in self.extra_patch_sizes:
            if p <= self.patch_size:
                raise UserError(f"{source}: field 'extra_patch_sizes' has {p}, expected sizes > patch_size={self.patch_size}")


_OPTIONS = ("weak_bias", "weak_norms")


def _preset(hidden: int, depth: int, heads: int, p: int) -> FlexiDiTConfig:
    return FlexiDiTConfig(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=p)


# The DiT family of Peebles & Xie (2023), at 256 px (32x32x4 latents), 1000 classes, learned sigma.
PRESETS: dict[str, FlexiDiTConfig] = {
    f"DiT-{name}/{p}": _preset(h, d, nh, p)
    for name, (h, d, nh) in {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}.items()
    for p in (2, 4, 8)
}


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, mlp_norm_eps: float, norm_sizes: tuple[int, ...] = ()):
        super().__init__()
        self.norm1 = SizeNorm(hidden, 1e-6, norm_sizes)
        self.attn = Attention(hidden, heads)
        self.norm2 = SizeNorm(hidden, mlp_norm_eps, norm_sizes)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor, adapter: str | None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x, adapter), shift_msa, scale_msa), adapter)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x, adapter), shift_mlp, scale_mlp), adapter)


class FinalLayer(nn.Module):
    """adaLN modulation, then the flexible de-embedding back to pixels (or latents)."""

    def __init__(self, cfg: FlexiDiTConfig):
        super().__init__()
        hidden = cfg.hidden_size
        self.norm_final = SizeNorm(hidden, 1e-6, cfg.norm_sizes)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.deembed = FlexiDeEmbed(hidden, cfg.out_channels, cfg.patch_size, cfg.extra_patch_sizes, cfg.weak_bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, p: int, grid: tuple[int, ...], size: str | None) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.deembed(modulate(self.norm_final(x, size), shift, scale), p, grid)


class FlexiDiT(FlexibleDiT):
    """Class-conditional DiT; forward(x, t, y, patch_size) runs at any size in config.patch_sizes."""

    config_class = FlexiDiTConfig

    def __init__(self, config: FlexiDiTConfig):
        super().__init__()
        config.check()
        self.config = config
        hidden = config.hidden_size
        self.x_embedder = FlexiPatchEmbed(config.in_channels, hidden, config.patch_size, config.extra_patch_sizes,
                                          config.weak_bias)
        self.t_embedder = TimestepEmbedder(hidden, freq_shift=config.timestep_freq_shift)
        # Row num_classes is the null class used for classifier-free guidance.
        self.y_embedder = nn.Embedding(config.num_classes + 1, hidden)
        self.patch_size_embed = nn.ParameterDict(
            {size_key(p): nn.Parameter(torch.zeros(hidden)) for p in config.extra_patch_sizes}
        )
        self.blocks = nn.ModuleList(
            DiTBlock(hidden, config.num_heads, config.mlp_ratio, config.mlp_norm_eps, config.norm_sizes)
            for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(config)
        for p in config.patch_sizes:
            self.register_buffer(f"pos_embed_{size_key(p)}", self._positions(p), persistent=False)
        self.initialize_weights()
        self._add_all_lora()

    def _positions(self, p: int) -> torch.Tensor:
        """Sin-cos positions of the tokens at patch size p, in the native token frame."""
        g = self.config.input_size // p
        return sincos_2d(self.config.hidden_size, g, g, p / self.config.patch_size)

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, zeroed adaLN modulation and output layer."""
        self._init_linears()
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.deembed.linear.weight)
        nn.init.zeros_(self.final_layer.deembed.linear.bias)

    def _deembed(self) -> nn.Module:
        return self.final_layer.deembed

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        """x: (N, C, H, W), t: (N,) timesteps, y: (N,) labels (num_classes = null) -> (N, out_channels, H, W)."""
        h, p, adapter = self._tokens(x, patch_size)
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = self._block(block, h, c, adapter)
        return self.final_layer(h, c, p, self.config.grid(p), adapter)


__all__ = ["FlexiDiT", "FlexiDiTConfig", "PRESETS"]
