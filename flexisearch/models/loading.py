"""Every way to name a model, turned into a flexible DiT on a device: the one loader of the package.

Specs: `embedded:<name>` (shipped assets), a directory written by save_pretrained (FlexiDiT or
FlexiTextDiT, whichever its config describes), a pipeline directory (`flexisearch convert`: transformer/
and, for latent models, vae/), `dit:<hub id or DiTPipeline dir>` and `pixart:<hub id or pipeline dir>`.

A latent model samples latents; every metric must see pixels. The loaders set `model.decode_images`,
a VAEDecoder, and the search decodes every sample set once through it before scoring; PixArt models
also get `encode_prompts` (their T5). The weak patch sizes a hub checkpoint gets here come from
PI-resize and are untrained: flexify them before trusting a search.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import UserError
from ..files import ASSETS, CONFIG_NAME, asset_path, read_json
from .convert import from_diffusers_dit, from_diffusers_pixart
from .dit import FlexiDiT
from .flexible import FlexibleDiT
from .text_dit import FlexiTextDiT, is_text_config
from .text_encoder import encode_with, load_text_components
from .video_dit import FlexiVideoDiT
from .wan import FlexiWan


def resolve_device(device: str | torch.device | None) -> torch.device:
    """cpu, cuda or cuda:N, checked against this machine (None: cuda when there is one, else cpu)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if d.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return d


def load_model(spec: str, device: str | torch.device = "cpu") -> FlexibleDiT:
    """The flexible DiT a spec names (see the module docstring), in eval mode on device."""
    if spec.startswith("pixart:"):
        return load_pixart(spec.split(":", 1)[1], device)
    if spec.startswith("dit:"):
        return load_dit(spec.split(":", 1)[1], device)
    path = asset_path(spec)
    if spec.startswith("embedded:"):
        name = spec.split(":", 1)[1]
        if not (path / CONFIG_NAME).is_file():
            known = sorted(p.parent.relative_to(ASSETS).as_posix() for p in ASSETS.glob(f"**/{CONFIG_NAME}")
                           if p.parent.name.startswith("flexidit"))
            raise UserError(f"model '{spec}': no embedded model '{name}' (known: {', '.join(known) or 'none'})")
    if (path / CONFIG_NAME).is_file():
        return load_model_dir(path, device)
    if (path / "transformer").is_dir():
        return load_pipeline_transformer(path, device)
    raise UserError(f"model '{spec}': not an embedded name (embedded:<name>), dit:<hub id> or a FlexiDiT directory")


def load_model_dir(directory: str | Path, device: str | torch.device = "cpu") -> FlexibleDiT:
    """FlexiWan, FlexiTextDiT, FlexiVideoDiT or FlexiDiT, whichever the directory's config.json describes."""
    directory = Path(directory)
    config = read_json(directory / CONFIG_NAME, "config.json")
    if isinstance(config, dict) and "text_dim" in config:
        return FlexiWan.from_pretrained(directory, device)
    if is_text_config(config):
        return FlexiTextDiT.from_pretrained(directory, device)
    if isinstance(config, dict) and "num_frames" in config:
        return FlexiVideoDiT.from_pretrained(directory, device)
    return FlexiDiT.from_pretrained(directory, device)


def load_pipeline_transformer(directory: str | Path, device: str | torch.device = "cpu") -> FlexibleDiT:
    """The model of a pipeline directory (`flexisearch convert`), with its VAE as `decode_images` when the
    pipeline has one (a pixel-space model has none) and its text encoder as `encode_prompts` (text-to-image)."""
    directory = Path(directory)
    model = load_model_dir(directory / "transformer", device)
    text = load_text_components(directory)
    if text is not None:
        model.encode_prompts = functools.partial(encode_with, text[0], text[1].to(device),
                                                 max_length=model.config.text_len)
    if (directory / "vae").is_dir():
        from diffusers import AutoencoderKL

        model.decode_images = VAEDecoder(_component(AutoencoderKL, str(directory), "vae", str(directory)).to(device))
    return model


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


