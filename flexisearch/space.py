"""Search configs (YAML in search_spaces/) and the schedule spaces they describe.

A config names the model, the space of schedules, the quality metric and its constraint, the
sample budgets and the searcher. Validation is strict: an unknown key or a value of the wrong
kind is a one-line UserError naming the file and the key.

Space types (each can be joint with num_steps, guidance_scale, guidance_mode and solver):
  threshold         the paper's family: weak for the first fraction f of the steps
  branch_threshold  separate fractions for the conditional and the unconditional branch
  segments          a staircase: n segments with free breakpoints, each with its own patch size
  per_step          a free patch size per step (per branch with branches: separate)
Fractions (not step indices) parametrise thresholds so that a searcher's knowledge carries over
between step counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .schedule import GUIDANCE_MODES, Schedule

SPACE_TYPES = ("threshold", "branch_threshold", "segments", "per_step")
METRICS = ("fid", "fid_native", "clip")
SAMPLERS = ("tpe", "nsga2", "gp", "random", "bruteforce")


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
    weak_patch_size: int | None = None  # default: the model's largest extra patch size
    segments: int = 3
    branches: str = "joint"  # per_step / segments: "joint" (one size for both branches) or "separate"


@dataclass(frozen=True)
class MetricConfig:
    name: str = "fid"
    relative: float | None = 0.05  # quality at most this fraction worse than static native (same run)
    max: float | None = None  # absolute bound for fid / fid_native
    min: float | None = None  # absolute bound for clip


@dataclass(frozen=True)
class SearchConfig:
    """A whole search, as read from a YAML file."""

    study: str = "default"
    model: str = "embedded:flexidit-mnist16-lora"
    space: SpaceConfig = field(default_factory=SpaceConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    objective: str = "single"  # "single": min FLOPs s.t. the constraint; "multi": (FLOPs, quality)
    reference: dict = field(default_factory=lambda: {"num_steps": 20, "guidance_scale": 2.0, "solver": "euler"})
    search_samples: int = 256
    heldout_samples: int = 1024
    bootstrap: int = 200
    batch_size: int = 64  # samples per chunk: on CPU larger chunks run slower per sample
    sampler: str = "tpe"
    n_trials: int = 40
    seed: int = 0
    pareto_max: int = 6  # Pareto points re-scored on held-out seeds (cheapest first)
    reference_stats: str | None = None  # FID reference statistics (.npz or a stats directory); default: the model's
    feature_net: str | None = None  # FID: a feature-net directory, fid-inception or its .pth; CLIP: a CLIP; default: the model's
    prompts: str | None = None  # text-to-image: prompt file (one caption per line)
    resources: dict = field(default_factory=lambda: {"cpu": 1, "gpu": 0})  # Ray backend, per trial
    max_concurrent: int = 2  # Ray backend
    max_failures: int = 2  # Ray backend retries per trial
    storage: str | None = None  # default: sqlite:///runs/<study>/study.db


def _err(source: str, key: str, expected: str, value: Any) -> UserError:
    return UserError(f"{source}: key '{key}' has {value!r}, expected {expected}")


def _choice(value: Any, source: str, key: str, kind: type) -> Choice:
    def ok(v: Any) -> bool:
        if kind is float:
            return isinstance(v, (int, float)) and not isinstance(v, bool)
        return isinstance(v, kind) and not isinstance(v, bool)
    if isinstance(value, dict):
        extra = set(value) - {"low", "high", "step"}
        if kind is not float or extra or not {"low", "high"} <= set(value):
            raise _err(source, key, "a value, a list of values, or {low, high, step} for a number", value)
        if not all(ok(v) for v in value.values()) or value["low"] > value["high"]:
            raise _err(source, key, "numbers with low <= high", value)
        return Choice(low=float(value["low"]), high=float(value["high"]),
                      step=float(value["step"]) if "step" in value else None)
    values = value if isinstance(value, list) else [value]
    if not values or not all(ok(v) for v in values):
        raise _err(source, key, f"a {kind.__name__} or a non-empty list of them", value)
    return Choice(tuple(float(v) if kind is float else v for v in values))


def _fill(cls: type, d: Any, source: str, prefix: str, special: dict) -> Any:
    if not isinstance(d, dict):
        raise _err(source, prefix.rstrip("."), "a mapping", d)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for key, value in d.items():
        if key not in fields:
            raise UserError(f"{source}: unknown key '{prefix}{key}' (known: {', '.join(fields)})")
        if key in special:
            kw[key] = special[key](value, f"{prefix}{key}")
            continue
        if value is None and "None" in str(fields[key].type):  # an optional field, explicitly unset
            kw[key] = None
            continue
        default = fields[key].default if fields[key].default is not dataclasses.MISSING else fields[key].default_factory()
        expected = type(default)
        if default is None:
            ok = value is None or isinstance(value, (str, int, float)) and not isinstance(value, bool)
        elif expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
        if not ok:
            raise _err(source, f"{prefix}{key}", expected.__name__ if default is not None else "a value", value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise _err(source, f"{prefix}{key}", "a non-negative number", value)
        kw[key] = float(value) if expected is float else value
    return cls(**kw)


def load_search_config(path: str | Path | None, overrides: dict | None = None) -> SearchConfig:
    """Read and validate a search YAML (None: the built-in defaults), then apply overrides."""
    source = str(path) if path else "defaults"
    raw: Any = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: search space file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}: not valid YAML{where}") from None
    raw = {**raw, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    space = lambda v, k: _fill(SpaceConfig, v, source, "space.", {  # noqa: E731
        "num_steps": lambda x, kk: _choice(x, source, kk, int),
        "guidance_scale": lambda x, kk: _choice(x, source, kk, float),
        "guidance_mode": lambda x, kk: _choice(x, source, kk, str),
        "solver": lambda x, kk: _choice(x, source, kk, str)})
    # A metric block that gives an absolute bound drops the default relative one.
    metric = lambda v, k: _fill(MetricConfig, {"relative": None, **v} if isinstance(v, dict) and  # noqa: E731
                                ({"max", "min"} & set(v)) else v, source, "metric.", {})
    cfg = _fill(SearchConfig, raw, source, "", {"space": space, "metric": metric})
    _check(cfg, source)
    return cfg


def _check(cfg: SearchConfig, source: str) -> None:
    s, m = cfg.space, cfg.metric
    if s.type not in SPACE_TYPES:
        raise _err(source, "space.type", f"one of {list(SPACE_TYPES)}", s.type)
    if s.branches not in ("joint", "separate"):
        raise _err(source, "space.branches", "'joint' or 'separate'", s.branches)
    for mode in s.guidance_mode.values:
        if mode not in GUIDANCE_MODES:
            raise _err(source, "space.guidance_mode", f"values in {list(GUIDANCE_MODES)}", mode)
    if any(n < 1 for n in s.num_steps.values):
        raise _err(source, "space.num_steps", "positive step counts", list(s.num_steps.values))
    if s.segments < 1:
        raise _err(source, "space.segments", "at least 1", s.segments)
    if m.name not in METRICS:
        raise _err(source, "metric.name", f"one of {list(METRICS)}", m.name)
    bounds = [b for b in ("relative", "max", "min") if getattr(m, b) is not None]
    if len(bounds) != 1:
        raise UserError(f"{source}: key 'metric' needs exactly one of relative, max, min (has {bounds or 'none'})")
    if m.name == "clip" and m.max is not None or m.name != "clip" and m.min is not None:
        raise UserError(f"{source}: key 'metric': {m.name} is bounded with "
                        f"{'min' if m.name == 'clip' else 'max'}, not {'max' if m.name == 'clip' else 'min'}")
    if m.name == "fid_native" and m.relative is not None:
        raise UserError(f"{source}: key 'metric.relative': fid_native of static native is 0; use metric.max")
    if cfg.objective not in ("single", "multi"):
        raise _err(source, "objective", "'single' or 'multi'", cfg.objective)
    if cfg.sampler not in SAMPLERS:
        raise _err(source, "sampler", f"one of {list(SAMPLERS)}", cfg.sampler)
    if set(cfg.reference) - {"num_steps", "guidance_scale", "solver", "guidance_mode"}:
        raise _err(source, "reference", "keys num_steps, guidance_scale, solver, guidance_mode", cfg.reference)
    for key in ("search_samples", "heldout_samples", "batch_size", "n_trials"):
        if getattr(cfg, key) < 1:
            raise _err(source, key, "a positive integer", getattr(cfg, key))


def reference_schedule(cfg: SearchConfig, native: int, fingerprint: str) -> Schedule:
    """The static native schedule every constraint and FLOPs fraction is relative to."""
    r = cfg.reference
    return Schedule.static(native, int(r.get("num_steps", 20)), guidance_scale=float(r.get("guidance_scale", 2.0)),
                           solver=r.get("solver", "euler"), guidance_mode=r.get("guidance_mode", "cfg"),
                           model=fingerprint)


def schedule_from_trial(trial: Any, space: SpaceConfig, native: int, weak: int, patch_sizes: tuple[int, ...],
                        fingerprint: str) -> Schedule:
    """Build the schedule a trial (Optuna Trial or FixedTrial) proposes, define-by-run."""
    n = int(space.num_steps.suggest(trial, "num_steps"))
    common = dict(guidance_scale=float(space.guidance_scale.suggest(trial, "guidance_scale")),
                  guidance_mode=space.guidance_mode.suggest(trial, "guidance_mode"),
                  solver=space.solver.suggest(trial, "solver"), model=fingerprint)
    if space.type == "threshold":
        k = round(trial.suggest_float("weak_frac", 0.0, 1.0, step=0.05) * n)
        return Schedule.weak_first(k, n, weak, native, **common)
    if space.type == "branch_threshold":
        kc = round(trial.suggest_float("weak_frac_cond", 0.0, 1.0, step=0.05) * n)
        ku = round(trial.suggest_float("weak_frac_uncond", 0.0, 1.0, step=0.05) * n)
        return Schedule.branch_split(kc, ku, n, weak, native, **common)
    branches = ("cond", "uncond") if space.branches == "separate" else ("both",)
    sizes = {}
    for b in branches:
        if space.type == "per_step":
            sizes[b] = tuple(int(trial.suggest_categorical(f"{b}_p{i}", list(patch_sizes))) for i in range(n))
        else:
            # Segment j uses size levels[j]; sorted cut points (fractions of the steps) separate them.
            levels = [int(trial.suggest_categorical(f"{b}_seg{j}", list(patch_sizes))) for j in range(space.segments)]
            cuts = sorted(trial.suggest_float(f"{b}_cut{j}", 0.0, 1.0, step=0.05) for j in range(space.segments - 1))
            bounds = [0] + [round(c * n) for c in cuts] + [n]
            sizes[b] = tuple(levels[j] for j in range(space.segments) for _ in range(bounds[j + 1] - bounds[j]))
    cond = sizes.get("cond", sizes.get("both"))
    uncond = sizes.get("uncond", sizes.get("both"))
    return Schedule(cond=cond, uncond=uncond, **common)


def grid(space: SpaceConfig, patch_sizes: tuple[int, ...]) -> dict[str, list]:
    """The full search grid of a space, for optuna's BruteForceSampler / GridSampler sizes."""
    g: dict[str, list] = {}
    for name in ("num_steps", "guidance_scale", "guidance_mode", "solver"):
        choice: Choice = getattr(space, name)
        if choice.fixed is None:
            g[name] = choice.enumerate()
    n_max = max(space.num_steps.enumerate())
    fr = [round(0.05 * i, 2) for i in range(21)]
    if space.type == "threshold":
        g["weak_frac"] = fr
    elif space.type == "branch_threshold":
        g["weak_frac_cond"], g["weak_frac_uncond"] = fr, fr
    elif space.type == "per_step":
        for b in (("cond", "uncond") if space.branches == "separate" else ("both",)):
            for i in range(n_max):
                g[f"{b}_p{i}"] = list(patch_sizes)
    else:
        raise UserError("segments spaces are not enumerable; use another sampler")
    return g
