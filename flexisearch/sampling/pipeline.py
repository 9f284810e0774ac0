"""FlexiDiTPipeline: diffusers-style class-conditional generation that follows a patch-size schedule.

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
them from flexisearch. So stock diffusers loads the folder:

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

FlexiDiTPipeline.from_pretrained never runs those files (code from a folder is only run where the
user asks for it): it reads transformer/ with FlexiDiT.from_pretrained, scheduler/ with the
diffusers scheduler class model_index.json names, vae/ with AutoencoderKL, and id2label.

For the same reason (`.device` and `.dtype` exist only on diffusers/transformers models) the
pipeline's `device`, `dtype` and `to` are defined here. Model CPU offload is not supported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, DiTPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..errors import UserError
from ..files import atomic_write, atomic_write_bytes, atomic_write_json, read_json
from ..models.convert import from_diffusers_dit
from ..models.dit import FlexiDiT, FlexiDiTConfig
from ..models.loading import load_model
from .generate import (
    denoise,
    initial_noise,
    make_scheduler,
    prepare_scheduler,
    uses_learned_variance,
)
from .schedule import SOLVERS, Schedule, spacing_expected

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


# Scheduler settings that change what a solver computes; a pipeline's scheduler must agree with the search's on them.
_SOLVER_KEYS = ("prediction_type", "use_flow_sigmas", "clip_sample", "variance_type", "num_train_timesteps",
                "beta_schedule", "beta_start", "beta_end", "shift", "flow_shift")


# diffusers' custom-pipeline layout: the classes model_index.json names, and the files that import them.
_CUSTOM_INDEX = {"_class_name": ["pipeline", "FlexiDiTPipeline"], "transformer": ["flexidit", "FlexiDiT"]}
_CUSTOM_FILES = {"pipeline.py": "from flexisearch.sampling.pipeline import FlexiDiTPipeline  # noqa: F401\n",
                 "transformer/flexidit.py": "from flexisearch.models.dit import FlexiDiT  # noqa: F401\n"}


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


class FlexiDiTPipeline(DiffusionPipeline):
    """Class-conditional FlexiDiT generation; every step at the patch sizes a Schedule gives it.

    Components: transformer (FlexiDiT), scheduler (any diffusers scheduler with set_timesteps and
    step, e.g. `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`), vae (AutoencoderKL
    for latent models, None for pixel-space models) and id2label (class id -> comma-separated
    names, as in DiTPipeline, see get_label_ids; int keys are accepted too). `transformer` is None
    only while from_pretrained builds the pipeline.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer: FlexiDiT | None, scheduler: SchedulerMixin, vae: AutoencoderKL | None = None,
                 id2label: dict[str, str] | None = None):
        super().__init__()
        self._fingerprint: tuple[FlexiDiT, str] | None = None
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        id2label = None if id2label is None else {str(k): v for k, v in id2label.items()}  # JSON keys are strings
        self.register_to_config(id2label=id2label)
        # name -> class id, every comma-separated synonym a key (DiTPipeline's convention)
        self.labels = dict(sorted((name.strip(), int(k)) for k, names in (id2label or {}).items()
                                  for name in names.split(",")))

    # ---- devices, dtypes, identity ------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def to(self, *args: Any, **kwargs: Any) -> FlexiDiTPipeline:
        """Move and/or cast the transformer and VAE; takes nn.Module.to's arguments.

        A cast keeps the model's identity: the fingerprint schedules are checked against is taken
        before the first dtype change, so a schedule made for the float32 model still applies.
        """
        kwargs.pop("silence_dtype_warnings", None)  # DiffusionPipeline.to's keyword; nothing to silence here
        dtype = kwargs.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
        if dtype is not None and dtype != self.dtype:
            self.model_fingerprint()
        for module in (self.transformer, self.vae):
            if module is not None:
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
                        variant: str | None = None, adapter_base: tuple[FlexiDiT, str] | None = None,
                        **kwargs: Any) -> None:
        """Write model_index.json, transformer/, scheduler/, (if any) vae/ and the two import files of diffusers'
        custom-pipeline layout (module docstring) under save_directory.

        adapter_base (a model and where it is saved) writes transformer/ as an adapter on it (Pretrained.save_adapter).
        safe_serialization, variant and other keywords go to the VAE's save_pretrained; pushing to the Hub is not
        supported.
        """
        if kwargs.get("push_to_hub"):
            raise ValueError("FlexiDiTPipeline.save_pretrained: push_to_hub is not supported; "
                             "save locally and upload the folder")
        directory = Path(save_directory)
        if adapter_base is None:
            self.transformer.save_pretrained(directory / "transformer")
        else:
            self.transformer.save_adapter(directory / "transformer", *adapter_base)
        self.scheduler.save_pretrained(directory / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(directory / "vae", safe_serialization=safe_serialization, variant=variant, **kwargs)
        self.save_config(directory)
        index = read_json(directory / "model_index.json", "pipeline index")
        atomic_write_json(directory / "model_index.json", {**index, **_CUSTOM_INDEX})
        for name, text in _CUSTOM_FILES.items():
            atomic_write_bytes(directory / name, text.encode())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> FlexiDiTPipeline:
        """Load a pipeline folder written by save_pretrained or convert_dit_pipeline, or a Hub repo id of one
        (downloaded with DiffusionPipeline.download's keywords: cache_dir, revision, token, local_files_only).

        `transformer=`, `scheduler=` and `vae=` replace stored components; `torch_dtype=`/`dtype=` also
        casts the transformer (after taking its fingerprint). Runs no code from the folder.
        """
        components = {k: kwargs.pop(k) for k in ("transformer", "scheduler", "vae") if k in kwargs}
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
            components["transformer"] = FlexiDiT.from_pretrained(path / "transformer")
        if "scheduler" not in components:
            components["scheduler"] = _scheduler_class(index, path).from_pretrained(path / "scheduler")
        if "vae" not in components:
            components["vae"] = AutoencoderKL.from_pretrained(path / "vae") if (path / "vae").is_dir() else None
        pipe = cls(**components, id2label=index.get("id2label"))
        if isinstance(dtype, torch.dtype):
            pipe.to(dtype)
        return pipe

    # ---- labels and schedules -----------------------------------------------------------
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
                raise ValueError(f"seeds: {len(seeds)} seeds for {shape[0]} class labels")
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
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r}: expected one of {list(OUTPUT_TYPES)}")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = sorted(set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs))
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {unknown} not in {self._callback_tensor_inputs}")
        schedule = self.resolve_schedule(schedule, num_inference_steps, guidance_scale, adapt_steps=adapt_steps,
                                         adapt_guidance=adapt_guidance, allow_solver_mismatch=allow_solver_mismatch,
                                         allow_model_mismatch=allow_model_mismatch)
        model, cfg, scheduler = self.transformer, self.transformer.config, self.scheduler
        device = self._execution_device
        y = self._class_ids(class_labels)
        shape = (len(y), cfg.in_channels, cfg.input_size, cfg.input_size)
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


