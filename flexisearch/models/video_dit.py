"""FlexiVideoDiT: a class-conditional video DiT whose every forward can run at one of several 3-D patch sizes.

The FlexiDiT paper's video model: tokens are (time x height x width) patches of a latent video; the
pre-trained (1, 2, 2) kernel gives the weak sizes ((2, 2, 2), (1, 4, 4), ...) by PI-resize, which
duplicates it along time and resizes it in space; positions are 3-D sin-cos in the native token frame,
so a weak token sits between the native tokens it covers (interpolated in time and space); each weak
size gets a learned patch-size embedding and its own LoRA adapters, trained by distillation. It is a
FlexiDiT whose sizes are (t, h, w) tuples: the embedding and de-embedding (layers.FlexiPatchEmbed /
FlexiDeEmbed) are the same classes in 3-D, and only the config and the positions are its own.

A size is a tuple (pt, ph, pw); as a key (parameter dicts, buffers, LoRA adapters) it is "2x2x2".
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch

from ..errors import UserError
from .dit import FlexiDiT, FlexiDiTConfig
from .layers import sincos_1d

Size = tuple[int, int, int]  # (time, height, width)


@dataclass(frozen=True)
class FlexiVideoDiTConfig(FlexiDiTConfig):
    """FlexiDiTConfig with 3-D patch sizes and a number of frames: inputs are (N, in_channels, num_frames,
    input_size, input_size) latents."""

    patch_size: Size = (1, 2, 2)
    extra_patch_sizes: tuple[Size, ...] = ()
    num_frames: int = 16

    def __post_init__(self) -> None:
        # Sizes given as lists (JSON, a caller) are stored as tuples: keys, comparisons and to_dict agree.
        super().__post_init__()
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "extra_patch_sizes", tuple(tuple(p) for p in self.extra_patch_sizes))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.in_channels, self.num_frames, self.input_size, self.input_size

    def grid(self, p: Size) -> Size:
        """Tokens along (time, height, width) at patch size p."""
        return self.num_frames // p[0], self.input_size // p[1], self.input_size // p[2]

    _COUNTS: typing.ClassVar[tuple[str, ...]] = ("input_size", "num_frames", "in_channels", "hidden_size", "depth",
                                                  "num_heads", "num_classes")

    def _check_sizes(self, source: str) -> None:
        if self.hidden_size % 16:  # a quarter for time, three eighths each for height and width, in sin-cos pairs
            raise UserError(f"{source}: field 'hidden_size' is {self.hidden_size}, expected a multiple of 16 "
                            "(3-D sin-cos positions)")
        shape = (self.num_frames, self.input_size, self.input_size)
        for name, sizes in (("patch_size", (self.patch_size,)), ("extra_patch_sizes", self.extra_patch_sizes)):
            for p in sizes:
                if not (len(p) == 3 and all(isinstance(v, int) and v > 0 for v in p)):
                    raise UserError(f"{source}: field '{name}' has {list(p)}, expected three positive integers "
                                    "(time, height, width)")
                if any(s % v for s, v in zip(shape, p)):
                    raise UserError(f"{source}: field '{name}' has {list(p)}, which does not divide (num_frames, "
                                    f"input_size, input_size) = {list(shape)}")
        for p in self.extra_patch_sizes:
            if p == self.patch_size or any(v < v0 for v, v0 in zip(p, self.patch_size)):
                raise UserError(f"{source}: field 'extra_patch_sizes' has {list(p)}, expected sizes >= "
                                f"patch_size={list(self.patch_size)} along every axis and not equal to it")


def sincos_3d(dim: int, grid: Size, stride: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """3-D sin-cos positions ((gt*gh*gw) x dim) of tokens laid out in the native token frame, time-major.

    CogVideoX's layout (diffusers' get_3d_sincos_pos_embed): the first quarter of the channels encodes time,
    the rest is DiT's 2-D embedding (x, then y). A token of a patch `stride` times the native one (per axis)
    sits at the mean of the native tokens it covers: coordinate (i + 0.5) * stride - 0.5, which is i at the
    native size.
    """
    t, y, x = ((torch.arange(g, dtype=torch.float64) + 0.5) * s - 0.5 for g, s in zip(grid, stride))
    gt, gy, gx = torch.meshgrid(t, y, x, indexing="ij")
    spatial = dim * 3 // 4
    return torch.cat([sincos_1d(dim // 4, gt), sincos_1d(spatial // 2, gx), sincos_1d(spatial // 2, gy)], dim=1).float()


class FlexiVideoDiT(FlexiDiT):
    """Class-conditional video DiT; forward(x, t, y, patch_size) with x (N, C, T, H, W) runs at any (t, h, w) size
    in config.patch_sizes (None: native)."""

    config_class = FlexiVideoDiTConfig

    def _positions(self, p: Size) -> torch.Tensor:
        stride = tuple(v / v0 for v, v0 in zip(p, self.config.patch_size))
        return sincos_3d(self.config.hidden_size, self.config.grid(p), stride)


__all__ = ["FlexiVideoDiT", "FlexiVideoDiTConfig", "sincos_3d"]
