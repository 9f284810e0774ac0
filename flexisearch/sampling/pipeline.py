"""Diffusers pipelines that follow a patch-size schedule: FlexiPipeline (what every one shares) and FlexiDiTPipeline
(class-conditional); text_pipeline.FlexiTextDiTPipeline is the text-to-image one.

An exported best.json (or any schedule file, docs/schedule.md) drives the pipeline directly:

    pipe = FlexiDiTPipeline.from_pretrained("flexidit-xl-256")
    images = pipe([207, 360], schedule="runs/study/best.json").images

The denoising loop is the package's one loop, `generate.denoise`, which `generate.sample` runs
too: each step runs the conditional and unconditional branch at the sizes the schedule gives them
(`generate.guided_output`); the pipeline's progress bar and `callback_on_step_end` go through the
loop's per-step hook. With per-sample `seeds` the result is exactly that of `generate.sample`. A
schedule made for another model, step count, guidance scale or solver is refused unless the call
opts in to adapting it (see `FlexiDiTPipeline.__call__`).

Saving and loading. diffusers loads a component only if its class derives from one of the bases
in `pipeline_loading_utils.LOADABLE_CLASSES` (ModelMixin, SchedulerMixin, PreTrainedModel, ...),
or if it is custom code in the pipeline folder, which is how a pipeline outside diffusers is shared.
FlexiDiT is a plain nn.Module, so save_pretrained writes the folder in diffusers' custom-pipeline
layout: model_index.json names the pipeline ["pipeline", "FlexiDiTPipeline"] and the transformer
["flexidit", "FlexiDiT"], and two one-line files, pipeline.py and transformer/flexidit.py, import
them from flexisearch (likewise FlexiTextDiTPipeline and FlexiTextDiT). So stock diffusers loads the folder:

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

FlexiPipeline.from_pretrained never runs those files (code from a folder is only run where the
user asks for it): it reads transformer/ with FlexiDiT.from_pretrained (FlexiTextDiT), scheduler/ with the
diffusers scheduler class model_index.json names, vae/ with AutoencoderKL, and id2label (the text encoder and
tokenizer with the transformers classes it names).

For the same reason (`.device` and `.dtype` exist only on diffusers/transformers models) the
pipeline's `device`, `dtype` and `to` are defined here. Model CPU offload is not supported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..errors import UserError
from ..files import atomic_write_bytes, atomic_write_json, read_json
from ..models.dit import FlexiDiT, FlexiDiTConfig
from ..models.flexible import FlexibleDiT
from .generate import (
    denoise,
    initial_noise,
    make_scheduler,
    prepare_scheduler,
)
from .schedule import SOLVERS, Schedule, spacing_expected

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


# Scheduler settings that change what a solver computes; a pipeline's scheduler must agree with the search's on them.
_SOLVER_KEYS = ("prediction_type", "use_flow_sigmas", "clip_sample", "variance_type", "num_train_timesteps",
                "beta_schedule", "beta_start", "beta_end", "shift", "flow_shift")


def _scheduler_class(index: dict, path: Path) -> type[SchedulerMixin]:
    """The diffusers scheduler class model_index.json names (nothing else is imported)."""
    import diffusers

    name = index.get("scheduler", [None, None])[1] if isinstance(index.get("scheduler"), list) else None
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise UserError(f"{path / 'model_index.json'}: field 'scheduler' names {name!r}, expected a diffusers scheduler")
    return cls


def runs_solver(scheduler: SchedulerMixin, solver: str, config: FlexiDiTConfig,
                timestep_spacing: str | None = None) -> bool:
    """Whether a scheduler computes what the search's `solver` did: its class and the settings that matter
    (a DPM-Solver made from a flow model's config with from_config predicts epsilon, not flow), and its timestep
    spacing when the search set one (otherwise the spacing is the scheduler's own)."""
    made = make_scheduler(solver, config.prediction, config.learn_sigma, timestep_spacing)
    keys = _SOLVER_KEYS if timestep_spacing is None else (*_SOLVER_KEYS, "timestep_spacing")
    return isinstance(scheduler, type(made)) and all(
        getattr(scheduler.config, k, None) == made.config[k] for k in keys if k in made.config)


class FlexiPipeline(DiffusionPipeline):
    """What the schedule-following pipelines share: devices and dtypes, the model fingerprint, saving and loading in
    diffusers' custom-pipeline layout (module docstring), schedules checked against the model and scheduler, and one
    generation run (`_generate`) over the package's one denoising loop. A subclass names its model class, its
    layout (`_layout`: the module and class model_index.json names for the pipeline and the transformer), and how
    its __call__ turns its inputs into the rows the model is conditioned on."""

    model_class: type[FlexibleDiT]
    _layout: dict[str, tuple[str, str]]  # pipeline / transformer -> (module of flexisearch, class name)
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents"]
    _fingerprint: tuple[FlexibleDiT, str] | None = None

    # ---- devices, dtypes, identity ------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def to(self, *args: Any, **kwargs: Any) -> FlexiPipeline:
        """Move and/or cast the transformer, VAE and text encoder; takes nn.Module.to's arguments.

        A cast keeps the model's identity: the fingerprint schedules are checked against is taken
        before the first dtype change, so a schedule made for the float32 model still applies.
        """
        kwargs.pop("silence_dtype_warnings", None)  # DiffusionPipeline.to's keyword; nothing to silence here
        dtype = kwargs.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
        if dtype is not None and dtype != self.dtype:
            self.model_fingerprint()
        for module in self.components.values():
            if isinstance(module, torch.nn.Module):
                module.to(*args, **kwargs)
        return self

    def model_fingerprint(self, refresh: bool = False) -> str:
        """FlexiDiT.fingerprint of the transformer, computed once per transformer object.

        Hashing every weight takes seconds for a DiT-XL, so it is not redone per call; after
        editing the weights in place, call model_fingerprint(refresh=True).
        """
        if refresh or self._fingerprint is None or self._fingerprint[0] is not self.transformer:
            self._fingerprint = (self.transformer, self.transformer.fingerprint())
        return self._fingerprint[1]

    # ---- saving and loading (see the module docstring) ----------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, adapter_base: tuple[FlexibleDiT, str] | None = None,
                        **kwargs: Any) -> None:
        """Write model_index.json, transformer/, scheduler/, the components it has of vae/, text_encoder/ and
        tokenizer/, and the two import files of diffusers' custom-pipeline layout (module docstring) under
        save_directory.

        adapter_base (a model and where it is saved) writes transformer/ as an adapter on it (Pretrained.save_adapter).
        safe_serialization, variant and other keywords go to the VAE's save_pretrained; pushing to the Hub is not
        supported.
        """
        if kwargs.get("push_to_hub"):
            raise ValueError(f"{type(self).__name__}.save_pretrained: push_to_hub is not supported; "
                             "save locally and upload the folder")
        directory = Path(save_directory)
        if adapter_base is None:
            self.transformer.save_pretrained(directory / "transformer")
        else:
            self.transformer.save_adapter(directory / "transformer", *adapter_base)
        self.scheduler.save_pretrained(directory / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(directory / "vae", safe_serialization=safe_serialization, variant=variant, **kwargs)
        for name in ("text_encoder", "tokenizer"):
            if getattr(self, name, None) is not None:
                getattr(self, name).save_pretrained(directory / name)
        self.save_config(directory)
        index = read_json(directory / "model_index.json", "pipeline index")
        (pipe_module, pipe_class), (model_module, model_class) = self._layout["pipeline"], self._layout["transformer"]
        file = model_class.lower()
        atomic_write_json(directory / "model_index.json",
                          {**index, "_class_name": ["pipeline", pipe_class], "transformer": [file, model_class]})
        for name, module, cls in (("pipeline.py", pipe_module, pipe_class),
                                  (f"transformer/{file}.py", model_module, model_class)):
            atomic_write_bytes(directory / name, f"from flexisearch.{module} import {cls}  # noqa: F401\n".encode())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> FlexiPipeline:
        """Load a pipeline folder written by save_pretrained or convert_pipeline, or a Hub repo id of one
        (downloaded with DiffusionPipeline.download's keywords: cache_dir, revision, token, local_files_only).

        `transformer=`, `scheduler=`, `vae=` (and the text pipeline's `text_encoder=`, `tokenizer=`) replace stored
        components; `torch_dtype=`/`dtype=` also casts the transformer (after taking its fingerprint). Runs no code
        from the folder.
        """
        components = {k: kwargs.pop(k) for k in ("transformer", "scheduler", "vae", "text_encoder", "tokenizer")
                      if k in kwargs}
        dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            try:
                path = Path(DiffusionPipeline.download(str(pretrained_model_name_or_path), **kwargs))
            except Exception as e:  # offline, unknown repo, no access: one line
                raise UserError(f"{pretrained_model_name_or_path}: not a local pipeline folder and cannot be "
                                f"downloaded ({str(e).splitlines()[0]})") from None
        index = read_json(path / "model_index.json", "pipeline index")
        if "transformer" not in components:
            components["transformer"] = cls.model_class.from_pretrained(path / "transformer")
        if "scheduler" not in components:
            components["scheduler"] = _scheduler_class(index, path).from_pretrained(path / "scheduler")
        if "vae" not in components:
            components["vae"] = AutoencoderKL.from_pretrained(path / "vae") if (path / "vae").is_dir() else None
        stored = cls._stored_parts(path, index, set(components))
        pipe = cls(**{k: v for k, v in stored.items() if k not in components}, **components)
        if isinstance(dtype, torch.dtype):
            pipe.to(dtype)
        return pipe

    @classmethod
    def _stored_parts(cls, path: Path, index: dict, given: set[str]) -> dict[str, Any]:
        """The constructor arguments of a saved folder beyond transformer, scheduler and vae (those not `given`)."""
        return {}

    # ---- schedules -----------------------------------------------------------------------
    def _solver_name(self) -> str | None:
        """The solver name the pipeline's scheduler runs, if any."""
        cfg = self.transformer.config
        return next((s for s in SOLVERS[cfg.prediction] if runs_solver(self.scheduler, s, cfg)), None)

    def use_solver(self, solver: str, timestep_spacing: str | None = None) -> None:
        """Swap the scheduler for the one a schedule's solver and timestep spacing name, set up as the search ran it."""
        cfg = self.transformer.config
        if solver not in SOLVERS[cfg.prediction]:
            raise UserError(f"solver {solver!r}: a {cfg.prediction} model runs {', '.join(SOLVERS[cfg.prediction])}")
        expected = spacing_expected(solver, timestep_spacing)
        if expected is not None:
            raise UserError(f"timestep_spacing {timestep_spacing!r}: expected {expected}")
        self.register_modules(scheduler=make_scheduler(solver, cfg.prediction, cfg.learn_sigma, timestep_spacing))

    def resolve_schedule(self, schedule: Schedule | str | os.PathLike | None = None, num_inference_steps: int | None = None,
                         guidance_scale: float | None = None, *, adapt_steps: bool = False, adapt_guidance: bool = False,
                         allow_solver_mismatch: bool = False, allow_model_mismatch: bool = False) -> Schedule:
        """The schedule a call runs: checked against this pipeline, adapted only where asked.

        None: static native, num_inference_steps (default 50) steps at guidance_scale (default
        4.0). A file or Schedule is refused (UserError) if made for another model fingerprint
        (unless allow_model_mismatch), if the scheduler does not run its solver (runs_solver: the
        class, the settings that change what it computes, and the timestep spacing when the schedule
        sets one; unless allow_solver_mismatch), or if num_inference_steps / guidance_scale differ
        from its own (unless adapt_steps: Schedule.resample; adapt_guidance: replace the scale).
        """
        cfg = self.transformer.config
        if schedule is None:
            # Built here for this model and scheduler, never checked: the solver and model fields are informative only.
            return Schedule.static(cfg.patch_size, 50 if num_inference_steps is None else num_inference_steps,
                                   guidance_scale=4.0 if guidance_scale is None else guidance_scale,
                                   solver=self._solver_name() or SOLVERS[cfg.prediction][0], model="static-native")
        source = "schedule" if isinstance(schedule, Schedule) else str(schedule)
        if not isinstance(schedule, Schedule):
            schedule = Schedule.load(schedule)
        schedule.check_model(cfg, None if allow_model_mismatch else self.model_fingerprint(), source)
        spacing = schedule.timestep_spacing
        if not allow_solver_mismatch and not runs_solver(self.scheduler, schedule.solver, cfg, spacing):
            expected = type(make_scheduler(schedule.solver, cfg.prediction, cfg.learn_sigma, spacing)).__name__
            spaced = "" if spacing is None else f", timestep_spacing={spacing!r}"
            raise UserError(f"{source}: searched with solver {schedule.solver!r} ({expected}{spaced}), but the "
                            f"pipeline's scheduler is a {type(self.scheduler).__name__} set up otherwise; call "
                            f"pipe.use_solver({schedule.solver!r}{spaced}), or pass allow_solver_mismatch=True")
        if num_inference_steps is not None and num_inference_steps != schedule.num_steps:
            if not adapt_steps:
                raise UserError(f"{source}: the schedule has {schedule.num_steps} steps, num_inference_steps is "
                                f"{num_inference_steps}; leave num_inference_steps unset, or pass adapt_steps=True to "
                                "resample the schedule (keeps its weak share per phase, docs/schedule.md)")
            schedule = schedule.resample(num_inference_steps)
        if guidance_scale is not None and guidance_scale != schedule.guidance_scale:
            if not adapt_guidance:
                raise UserError(f"{source}: the schedule was searched at guidance_scale {schedule.guidance_scale}, "
                                f"guidance_scale is {guidance_scale}; leave guidance_scale unset, "
                                "or pass adapt_guidance=True")
            schedule = schedule.replace(guidance_scale=guidance_scale)
        return schedule

    # ---- generation ---------------------------------------------------------------------
    def _initial_latents(self, shape: tuple[int, ...], seeds: Sequence[int] | None,
                         generator: torch.Generator | list[torch.Generator] | None, latents: torch.Tensor | None,
                         device: torch.device) -> tuple[torch.Tensor, torch.Generator | list[torch.Generator] | None]:
        """Unscaled starting noise and the generator(s) for the noise of stochastic solvers."""
        if seeds is not None:
            if latents is not None or generator is not None:
                raise ValueError("seeds: give per-sample seeds, or generator / latents, not both")
            if len(seeds) != shape[0]:
                raise ValueError(f"seeds: {len(seeds)} seeds for {shape[0]} images")
            x, generators = initial_noise(list(seeds), shape[1:])
            return x.to(device), generators
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32), generator
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents: shape {tuple(latents.shape)}, expected {shape}")
        return latents.to(device, torch.float32), generator

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1]: VAE decode of latents (scaled as DiTPipeline does), or the samples themselves."""
        if self.vae is None:
            return latents
        return self.vae.decode((1 / self.vae.config.scaling_factor * latents).to(self.vae.dtype)).sample.float()

    def _generate(self, y: torch.Tensor, schedule: Schedule | str | os.PathLike | None, num_inference_steps: int | None,
                  guidance_scale: float | None, generator: torch.Generator | list[torch.Generator] | None,
                  latents: torch.Tensor | None, output_type: str, return_dict: bool,
                  callback_on_step_end: Callable[..., dict[str, Any]] | PipelineCallback | MultiPipelineCallbacks | None,
                  callback_on_step_end_tensor_inputs: Sequence[str], seeds: Sequence[int] | None,
                  **schedule_options: bool) -> ImagePipelineOutput | tuple:
        """One image per row of y (the model's conditioning: class ids, prompt rows) following the schedule (the
        arguments of FlexiDiTPipeline.__call__; schedule_options go to resolve_schedule)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r}: expected one of {list(OUTPUT_TYPES)}")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = sorted(set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs))
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {unknown} not in {self._callback_tensor_inputs}")
        schedule = self.resolve_schedule(schedule, num_inference_steps, guidance_scale, **schedule_options)
        model, cfg, scheduler = self.transformer, self.transformer.config, self.scheduler
        device = self._execution_device
        shape = (len(y), *cfg.sample_shape)
        latents, generator = self._initial_latents(shape, seeds, generator, latents, device)
        latents = prepare_scheduler(scheduler, schedule.num_steps, latents, device)

        with self.progress_bar(total=schedule.num_steps) as bar:
            def on_step(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
                if callback_on_step_end is not None:
                    returned = callback_on_step_end(self, i, t, dict.fromkeys(callback_on_step_end_tensor_inputs, latents))
                    latents = returned.pop("latents", latents)
                bar.update()
                return latents

            latents = denoise(model, schedule, scheduler, latents, y, generator, on_step=on_step)

        if output_type == "latent":
            images = latents
        else:
            images = (self._decode(latents) / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class FlexiDiTPipeline(FlexiPipeline):
    """Class-conditional FlexiDiT generation; every step at the patch sizes a Schedule gives it.

    Components: transformer (FlexiDiT), scheduler (any diffusers scheduler with set_timesteps and
    step, e.g. `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`), vae (AutoencoderKL
    for latent models, None for pixel-space models) and id2label (class id -> comma-separated
    names, as in DiTPipeline, see get_label_ids; int keys are accepted too). `transformer` is None
    only while from_pretrained builds the pipeline.
    """

    model_class = FlexiDiT
    _layout = {"pipeline": ("sampling.pipeline", "FlexiDiTPipeline"), "transformer": ("models.dit", "FlexiDiT")}
    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer: FlexiDiT | None, scheduler: SchedulerMixin, vae: AutoencoderKL | None = None,
                 id2label: dict[str, str] | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        id2label = None if id2label is None else {str(k): v for k, v in id2label.items()}  # JSON keys are strings
        self.register_to_config(id2label=id2label)
        # name -> class id, every comma-separated synonym a key (DiTPipeline's convention)
        self.labels = dict(sorted((name.strip(), int(k)) for k, names in (id2label or {}).items()
                                  for name in names.split(",")))

    @classmethod
    def _stored_parts(cls, path: Path, index: dict, given: set[str]) -> dict[str, Any]:
        return {"id2label": index.get("id2label")}

    # ---- labels ------------------------------------------------------------------------
    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class ids of label names (any synonym in id2label), for `class_labels`."""
        names = [label] if isinstance(label, str) else list(label)
        for name in names:
            if name not in self.labels:
                raise ValueError(f"label {name!r} does not exist; choose among {list(self.labels)}")
        return [self.labels[name] for name in names]

    def _class_ids(self, class_labels: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels).reshape(-1)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or len(ids) == 0:
            raise ValueError("class_labels: expected one or more integer class ids (names: use get_label_ids)")
        null = self.transformer.null_class
        if ids.min() < 0 or ids.max() > null:
            raise ValueError(f"class_labels: ids must be in 0..{null} ({null} = the null class, unconditional)")
        return ids.long().to(self._execution_device)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        schedule: Schedule | str | os.PathLike | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
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
        """Generate one image per class label following `schedule`.

        Args:
            class_labels: class ids (names: get_label_ids); the null class id gives unconditional samples.
            schedule: a Schedule, or a schedule / best.json file; None = static native (see resolve_schedule).
            num_inference_steps, guidance_scale: None = the schedule's; other values need adapt_steps /
                adapt_guidance (see resolve_schedule).
            generator: torch generator(s) for the initial noise (randn_tensor, as diffusers pipelines)
                and for stochastic solvers.
            latents: starting noise (N, C, H, W), before the scheduler's init_noise_sigma scaling.
            output_type: "pil", "np" (N, H, W, C in [0, 1]), "pt" (N, C, H, W in [0, 1]) or "latent"
                (the final latents, or pixel samples in [-1, 1] for a model without VAE).
            callback_on_step_end: called as fn(pipe, step, timestep, {name: tensor}) after every
                step; a returned "latents" replaces the latents.
            seeds: one seed per image, instead of generator/latents: the noise and result of an image
                depend only on its seed and label, as in generate.sample (identical output).
            allow_solver_mismatch, allow_model_mismatch: accept a schedule searched with another
                solver, or for another model fingerprint.
        """
        return self._generate(self._class_ids(class_labels), schedule, num_inference_steps, guidance_scale, generator,
                              latents, output_type, return_dict, callback_on_step_end,
                              callback_on_step_end_tensor_inputs, seeds, adapt_steps=adapt_steps,
                              adapt_guidance=adapt_guidance, allow_solver_mismatch=allow_solver_mismatch,
                              allow_model_mismatch=allow_model_mismatch)


__all__ = ["FlexiDiTPipeline", "FlexiPipeline", "runs_solver"]