class ScheduledDiT(torch.nn.Module):
    """A FlexiDiT in the place of a stock DiTPipeline's transformer (follow_schedule): each call is one denoising
    step, found by its timestep in the pipeline's scheduler, and runs the conditional half of the batch and the
    unconditional half (DiTPipeline's layout) at the patch sizes the schedule gives that step."""

    def __init__(self, model: FlexiDiT, schedule: Schedule, scheduler: SchedulerMixin, config: Any):
        super().__init__()
        self.model, self.schedule, self.scheduler, self.config = model, schedule, scheduler, config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                return_dict: bool = True) -> Any:
        timesteps = self.scheduler.timesteps.to(timestep.device)
        if len(timesteps) != self.schedule.num_steps:
            raise ValueError(f"the pipeline runs {len(timesteps)} steps; the schedule has {self.schedule.num_steps}: "
                             f"call it with num_inference_steps={self.schedule.num_steps}")
        i = int((timesteps == timestep[0]).nonzero()[0, 0])
        p_cond, p_uncond = self.schedule.cond[i], self.schedule.uncond[i]
        t = timestep.to(x.dtype)
        if p_cond == p_uncond or not self.schedule.uses_cfg:  # one size for all rows
            out = self.model(x, t, class_labels, p_cond)
        else:
            n = len(x) // 2
            out = torch.cat([self.model(x[:n], t[:n], class_labels[:n], p_cond),
                             self.model(x[n:], t[n:], class_labels[n:], p_uncond)])
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def follow_schedule(pipe: DiTPipeline, model: FlexiDiT, schedule: Schedule | str | os.PathLike) -> DiTPipeline:
    """Make a stock diffusers DiTPipeline follow a schedule: its transformer is replaced by `model` (the FlexiDiT of
    the schedule, e.g. FlexiDiTPipeline.from_pretrained(folder).transformer) stepping at the schedule's patch
    sizes. Call the pipeline with the schedule's steps and guidance scale:
    `pipe(labels, num_inference_steps=s.num_steps, guidance_scale=s.guidance_scale, generator=g)` gives the
    images of FlexiDiTPipeline for the same generator. The pipeline's scheduler must run the schedule's solver
    without learned variance (DiTPipeline drops the variance channels), and the schedule must use plain CFG."""
    if not isinstance(schedule, Schedule):
        schedule = Schedule.load(schedule)
    cfg = model.config
    schedule.check_model(cfg, model.fingerprint(), "schedule")
    if schedule.guidance_mode != "cfg" or schedule.uses_cfg and schedule.guidance_scale < 1:
        raise UserError(f"schedule: guidance {schedule.guidance_mode} at scale {schedule.guidance_scale:g} needs "
                        "FlexiDiTPipeline; a DiTPipeline guides with plain CFG, at scales above 1")
    if not runs_solver(pipe.scheduler, schedule.solver, cfg, schedule.timestep_spacing) or uses_learned_variance(pipe.scheduler):
        raise UserError(f"schedule: searched with solver {schedule.solver!r}; the DiTPipeline's "
                        f"{type(pipe.scheduler).__name__} does not run it (without learned variance)")
    if cfg.num_classes != 1000:  # DiTPipeline's null class id is 1000
        raise UserError(f"model: {cfg.num_classes} classes; a DiTPipeline's unconditional label is 1000")
    pipe.transformer = ScheduledDiT(model, schedule, pipe.scheduler, pipe.transformer.config)
    return pipe


