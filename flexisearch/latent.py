"""Latent DiTs: facebook/DiT-XL-2-256-style checkpoints as FlexiDiTs, with the VAE that decodes them.

A latent model samples latents; every metric must see pixels. The loaders here (and
text_model.load_pixart) set `model.decode_images`, a VAEDecoder, and the Objective decodes every
sample set once through it before scoring. The weak patch sizes a hub checkpoint gets here come
from PI-resize and are untrained: flexify them before trusting a search.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import UserError
from .model import FlexiDiT


class VAEDecoder:
    """Latents -> images in [-1, 1] (float32, CPU), in batches, scaled as diffusers' DiT and PixArt pipelines do.

    A plain callable, not an nn.Module, so attaching it to a model leaves the model's weights and
    fingerprint unchanged."""

    def __init__(self, vae: Any, batch_size: int = 16):
        self.vae = vae.eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        device, dtype = next(self.vae.parameters()).device, self.vae.dtype
        scale = self.vae.config.scaling_factor
        out = [self.vae.decode(chunk.to(device, dtype) / scale).sample.float().clamp(-1, 1).cpu()
               for chunk in latents.split(self.batch_size)]
        return torch.cat(out)


def _component(cls: Any, source: str, sub: str, what: str) -> Any:
    try:
        return cls.from_pretrained(source, subfolder=sub)
    except Exception as e:  # missing folder, offline without a cached copy, corrupt file: all one line
        raise UserError(f"{what}: cannot load {sub}/ ({str(e).splitlines()[0]})") from None


def load_dit(source: str, device: str | torch.device = "cpu", weak_patch_sizes: Sequence[int] = (4,)) -> FlexiDiT:
    """A diffusers DiTPipeline (hub id such as facebook/DiT-XL-2-256, or a local directory) as a FlexiDiT
    with the weak sizes added by PI-resize and its VAE as `decode_images`. Needs the weights locally
    (or in the Hugging Face cache) or network access."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    from .convert import from_diffusers_dit

    what = f"model 'dit:{source}'"
    flexi = from_diffusers_dit(_component(DiTTransformer2DModel, source, "transformer", what), prediction="epsilon")
    if weak_patch_sizes:
        flexi = flexi.with_patch_sizes(tuple(weak_patch_sizes))
    flexi = flexi.to(device).eval()
    flexi.decode_images = VAEDecoder(_component(AutoencoderKL, source, "vae", what).to(device))
    return flexi


def load_pipeline_transformer(directory: str | Path, device: str | torch.device = "cpu") -> FlexiDiT:
    """The FlexiDiT of a FlexiDiTPipeline directory (`flexisearch convert`), with its VAE as
    `decode_images` when the pipeline has one (a pixel-space model has none)."""
    directory = Path(directory)
    model = FlexiDiT.from_pretrained(directory / "transformer", device)
    if (directory / "vae").is_dir():
        from diffusers import AutoencoderKL

        model.decode_images = VAEDecoder(_component(AutoencoderKL, str(directory), "vae", str(directory)).to(device))
    return model


__all__ = ["VAEDecoder", "load_dit", "load_pipeline_transformer"]