def dit_parts(source: str) -> dict[str, Any]:
    """The components of a diffusers DiTPipeline (hub id such as facebook/DiT-XL-2-256, or a local directory):
    transformer (converted exactly into a FlexiDiT, an epsilon model, no weak sizes), vae, scheduler and id2label
    (model_index.json; a folder of another pipeline is refused before any weights are read). Needs the weights
    locally (or in the Hugging Face cache) or network access."""
    from diffusers import DiTPipeline

    try:
        index = DiTPipeline.load_config(source)
        if index.get("_class_name") != "DiTPipeline":
            raise UserError(f"{source}: describes a {index.get('_class_name')!r} pipeline, expected 'DiTPipeline'")
        dit = DiTPipeline.from_pretrained(source)
    except (OSError, ValueError) as e:  # offline, missing or damaged files: one line
        raise UserError(f"model 'dit:{source}': cannot load the DiTPipeline ({str(e).splitlines()[0]})") from None
    return {"transformer": from_diffusers_dit(dit.transformer, prediction="epsilon"), "vae": dit.vae.eval(),
            "scheduler": dit.scheduler, "id2label": index.get("id2label")}


def load_dit(source: str, device: str | torch.device = "cpu", weak_patch_sizes: Sequence[int] = (4,)) -> FlexiDiT:
    """A diffusers DiTPipeline (dit_parts) as a FlexiDiT with the weak sizes added by PI-resize and its VAE as
    `decode_images`."""
    parts = dit_parts(source)
    flexi = parts["transformer"]
    if weak_patch_sizes:
        flexi = flexi.with_patch_sizes(tuple(weak_patch_sizes))
    flexi = flexi.to(device).eval()
    flexi.decode_images = VAEDecoder(parts["vae"].to(device))
    return flexi


PIXART_COMPONENTS = "PixArt-alpha/PixArt-XL-2-512x512"  # T5 + VAE shared by the PixArt-alpha checkpoints


def pixart_parts(source: str, text_len: int = 120) -> dict[str, Any]:
    """The components of a diffusers PixArt-alpha pipeline (hub id or local directory; each of tokenizer/,
    text_encoder/, vae/ and scheduler/ from PIXART_COMPONENTS where the source has none): transformer (converted
    exactly into a FlexiTextDiT, no weak sizes, empty prompt table), tokenizer, text_encoder (T5), vae, scheduler.
    Needs the weights locally (or in the Hugging Face cache) or network access."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtTransformer2DModel,
    )
    from transformers import AutoTokenizer, T5EncoderModel

    def component(cls: Any, sub: str) -> Any:
        for repo in (source, PIXART_COMPONENTS):
            try:
                return cls.from_pretrained(repo, subfolder=sub)
            except Exception as e:  # missing subfolder, offline, ...: try the shared components
                err = e
        raise UserError(f"pixart:{source}: cannot load {sub} ({str(err).splitlines()[0]})")

    return {"transformer": from_diffusers_pixart(component(PixArtTransformer2DModel, "transformer"), text_len=text_len),
            "tokenizer": component(AutoTokenizer, "tokenizer"),
            "text_encoder": component(T5EncoderModel, "text_encoder").eval(),
            "vae": component(AutoencoderKL, "vae").eval(),
            "scheduler": component(DPMSolverMultistepScheduler, "scheduler")}


def load_pixart(source: str, device: str | torch.device = "cpu", weak_patch_sizes: tuple[int, ...] = (4,),
                text_len: int = 120) -> FlexiTextDiT:
    """A diffusers PixArt-alpha pipeline (pixart_parts) as a FlexiTextDiT with the weak sizes added by PI-resize
    (untrained: flexify before trusting them), its T5 as `encode_prompts` (used by text_encoder.set_model_prompts)
    and its VAE as `decode_images` (applied before any metric). The prompt table starts empty (set_model_prompts)."""
    parts = pixart_parts(source, text_len)
    flexi = parts["transformer"]
    if weak_patch_sizes:
        flexi = flexi.with_patch_sizes(tuple(weak_patch_sizes))
    flexi = flexi.to(device).eval()
    flexi.encode_prompts = functools.partial(encode_with, parts["tokenizer"], parts["text_encoder"].to(device),
                                             max_length=text_len)
    flexi.decode_images = VAEDecoder(parts["vae"].to(device))
    return flexi


__all__ = ["VAEDecoder", "dit_parts", "load_dit", "load_model", "load_model_dir", "load_pipeline_transformer", "load_pixart", "pixart_parts"]
