"""Schedule: which patch size every denoising step uses, per classifier-free-guidance branch.

A Schedule is an immutable value with a versioned JSON form (schemas: schemas/schedule.v1.json to
schedule.v3.json, documented in docs/schedule.md). Compatibility rule: a reader accepts every file whose
`version` it knows (currently 1 to 3); a new version is only introduced for changes old readers cannot
ignore, and a schedule is written with the lowest version that holds it. Version 2 adds `timestep_spacing`;
version 3 allows (time, height, width) sizes of video models and `guided_channels`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from ..errors import UserError
from ..files import PACKAGE, atomic_write_json, read_json

Size = int | tuple[int, ...]  # a patch size: an int (image), (t, h, w) (video)

SCHEMA_VERSIONS = (1, 2, 3)
MAX_GUIDANCE = 100.0  # larger guidance scales only saturate images (the schema says so too)
SOLVERS = {"flow": ("euler", "dpm++"), "epsilon": ("ddpm", "ddim", "dpm++"),
           "v_prediction": ("ddpm", "ddim", "dpm++")}
# Timestep spacings (diffusers' names) a solver takes; without one, its scheduler's default ("leading" for ddpm and
# ddim). "linspace" is DiT's own respacing (space_timesteps). diffusers' DDIMScheduler steps from t to
# t - 1000 // num_steps, the next timestep only under "leading" (diffusers issue #12633), so ddim takes no other.
TIMESTEP_SPACINGS = {"ddpm": ("leading", "linspace", "trailing"), "ddim": ("leading",)}
GUIDANCE_MODES = ("cfg", "weak_guidance")
# The paper's "guide with a bad version of itself": (1 - s_cfg) / (1 - s_weak) = 2.5 worked consistently.
WEAK_GUIDANCE_RATIO = 2.5


@cache
def _schema(version: int) -> dict:
    return json.loads((PACKAGE / "schemas" / f"schedule.v{version}.json").read_text())


def spacing_expected(solver: str, spacing: str | None) -> str | None:
    """None when `solver` takes timestep spacing `spacing` (None: the solver's default); else what it takes."""
    takes = TIMESTEP_SPACINGS.get(solver, ())
    if spacing is None or spacing in takes:
        return None
    if not takes:
        return f"none for solver {solver!r} (only ddpm and ddim take a timestep spacing)"
    why = " (diffusers' DDIMScheduler steps by a fixed stride, exact for 'leading' only)" if solver == "ddim" else ""
    return f"one of {list(takes)} for solver {solver!r}{why}"


@dataclass(frozen=True)
class Schedule:
    """Per-step patch sizes for the conditional and unconditional branch, plus sampler settings.

    Step 0 is the first step from pure noise. `model` is the fingerprint of the FlexiDiT the
    schedule was made for. `timestep_spacing` (ddpm and ddim only) replaces the solver's default
    spacing of the timesteps; None keeps the default.
    """

    cond: tuple[Size, ...]
    uncond: tuple[Size, ...]
    guidance_scale: float
    solver: str
    model: str
    guidance_mode: str = "cfg"
    timestep_spacing: str | None = None
    guided_channels: int | None = None  # guidance on the first n output channels only (DiT's sampler: 3); None: all

    def __post_init__(self) -> None:
        for name in ("cond", "uncond"):  # a video size given as a list is stored as a tuple
            object.__setattr__(self, name, tuple(tuple(p) if isinstance(p, list) else p for p in getattr(self, name)))
        self.validate_dict(self.to_dict(), "schedule")

    @property
    def num_steps(self) -> int:
        return len(self.cond)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale != 1.0

    def steps(self) -> list[tuple[Size, Size]]:
        return list(zip(self.cond, self.uncond))

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def static(cls, patch_size: Size, num_steps: int, **kw: Any) -> Schedule:
        return cls(cond=(patch_size,) * num_steps, uncond=(patch_size,) * num_steps, **kw)

    @classmethod
    def weak_first(cls, k: int, num_steps: int, weak: Size, native: Size, **kw: Any) -> Schedule:
        """The paper's family: the weak size for the first k steps (from noise), native after."""
        return cls.branch_split(k, k, num_steps, weak, native, **kw)

    @classmethod
    def branch_split(cls, k_cond: int, k_uncond: int, num_steps: int, weak: Size, native: Size, **kw: Any) -> Schedule:
        """Weak for the first k_cond conditional and the first k_uncond unconditional steps."""
        for name, k in (("k_cond", k_cond), ("k_uncond", k_uncond)):
            if not 0 <= k <= num_steps:
                raise UserError(f"schedule: {name}={k} must be within 0..{num_steps}")
        return cls(cond=(weak,) * k_cond + (native,) * (num_steps - k_cond),
                   uncond=(weak,) * k_uncond + (native,) * (num_steps - k_uncond), **kw)

    def replace(self, **kw: Any) -> Schedule:
        return dataclasses.replace(self, **kw)

    def resample(self, num_steps: int) -> Schedule:
        """The same schedule over num_steps steps, keeping each patch size's share of every phase.

        The phase of a step is its relative position along the trajectory (step i of n spans
        [i/n, (i+1)/n); for the uniformly spaced timesteps of the solvers here, that is its noise
        level). Each branch is mapped on its own: new step j takes the patch size that is furthest
        behind its target share of [0, (j+1)/num_steps) in the old schedule (ties: the smaller
        size). With two sizes, the number of weak steps in every prefix of the new schedule is the
        old weak share of that prefix rounded to the nearest step, so the overall weak fraction and
        the weak fraction of every phase are kept as closely as whole steps allow; no aliasing of
        alternating patterns. Resampling to the same step count returns an equal schedule.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise UserError(f"schedule: cannot resample to {num_steps!r} steps, expected an integer >= 1")
        return self.replace(cond=_resample_sizes(self.cond, num_steps),
                            uncond=_resample_sizes(self.uncond, num_steps))

    # ---- checks against a model ---------------------------------------------------------
    def check_model(self, model_config: Any, fingerprint: str | None, source: str = "schedule") -> None:
        """Refuse a schedule made for another model, or one using sizes or a solver the model lacks."""
        if fingerprint is not None and self.model != fingerprint:
            raise UserError(f"{source}: field 'model' is {self.model!r}, but the model's fingerprint is {fingerprint!r} "
                            "(schedule made for another model)")
        for name in ("cond", "uncond"):
            bad = sorted(set(getattr(self, name)) - set(model_config.patch_sizes))
            if bad:
                raise UserError(f"{source}: field '{name}' uses patch size {bad[0]}, the model has {list(model_config.patch_sizes)}")
        solvers = SOLVERS[model_config.prediction]
        if self.solver not in solvers:
            raise UserError(f"{source}: field 'solver' is {self.solver!r}, expected one of {list(solvers)} "
                            f"for a {model_config.prediction} model")
        if self.guided_channels is not None and self.guided_channels > model_config.in_channels:
            raise UserError(f"{source}: field 'guided_channels' is {self.guided_channels}, the model has "
                            f"{model_config.in_channels} channels")

    # ---- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON form in the lowest version that holds it: 3 with video sizes or guided_channels, 2 with a
        timestep_spacing, else 1 (so version-1 readers read every image schedule without a spacing)."""
        spacing = {} if self.timestep_spacing is None else {"timestep_spacing": self.timestep_spacing}
        guided = {} if self.guided_channels is None else {"guided_channels": self.guided_channels}
        video = any(isinstance(p, tuple) for p in self.cond + self.uncond)
        return {"schema": "flexisearch.schedule", "version": 3 if video or guided else 2 if spacing else 1,
                "num_steps": self.num_steps, "cond": [list(p) if video else p for p in self.cond],
                "uncond": [list(p) if video else p for p in self.uncond], "guidance_scale": self.guidance_scale,
                "guidance_mode": self.guidance_mode, "solver": self.solver, **spacing, **guided, "model": self.model}

    @staticmethod
    def validate_dict(d: Any, source: str) -> None:
        """Raise a one-line UserError naming the field and what was expected."""
        version = d.get("version") if isinstance(d, dict) else None
        if not isinstance(version, int) or isinstance(version, bool):
            version = SCHEMA_VERSIONS[-1]  # the schema then names what is wrong
        elif version not in SCHEMA_VERSIONS:
            known = " or ".join(map(str, SCHEMA_VERSIONS))
            raise UserError(f"{source}: unknown schema version {version}, expected {known}")
        err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(_schema(version)).iter_errors(d))
        if err is not None:
            where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
            raise UserError(f"{source}: field '{where}': {err.message}")
        if not d["guidance_scale"] <= MAX_GUIDANCE:  # NaN too (JSON Schema cannot say "finite")
            raise UserError(f"{source}: field 'guidance_scale': {d['guidance_scale']} is not a number in [0, {MAX_GUIDANCE}]")
        for name in ("cond", "uncond"):
            if len(d[name]) != d["num_steps"]:
                raise UserError(f"{source}: field '{name}' has {len(d[name])} entries, expected num_steps={d['num_steps']}")
        expected = spacing_expected(d["solver"], d.get("timestep_spacing"))
        if expected is not None:
            raise UserError(f"{source}: field 'timestep_spacing' is {d['timestep_spacing']!r}, expected {expected}")

    @classmethod
    def from_dict(cls, d: Any, source: str = "schedule") -> Schedule:
        cls.validate_dict(d, source)
        return cls(cond=d["cond"], uncond=d["uncond"], guidance_scale=float(d["guidance_scale"]),
                   guidance_mode=d["guidance_mode"], solver=d["solver"], model=d["model"],
                   timestep_spacing=d.get("timestep_spacing"), guided_channels=d.get("guided_channels"))

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, point: int | None = None) -> Schedule:
        """Read a schedule file, an exported best.json (its 'schedule'), or point `point` of a pareto.json."""
        d = read_json(path, "schedule file")
        if isinstance(d, dict) and isinstance(d.get("points"), list):
            n = len(d["points"])
            if point is None or not 0 <= point < n or not isinstance(d["points"][point], dict):
                raise UserError(f"{path}: a Pareto front of {n} points: pick one with --point N, N from 0 to {n - 1}")
            d = d["points"][point]
        elif point is not None:
            raise UserError(f"{path}: --point {point} picks a point of a pareto.json; this file has one schedule")
        if isinstance(d, dict) and isinstance(d.get("schedule"), dict):
            d = d["schedule"]
        return cls.from_dict(d, str(path))

    def describe(self) -> str:
        """Compact text form, e.g. 'cond 4x8 2x12 | uncond 4x10 2x10' (video: '(2,2,2)x8 ...')."""
        def runs(sizes: tuple[Size, ...]) -> str:
            out, i = [], 0
            while i < len(sizes):
                j = i
                while j < len(sizes) and sizes[j] == sizes[i]:
                    j += 1
                label = sizes[i] if isinstance(sizes[i], int) else f"({','.join(map(str, sizes[i]))})"
                out.append(f"{label}x{j - i}")
                i = j
            return " ".join(out)
        return f"cond {runs(self.cond)} | uncond {runs(self.uncond)}"


def _resample_sizes(sizes: tuple[Size, ...], m: int) -> tuple[Size, ...]:
    """Schedule.resample for one branch, in exact integer arithmetic (units of 1/(n m) of the trajectory)."""
    n = len(sizes)
    kinds = sorted(set(sizes))  # ascending, so max() breaks ties towards the smaller size
    before = {p: [0] for p in kinds}  # before[p][i]: old steps of size p among the first i
    for s in sizes:
        for p in kinds:
            before[p].append(before[p][-1] + (s == p))

    def occupied(p: Size, x: int) -> int:
        """Length of [0, x) that the old schedule spends at size p (old step i spans [i m, (i+1) m))."""
        i, r = divmod(x, m)
        return before[p][i] * m + (r if i < n and sizes[i] == p else 0)

    counts = dict.fromkeys(kinds, 0)
    out = []
    for j in range(m):
        end = (j + 1) * n  # new step j ends here; each new step is n units long
        p = max(kinds, key=lambda q: occupied(q, end) - counts[q] * n)
        counts[p] += 1
        out.append(p)
    return tuple(out)