def dit_to_flexi_pipeline(source: str, weak_patch_sizes: Sequence[int] = (4,)) -> FlexiDiTPipeline:
    """A diffusers DiTPipeline (hub id such as facebook/DiT-XL-2-256, or a directory) as a FlexiDiTPipeline: the
    transformer converted exactly (convert.from_diffusers_dit, an epsilon model) with the weak patch sizes
    added by PI-resize (untrained until flexified); VAE, scheduler and id2label (model_index.json) kept."""
    try:
        index = DiTPipeline.load_config(source)
        if index.get("_class_name") != "DiTPipeline":  # refused before any weights are read
            raise UserError(f"{source}: describes a {index.get('_class_name')!r} pipeline, expected 'DiTPipeline'")
        dit = DiTPipeline.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: cannot load the DiTPipeline ({str(e).splitlines()[0]})") from None
    flexi = from_diffusers_dit(dit.transformer, prediction="epsilon")
    if weak_patch_sizes:
        flexi = flexi.with_patch_sizes(tuple(weak_patch_sizes))
    return FlexiDiTPipeline(transformer=flexi, scheduler=dit.scheduler, vae=dit.vae, id2label=index.get("id2label"))


def convert_dit_pipeline(src_dir: str | os.PathLike, dst_dir: str | os.PathLike,
                         weak_patch_sizes: Sequence[int] = (4,)) -> FlexiDiTPipeline:
    """A diffusers DiTPipeline directory (facebook/DiT-XL-2-256's layout) -> a FlexiDiTPipeline directory
    (dit_to_flexi_pipeline), written next to dst_dir and renamed into place; an existing non-empty dst_dir
    is refused. Fine-tune the weak sizes (`flexisearch train flexify`) before searching schedules."""
    src, dst = Path(src_dir), Path(dst_dir)
    index = read_json(src / "model_index.json", "pipeline index")
    if not isinstance(index, dict) or index.get("_class_name") != "DiTPipeline":
        name = index.get("_class_name") if isinstance(index, dict) else None
        raise UserError(f"{src / 'model_index.json'}: describes a {name!r} pipeline, expected 'DiTPipeline'")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"{dst}: already exists and is not an empty directory")
    pipe = dit_to_flexi_pipeline(str(src), weak_patch_sizes)
    atomic_write(dst, pipe.save_pretrained)  # renamed onto dst, which is absent or empty
    return pipe


def load_flexi_pipeline(spec: str) -> FlexiDiTPipeline:
    """A class-conditional model spec as a FlexiDiTPipeline on the CPU: embedded:<name> or a FlexiDiT directory
    (pixel space: no VAE, the scheduler of its first solver), a FlexiDiTPipeline directory, or a DiTPipeline
    (dit:<hub id or directory>, or its directory; converted, no weak sizes added)."""
    if spec.startswith("dit:"):
        return dit_to_flexi_pipeline(spec.split(":", 1)[1], ())
    if (Path(spec) / "model_index.json").is_file():
        index = read_json(Path(spec) / "model_index.json", "pipeline index")
        if isinstance(index, dict) and index.get("_class_name") == "DiTPipeline":
            return dit_to_flexi_pipeline(spec, ())
        return FlexiDiTPipeline.from_pretrained(spec)
    model = load_model(spec)
    if not isinstance(model, FlexiDiT):
        raise UserError(f"model '{spec}': a {type(model).__name__} is not a class-conditional FlexiDiT "
                        "(text-to-image models are flexified by flexisearch.training.text_dit)")
    cfg = model.config
    return FlexiDiTPipeline(model, make_scheduler(SOLVERS[cfg.prediction][0], cfg.prediction, cfg.learn_sigma))


__all__ = ["FlexiDiTPipeline", "ScheduledDiT", "convert_dit_pipeline", "dit_to_flexi_pipeline", "follow_schedule",
           "load_flexi_pipeline", "runs_solver"]
