"""Schedule spaces: one class per space type, each proposing schedules from an Optuna trial.

Every space is joint with the sampler settings (num_steps, guidance_scale, guidance_mode, solver: a
`Choice` each; timestep_spacing is one fixed value for every schedule) and adds its own patch-size parameters:
  threshold         the paper's family: weak for the first fraction f of the steps
  branch_threshold  separate fractions for the conditional and the unconditional branch
  segments          a staircase: n segments with free breakpoints, each with its own patch size
  per_step          a free patch size per step (per branch with branches: separate)
Fractions (not step indices, multiples of 0.05) parametrise thresholds so that a searcher's knowledge
carries over between step counts; fraction f of n steps is round(f * n) steps (Python's round). A space answers three questions, in the manner of Optuna's samplers: which
schedule a trial proposes (`suggest`, define-by-run; a FixedTrial replays given parameters), the
full grid (`grid`, for brute force), the trial parameters of the paper's "weak for the first
fraction f" schedule (`paper_params`), and those of the schedule of the space nearest to any given one
(`params_of`, for warm starts). A new space type is one subclass and one line in SPACES.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..models.layers import Size, patch_shape, size_key
from ..sampling.schedule import Schedule

FRACTION_STEP = 0.05
SETTINGS = ("num_steps", "guidance_scale", "guidance_mode", "solver")


@dataclass(frozen=True)
class Choice:
    """A searched dimension: a list of values, or a float range with an optional step."""

    values: tuple = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None

    @property
    def fixed(self) -> Any:
        return self.values[0] if len(self.values) == 1 else None

    def suggest(self, trial: Any, name: str) -> Any:
        if self.values:
            return self.values[0] if len(self.values) == 1 else trial.suggest_categorical(name, list(self.values))
        return trial.suggest_float(name, self.low, self.high, step=self.step)

    def nearest(self, value: Any) -> Any:
        """The offered value nearest to `value` (itself when offered; for names: the first offered one)."""
        if self.values:
            if value in self.values or isinstance(value, str):
                return value if value in self.values else self.values[0]
            return min(self.values, key=lambda v: abs(v - value))
        v = min(max(float(value), self.low), self.high)
        return v if self.step is None else round(self.low + round((v - self.low) / self.step) * self.step, 10)

    def enumerate(self) -> list:
        if self.values:
            return list(self.values)
        if self.step is None:
            raise UserError("a continuous range cannot be enumerated (give it a step, or use another sampler)")
        n = int(round((self.high - self.low) / self.step))
        return [round(self.low + i * self.step, 10) for i in range(n + 1)]


@dataclass(frozen=True)
class SpaceConfig:
    type: str = "branch_threshold"
    num_steps: Choice = Choice((20,))
    guidance_scale: Choice = Choice((2.0,))
    guidance_mode: Choice = Choice(("cfg",))
    solver: Choice = Choice(("euler",))
    timestep_spacing: str | None = None  # ddpm / ddim: diffusers' spacing ("linspace": DiT's own); None: the default
    guided_channels: int | None = None  # guidance on the first n output channels only (DiT's own sampler: 3)
    weak_patch_size: int | tuple[int, ...] | None = None  # default: the model's extra size with the fewest tokens
    segments: int = 3
    branches: str = "joint"  # per_step / segments: "joint" (one size for both branches) or "separate"


def _fraction(trial: Any, name: str) -> float:
    return trial.suggest_float(name, 0.0, 1.0, step=FRACTION_STEP)


FRACTIONS = [round(FRACTION_STEP * i, 2) for i in range(round(1 / FRACTION_STEP) + 1)]


def nearest_fraction(k: int, n: int) -> float:
    """The fraction parameter nearest to k of n steps (round(f * n) == k for every k when n <= 20)."""
    return min(FRACTIONS, key=lambda f: abs(f - k / n))


class Space:
    """A family of schedules for one model: native and weak patch size, all sizes, its fingerprint."""

    def __init__(self, cfg: SpaceConfig, native: Size, weak: Size, patch_sizes: tuple[Size, ...], fingerprint: str):
        self.cfg, self.native, self.weak = cfg, native, weak
        self.patch_sizes, self.fingerprint = tuple(patch_sizes), fingerprint
        # A trial parameter is a size itself (int) or, for a video size, its key "2x2x2" (Optuna's categorical
        # choices are scalars).
        self.choices = [p if isinstance(p, int) else size_key(p) for p in self.patch_sizes]
        self._size_of = dict(zip(self.choices, self.patch_sizes))

    def suggest(self, trial: Any) -> Schedule:
        """The schedule a trial (Optuna Trial or FixedTrial) proposes."""
        n = int(self.cfg.num_steps.suggest(trial, "num_steps"))
        cond, uncond = self._sizes(trial, n)
        return Schedule(cond=cond, uncond=uncond, model=self.fingerprint,
                        guidance_scale=float(self.cfg.guidance_scale.suggest(trial, "guidance_scale")),
                        guidance_mode=self.cfg.guidance_mode.suggest(trial, "guidance_mode"),
                        solver=self.cfg.solver.suggest(trial, "solver"), timestep_spacing=self.cfg.timestep_spacing,
                        guided_channels=self.cfg.guided_channels)

    def grid(self) -> dict[str, list]:
        """Every parameter's values, for Optuna's BruteForceSampler (and the size of the space)."""
        g = {name: getattr(self.cfg, name).enumerate() for name in SETTINGS if getattr(self.cfg, name).fixed is None}
        return {**g, **self._grid(max(self.cfg.num_steps.enumerate()))}

    def paper_params(self, settings: dict[str, Any], fraction: float) -> dict[str, Any]:
        """Trial parameters of the paper's schedule, weak for the first `fraction` of the steps."""
        return {**settings, **self._paper(int(settings.get("num_steps", self.cfg.num_steps.fixed)), fraction)}

    def params_of(self, schedule: Schedule) -> dict[str, Any]:
        """Trial parameters of the space's schedule nearest to `schedule` (e.g. another model's best): its
        settings, or the nearest the space offers (the step count too: the sizes are then resampled), and its
        patch sizes as the space can express them (the same where it can)."""
        n = self.cfg.num_steps.nearest(schedule.num_steps)
        s = schedule.resample(n)
        settings = {name: getattr(self.cfg, name).nearest(getattr(s, name)) for name in SETTINGS
                    if getattr(self.cfg, name).fixed is None}
        sizes = {"cond": self._own_sizes(s.cond), "uncond": self._own_sizes(s.uncond)}
        sizes["both"] = sizes["cond"]  # a space with one size per step for both branches follows the conditional
        return {**settings, **self._params(sizes, n)}

    def _own_sizes(self, sizes: tuple[Size, ...]) -> tuple[Size, ...]:
        """Each size, or the nearest this model has (a sibling model may offer others; distance per axis)."""
        def distance(q: Size, p: Size) -> int:
            return sum(abs(a - b) for a, b in zip(patch_shape(q), patch_shape(p)))
        return tuple(min(self.patch_sizes, key=lambda q: (distance(q, p), q)) for p in sizes)

    def _suggest_size(self, trial: Any, name: str) -> Size:
        return self._size_of[trial.suggest_categorical(name, self.choices)]

    def _choice(self, p: Size) -> int | str:
        return p if isinstance(p, int) else size_key(p)

    def _weak_steps(self, sizes: tuple[int, ...], n: int) -> float:
        """The fraction of the steps that are not native (as a fraction parameter, nearest_fraction)."""
        return nearest_fraction(sum(p != self.native for p in sizes), n)

    def _params(self, sizes: dict[str, tuple[int, ...]], n: int) -> dict[str, Any]:
        raise NotImplementedError

    def _weak_first(self, k: int, n: int) -> tuple[int, ...]:
        return (self.weak,) * k + (self.native,) * (n - k)

    def _branches(self) -> tuple[str, ...]:
        return ("cond", "uncond") if self.cfg.branches == "separate" else ("both",)

    def _sizes(self, trial: Any, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def _grid(self, n_max: int) -> dict[str, list]:
        raise UserError(f"{self.cfg.type} spaces are not enumerable; use another sampler")

    def _paper(self, n: int, fraction: float) -> dict[str, Any]:
        raise NotImplementedError


class ThresholdSpace(Space):
    """The paper's family: both branches weak for the first fraction of the steps."""

    def _sizes(self, trial: Any, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        sizes = self._weak_first(round(_fraction(trial, "weak_frac") * n), n)
        return sizes, sizes

    def _grid(self, n_max: int) -> dict[str, list]:
        return {"weak_frac": FRACTIONS}

    def _paper(self, n: int, fraction: float) -> dict[str, Any]:
        return {"weak_frac": fraction}

    def _params(self, sizes: dict[str, tuple[int, ...]], n: int) -> dict[str, Any]:
        return {"weak_frac": self._weak_steps(sizes["cond"], n)}


class BranchThresholdSpace(Space):
    """Weak for the first fraction of the conditional and (another fraction) of the unconditional steps."""

    def _sizes(self, trial: Any, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self._weak_first(round(_fraction(trial, "weak_frac_cond") * n), n),
                self._weak_first(round(_fraction(trial, "weak_frac_uncond") * n), n))

    def _grid(self, n_max: int) -> dict[str, list]:
        return {"weak_frac_cond": FRACTIONS, "weak_frac_uncond": FRACTIONS}

    def _paper(self, n: int, fraction: float) -> dict[str, Any]:
        return {"weak_frac_cond": fraction, "weak_frac_uncond": fraction}

    def _params(self, sizes: dict[str, tuple[int, ...]], n: int) -> dict[str, Any]:
        return {f"weak_frac_{b}": self._weak_steps(sizes[b], n) for b in ("cond", "uncond")}


class PerStepSpace(Space):
    """A free patch size per step, shared by both branches or (branches: separate) per branch."""

    def _sizes(self, trial: Any, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        sizes = {b: tuple(self._suggest_size(trial, f"{b}_p{i}") for i in range(n)) for b in self._branches()}
        return sizes.get("cond", sizes.get("both")), sizes.get("uncond", sizes.get("both"))

    def _grid(self, n_max: int) -> dict[str, list]:
        return {f"{b}_p{i}": list(self.choices) for b in self._branches() for i in range(n_max)}

    def _paper(self, n: int, fraction: float) -> dict[str, Any]:
        return self._params({b: self._weak_first(round(fraction * n), n) for b in ("both", "cond", "uncond")}, n)

    def _params(self, sizes: dict[str, tuple[int, ...]], n: int) -> dict[str, Any]:
        return {f"{b}_p{i}": self._choice(sizes[b][i]) for b in self._branches() for i in range(n)}


class SegmentsSpace(Space):
    """A staircase: segment j uses size levels[j]; sorted cut points (fractions of the steps) separate them."""

    def _sizes(self, trial: Any, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        m, sizes = self.cfg.segments, {}
        for b in self._branches():
            levels = [self._suggest_size(trial, f"{b}_seg{j}") for j in range(m)]
            cuts = sorted(_fraction(trial, f"{b}_cut{j}") for j in range(m - 1))
            bounds = [0] + [round(c * n) for c in cuts] + [n]
            sizes[b] = tuple(levels[j] for j in range(m) for _ in range(bounds[j + 1] - bounds[j]))
        return sizes.get("cond", sizes.get("both")), sizes.get("uncond", sizes.get("both"))

    def _paper(self, n: int, fraction: float) -> dict[str, Any]:
        m, p = self.cfg.segments, {}
        for b in self._branches():
            p.update({f"{b}_seg{j}": self._choice(self.weak if j == 0 else self.native) for j in range(m)})
            p.update({f"{b}_cut{j}": fraction for j in range(m - 1)})
        return p

    def _params(self, sizes: dict[str, tuple[int, ...]], n: int) -> dict[str, Any]:
        """The staircase of the schedule's runs of equal sizes; one with more runs than segments becomes the
        paper's schedule with as many weak steps."""
        m, p = self.cfg.segments, {}
        for b in self._branches():
            runs = [(size, sum(1 for _ in group)) for size, group in itertools.groupby(sizes[b])]
            if len(runs) > m:
                p.update({k: v for k, v in self._paper(n, self._weak_steps(sizes[b], n)).items() if k.startswith(b)})
                continue
            runs += [(runs[-1][0], 0)] * (m - len(runs))  # empty segments at the end
            ends = list(itertools.accumulate(length for _, length in runs))
            p.update({f"{b}_seg{j}": self._choice(size) for j, (size, _) in enumerate(runs)})
            p.update({f"{b}_cut{j}": nearest_fraction(ends[j], n) for j in range(m - 1)})
        return p


SPACES: dict[str, type[Space]] = {"threshold": ThresholdSpace, "branch_threshold": BranchThresholdSpace,
                                  "segments": SegmentsSpace, "per_step": PerStepSpace}


def make_space(cfg: SpaceConfig, native: Size, weak: Size, patch_sizes: tuple[Size, ...], fingerprint: str) -> Space:
    return SPACES[cfg.type](cfg, native, weak, patch_sizes, fingerprint)
