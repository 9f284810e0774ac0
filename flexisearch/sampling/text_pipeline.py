"""FlexiTextDiTPipeline: text-to-image generation that follows a patch-size schedule (PixArt-alpha conversions and
the embedded text model).

    pipe = FlexiTextDiTPipeline.from_pretrained("flexi-pixart-256")   # or DiffusionPipeline.from_pretrained(
    images = pipe(["a red fox in the snow"], schedule="runs/study/best.json").images   # ..., trust_remote_code=True)

Prompts are encoded by the pipeline's text encoder and tokenizer as PixArtAlphaPipeline encodes them (padded to
the model's text_len; without a text encoder, the encoder the model's config names: the embedded model's
all-MiniLM-L6-v2), installed as the model's prompt table for the call (the negative prompt as its unconditional
row) and generated through FlexiPipeline's one run: with per-image seeds the result is exactly that of
`generate.sample` on a model whose table holds the same prompts (text_encoder.set_model_prompts).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..models import text_encoder as text
from ..models.text_dit import FlexiTextDiT
from .pipeline import FlexiPipeline
from .schedule import Schedule


@contextmanager
def prompt_table(model: FlexiTextDiT, embeds: torch.Tensor, mask: torch.Tensor, captions: Sequence[str]) -> Iterator[None]:
    """The model conditioned on captions (rows 0..n-1) and, as its unconditional row, the last row of embeds/mask;
    its own table is back afterwards."""
    saved = (model.prompt_embeds, model.prompt_mask, model.captions, model.config)
    model.set_prompts(embeds[:-1], mask[:-1], list(captions), embeds[-1], mask[-1])
    try:
        yield
    finally:
        model.prompt_embeds, model.prompt_mask, model.captions, model.config = saved


class FlexiTextDiTPipeline(FlexiPipeline):
    """Text-to-image FlexiTextDiT generation; every step at the patch sizes a Schedule gives it.

    Components: transformer (FlexiTextDiT), scheduler, vae (AutoencoderKL, None for pixel-space models), tokenizer
    and text_encoder (transformers; PixArt's T5), both None for a model whose config names an offline encoder.
    """

    model_class = FlexiTextDiT
    _layout = {"pipeline": ("sampling.text_pipeline", "FlexiTextDiTPipeline"),
               "transformer": ("models.text_dit", "FlexiTextDiT")}
    _optional_components = ["vae", "tokenizer", "text_encoder"]
    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(self, transformer: FlexiTextDiT | None, scheduler: SchedulerMixin, vae: AutoencoderKL | None = None,
                 tokenizer: Any = None, text_encoder: Any = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, tokenizer=tokenizer,
                              text_encoder=text_encoder)

    @classmethod
    def _stored_parts(cls, path: Path, index: dict, given: set[str]) -> dict[str, Any]:
        if {"tokenizer", "text_encoder"} <= given:
            return {}
        tokenizer, encoder = text.load_text_components(path) or (None, None)
        return {"tokenizer": tokenizer, "text_encoder": encoder}

    def encode_prompt(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds (N, text_len, C) float32, mask (N, text_len)) of captions, as the search encodes them."""
        cfg = self.transformer.config
        if self.text_encoder is None:
            return text.encode(list(captions), cfg.text_len, cfg.text_encoder)
        return text.encode_with(self.tokenizer, self.text_encoder, captions, cfg.text_len)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        schedule: Schedule | str | os.PathLike | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str = "",
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        seeds: Sequence[int] | None = None,
        *,
        adapt_steps: bool = False,
        adapt_guidance: bool = False,
        allow_solver_mismatch: bool = False,
        allow_model_mismatch: bool = False,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per prompt following `schedule`.

        Args:
            prompt: a caption or a list of captions.
            negative_prompt: the caption of the unconditional CFG branch, one for the call ("": the empty caption,
                as the search guides).
            The other arguments are FlexiDiTPipeline.__call__'s; seeds give one seed per prompt.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt: expected a caption or a non-empty list of captions")
        if not isinstance(negative_prompt, str):
            raise ValueError("negative_prompt: expected one caption (the unconditional branch is one row for the call)")
        embeds, mask = self.encode_prompt([*prompts, negative_prompt])
        with prompt_table(self.transformer, embeds, mask, prompts):
            rows = torch.arange(len(prompts), device=self._execution_device)
            return self._generate(rows, schedule, num_inference_steps, guidance_scale, generator, latents, output_type,
                                  return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs, seeds,
                                  adapt_steps=adapt_steps, adapt_guidance=adapt_guidance,
                                  allow_solver_mismatch=allow_solver_mismatch, allow_model_mismatch=allow_model_mismatch)


__all__ = ["FlexiTextDiTPipeline", "prompt_table"]
