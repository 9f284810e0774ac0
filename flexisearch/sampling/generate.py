"""Schedule-driven sampling over diffusers schedulers: the package's one denoising loop.

`denoise` is that loop: it runs steps [start, num_steps) of a schedule on latents with a scheduler
whose timesteps are set (`prepare_scheduler`), and hands the latents to an `on_step` hook after
every step. Both `sample` (below) and `pipeline.FlexiDiTPipeline.__call__` run it.

Every step runs each CFG branch at the patch size the schedule gives it: one batched call when
both branches share a size, one call per size otherwise. In `sample`, each sample's initial noise
(and the noise of stochastic solvers) comes from its own seed, so a sample does not depend on the
batch it was drawn in: schedule comparisons on fixed seeds are fair (common random numbers).

A TrajectoryCache lets schedules that share their first steps share the work: same seeds and same
first steps give the same latents, so a new schedule resumes (`denoise(start=...)`) from the
longest cached prefix; the cache is filled through `on_step`.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..errors import UserError
from ..models.flexible import FlexibleDiT
from .schedule import WEAK_GUIDANCE_RATIO, Schedule, spacing_expected

# DiT's training noise schedule (epsilon and v-prediction models): 1000 linear betas.
_DDPM_BETAS = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
# DiT and PixArt sample latents without clipping the predicted x0 (diffusers' DDPM/DDIM clip to [-1, 1] by default)
_NO_CLIP = {"clip_sample": False}


def make_scheduler(solver: str, prediction: str, learn_sigma: bool = False,
                   timestep_spacing: str | None = None) -> SchedulerMixin:
    """The diffusers scheduler for a solver name and the model's training objective; timestep_spacing (ddpm, ddim:
    diffusers' "leading", "linspace" or "trailing") replaces the scheduler's default spacing."""
    expected = spacing_expected(solver, timestep_spacing)
    if expected is not None:
        raise ValueError(f"timestep_spacing {timestep_spacing!r}: expected {expected}")
    spacing = {} if timestep_spacing is None else {"timestep_spacing": timestep_spacing}
    if prediction == "flow":
        if solver == "euler":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        if solver == "dpm++":
            return DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0)
    elif prediction in ("epsilon", "v_prediction"):
        ddpm = {**_DDPM_BETAS, "prediction_type": prediction}
        if solver == "ddpm":
            variance = "learned_range" if learn_sigma else "fixed_small"
            return DDPMScheduler(**ddpm, **_NO_CLIP, **spacing, variance_type=variance)
        if solver == "ddim":
            return DDIMScheduler(**ddpm, **_NO_CLIP, **spacing)
        if solver == "dpm++":
            return DPMSolverMultistepScheduler(**ddpm)
    raise ValueError(f"solver {solver!r} is not available for {prediction} models")


def uses_learned_variance(scheduler: SchedulerMixin) -> bool:
    return getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")


def guided_output(model: FlexibleDiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, p_cond: int, p_uncond: int,
                  schedule: Schedule, learned_variance: bool) -> torch.Tensor:
    """The model output the scheduler steps with, for one step of the schedule."""
    n, c = x.shape[0], model.config.in_channels
    tt = t.expand(n) if t.dim() == 0 else t
    if not schedule.uses_cfg:
        out = model(x, tt, y, p_cond)
        return out if learned_variance else out[:, :c]
    null = torch.full_like(y, model.null_class)
    scale = schedule.guidance_scale
    if p_cond == p_uncond:
        both = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null]), p_cond)
        cond, uncond = both[:n], both[n:]
    else:
        cond = model(x, tt, y, p_cond)
        if schedule.guidance_mode == "weak_guidance" and p_cond < p_uncond:
            # FlexiDiT: guide the powerful conditional prediction with the weak conditional one.
            uncond = model(x, tt, y, p_uncond)
            scale = 1.0 + (scale - 1.0) / WEAK_GUIDANCE_RATIO
        else:
            uncond = model(x, tt, null, p_uncond)
    g = schedule.guided_channels or c  # DiT's own sampler guides its first 3 latent channels, the 4th stays conditional
    eps = torch.cat([uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g]), cond[:, g:c]], dim=1)
    return torch.cat([eps, cond[:, c:]], dim=1) if learned_variance else eps


@dataclass
class _State:
    x: torch.Tensor
    scheduler: SchedulerMixin
    generators: list[torch.Generator]

    def clone(self) -> _State:
        gens = []
        for g in self.generators:
            h = torch.Generator(device=g.device)
            h.set_state(g.get_state())
            gens.append(h)
        return _State(self.x.clone(), copy.deepcopy(self.scheduler), gens)

    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size() * 2  # latents + a solver history of similar size


class TrajectoryCache:
    """LRU cache of sampler states after each step, keyed by everything that determines them."""

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = max_bytes
        self._store: OrderedDict[str, _State] = OrderedDict()
        self._bytes = 0
        self.calls_saved = 0  # model calls (one per sample per branch per step) skipped thanks to the cache
        self.calls_run = 0

    @staticmethod
    def key(base: str, steps: list[tuple[int, int]]) -> str:
        return hashlib.sha1(f"{base}|{steps}".encode()).hexdigest()

    def longest_prefix(self, base: str, steps: list[tuple[int, int]]) -> tuple[int, _State | None]:
        for i in range(len(steps), 0, -1):
            state = self._store.get(self.key(base, steps[:i]))
            if state is not None:
                self._store.move_to_end(self.key(base, steps[:i]))
                return i, state.clone()
        return 0, None

    def put(self, base: str, steps: list[tuple[int, int]], state: _State) -> None:
        k = self.key(base, steps)
        if k in self._store or state.nbytes() > self.max_bytes:
            return
        self._store[k] = state.clone()
        self._bytes += state.nbytes()
        while self._bytes > self.max_bytes:
            _, old = self._store.popitem(last=False)
            self._bytes -= old.nbytes()


def _calls_per_step(schedule: Schedule, p_cond: int, p_uncond: int) -> int:
    return 1 if not schedule.uses_cfg or p_cond == p_uncond else 2


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Per-sample noise from per-sample CPU generators (kept for the noise of stochastic solvers)."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


def prepare_scheduler(scheduler: SchedulerMixin, num_steps: int, noise: torch.Tensor,
                      device: torch.device) -> torch.Tensor:
    """Set the scheduler's timesteps for num_steps steps; returns the starting latents on device.

    The latents are the unscaled noise times the scheduler's init_noise_sigma (read after
    set_timesteps; flow-matching schedulers have no such scale).
    """
    scheduler.set_timesteps(num_steps, device=device)
    return noise.to(device) * getattr(scheduler, "init_noise_sigma", 1.0)


StepHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def denoise(
    model: FlexibleDiT,
    schedule: Schedule,
    scheduler: SchedulerMixin,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None,
    *,
    start: int = 0,
    autocast_dtype: torch.dtype | None = None,
    on_step: StepHook | None = None,
) -> torch.Tensor:
    """Run steps [start, num_steps) of the schedule on latents x; returns the final latents.

    The package's one denoising loop. `scheduler` has its timesteps set (prepare_scheduler) and,
    when start > 0, the solver state reached after step start - 1. Each step scales the input
    (scale_model_input, if any), casts it to the model's dtype, evaluates guided_output (under
    autocast to autocast_dtype if given) and steps the scheduler with the float32 output; the
    scheduler gets `generator` (noise of stochastic solvers) only if its step takes one.
    `on_step(i, t, x)` is called after each step and returns the latents to continue with.
    Raises UserError unless the scheduler makes exactly one timestep per schedule step.
    """
    steps = schedule.steps()
    if len(scheduler.timesteps) != len(steps):
        raise UserError(f"{type(scheduler).__name__} makes {len(scheduler.timesteps)} timesteps for "
                        f"{len(steps)} steps; a schedule needs one model evaluation per timestep")
    device, dtype = x.device, next(model.parameters()).dtype
    learned_variance = model.config.learn_sigma and uses_learned_variance(scheduler)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scales_input = hasattr(scheduler, "scale_model_input")
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    model.eval()
    for i in range(start, len(steps)):
        t = scheduler.timesteps[i]
        x_in = scheduler.scale_model_input(x, t) if scales_input else x
        with amp:
            out = guided_output(model, x_in.to(dtype), t.to(device), y, *steps[i], schedule, learned_variance)
        x = scheduler.step(out.float(), t, x, **step_kwargs).prev_sample
        if on_step is not None:
            x = on_step(i, t, x)
    return x


@torch.no_grad()
def sample(
    model: FlexibleDiT,
    schedule: Schedule,
    labels: torch.Tensor | list[int],
    seeds: list[int],
    *,
    batch_size: int = 64,
    scheduler: SchedulerMixin | None = None,
    autocast_dtype: torch.dtype | None = None,
    cache: TrajectoryCache | None = None,
    cache_tag: str = "",
    progress: bool = False,
) -> torch.Tensor:
    """Generate one sample per (label, seed) following the schedule; returns (N, C, H, W) on CPU.

    Samples are processed in chunks of batch_size, each by `denoise` from its longest cached
    prefix; the result of a sample depends only on its seed and label. `scheduler` overrides the
    one named by the schedule's solver (any diffusers scheduler with set_timesteps/step). `cache`
    reuses trajectories across calls with the same seeds, labels and cache_tag (the caller's name
    for the sample set, e.g. 'search').
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds")
    cfg = model.config
    device = next(model.parameters()).device
    template = scheduler if scheduler is not None else make_scheduler(schedule.solver, cfg.prediction, cfg.learn_sigma,
                                                                      schedule.timestep_spacing)
    steps = schedule.steps()
    shape = cfg.sample_shape
    outputs = []
    chunks = range(0, len(seeds), batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(chunks) * len(steps), desc="sampling", dynamic_ncols=True)
    for start in chunks:
        chunk_seeds, y = seeds[start:start + batch_size], labels[start:start + batch_size].to(device)
        base = (f"{cache_tag}|{type(template).__name__}|{schedule.solver}|{schedule.timestep_spacing}|"
                f"{schedule.guided_channels}|"
                f"{schedule.num_steps}|{schedule.guidance_scale}|{schedule.guidance_mode}|"
                f"{list(chunk_seeds)}|{y.tolist()}")
        done, state = cache.longest_prefix(base, steps) if cache is not None else (0, None)
        if state is None:
            sched = copy.deepcopy(template)
            noise, gens = initial_noise(chunk_seeds, shape)
            state = _State(prepare_scheduler(sched, schedule.num_steps, noise, device), sched, gens)
        if cache is not None:
            cache.calls_saved += len(chunk_seeds) * sum(_calls_per_step(schedule, *s) for s in steps[:done])
        if bar is not None:
            bar.update(done)

        def after_step(i: int, t: torch.Tensor, x: torch.Tensor, base: str = base, state: _State = state) -> torch.Tensor:
            if cache is not None:
                cache.calls_run += len(chunk_seeds) * _calls_per_step(schedule, *steps[i])
                cache.put(base, steps[: i + 1], _State(x, state.scheduler, state.generators))
            if bar is not None:
                bar.update(1)
            return x

        x = denoise(model, schedule, state.scheduler, state.x, y, state.generators, start=done,
                    autocast_dtype=autocast_dtype, on_step=after_step)
        outputs.append(x.float().cpu())
    if bar is not None:
        bar.close()
    return torch.cat(outputs)
