"""Make a stock diffusers DiTPipeline or PixArtAlphaPipeline follow a schedule, for users who keep their own pipeline.

    pipe = follow_schedule(DiTPipeline.from_pretrained(...), flexi_model, "runs/study/best.json")
    images = pipe(labels, num_inference_steps=s.num_steps, guidance_scale=s.guidance_scale, generator=g).images

`follow_schedule` puts a module in the place of the pipeline's transformer: each call is one denoising step, found
by its timestep in the pipeline's scheduler, and runs the conditional and the unconditional half of the batch (in
the pipeline's layout) at the patch sizes the schedule gives that step. The images equal those of the FlexiDiT
pipelines for the same generator.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import DiTPipeline, PixArtAlphaPipeline
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..errors import UserError
from ..models.dit import FlexiDiT
from ..models.flexible import FlexibleDiT
from ..models.text_dit import FlexiTextDiT
from .generate import uses_learned_variance
from .pipeline import runs_solver
from .schedule import Schedule


class ScheduledTransformer(torch.nn.Module):
    """A flexible DiT in the place of a stock pipeline's transformer, stepping at a schedule's patch sizes.

    `cond_first`: the pipeline batches the conditional half first (DiTPipeline) or the unconditional half first
    (PixArtAlphaPipeline). `config` is the replaced transformer's, which the pipeline reads."""

    def __init__(self, model: FlexibleDiT, schedule: Schedule, scheduler: SchedulerMixin, config: Any,
                 cond_first: bool):
        super().__init__()
        self.model, self.schedule, self.scheduler, self.config = model, schedule, scheduler, config
        self.cond_first = cond_first

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _sizes(self, timestep: torch.Tensor) -> tuple[int, int]:
        timesteps = self.scheduler.timesteps.to(timestep.device)
        if len(timesteps) != self.schedule.num_steps:
            raise ValueError(f"the pipeline runs {len(timesteps)} steps; the schedule has {self.schedule.num_steps}: "
                             f"call it with num_inference_steps={self.schedule.num_steps}")
        i = int((timesteps == timestep[0]).nonzero()[0, 0])
        return self.schedule.cond[i], self.schedule.uncond[i]

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                return_dict: bool = True, **unused: Any) -> Any:
        p_cond, p_uncond = self._sizes(timestep)
        x, t = hidden_states, timestep.to(hidden_states.dtype)

        def run(rows: slice, p: int) -> torch.Tensor:
            if class_labels is not None:
                return self.model(x[rows], t[rows], class_labels[rows], p)
            mask = None if encoder_attention_mask is None else encoder_attention_mask[rows]
            return self.model.forward_text(x[rows], t[rows], encoder_hidden_states[rows], mask, p)

        n = len(x) // 2
        if p_cond == p_uncond or not self.schedule.uses_cfg:  # one size for all rows
            out = run(slice(None), p_cond)
        else:
            first, second = (p_cond, p_uncond) if self.cond_first else (p_uncond, p_cond)
            out = torch.cat([run(slice(None, n), first), run(slice(n, None), second)])
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def follow_schedule(pipe: DiTPipeline | PixArtAlphaPipeline, model: FlexibleDiT,
                    schedule: Schedule | str | os.PathLike) -> DiTPipeline | PixArtAlphaPipeline:
    """Make a stock DiTPipeline (with a FlexiDiT) or PixArtAlphaPipeline (with a FlexiTextDiT) follow a schedule: its
    transformer is replaced by `model` (the model of the schedule, e.g. the `transformer` of the FlexiDiT pipeline
    folder) stepping at the schedule's patch sizes. Call the pipeline with the schedule's steps and guidance scale
    (`num_inference_steps=s.num_steps, guidance_scale=s.guidance_scale`). The pipeline's scheduler must run the
    schedule's solver without learned variance (both pipelines drop the variance channels), and the schedule must
    use plain CFG."""
    if not isinstance(schedule, Schedule):
        schedule = Schedule.load(schedule)
    kind = {DiTPipeline: FlexiDiT, PixArtAlphaPipeline: FlexiTextDiT}.get(type(pipe))
    if kind is None or not isinstance(model, kind):
        raise UserError(f"follow_schedule: expected a DiTPipeline with a FlexiDiT or a PixArtAlphaPipeline with a "
                        f"FlexiTextDiT, got a {type(pipe).__name__} with a {type(model).__name__}")
    cfg = model.config
    schedule.check_model(cfg, model.fingerprint(), "schedule")
    if schedule.guidance_mode != "cfg" or schedule.uses_cfg and schedule.guidance_scale < 1 or schedule.guided_channels:
        raise UserError(f"schedule: guidance {schedule.guidance_mode} at scale {schedule.guidance_scale:g}"
                        f"{' on some channels' if schedule.guided_channels else ''} needs the FlexiDiT pipelines; a "
                        f"{type(pipe).__name__} guides every channel with plain CFG, at scales above 1")
    if not runs_solver(pipe.scheduler, schedule.solver, cfg, schedule.timestep_spacing) or uses_learned_variance(pipe.scheduler):
        raise UserError(f"schedule: searched with solver {schedule.solver!r}; the {type(pipe).__name__}'s "
                        f"{type(pipe.scheduler).__name__} does not run it (without learned variance)")
    if kind is FlexiDiT and cfg.num_classes != 1000:  # DiTPipeline's null class id is 1000
        raise UserError(f"model: {cfg.num_classes} classes; a DiTPipeline's unconditional label is 1000")
    pipe.transformer = ScheduledTransformer(model, schedule, pipe.scheduler, pipe.transformer.config,
                                            cond_first=kind is FlexiDiT)
    return pipe


__all__ = ["ScheduledTransformer", "follow_schedule"]
