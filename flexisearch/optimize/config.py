"""Search configs (YAML; the shipped ones are package data in flexisearch/search_spaces/, by name): the model, the space of schedules (search.spaces), the quality
metric and its constraint, the sample budgets, the searcher, and where the run's files live.

Validation is strict (validate.read_dataclass): an unknown key or a value of the wrong kind is a
one-line UserError naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..files import PACKAGE, read_text
from ..metrics.registry import HIGHER_IS_BETTER, METRICS
from ..sampling.latency import COMPILE_MODES, DTYPES
from ..sampling.schedule import (
    GUIDANCE_MODES,
    MAX_GUIDANCE,
    SOLVERS,
    Schedule,
    spacing_expected,
)
from ..validate import key_error, read_dataclass
from .spaces import SPACES, Choice, SpaceConfig

COST_TYPES = ("flops", "latency")
SAMPLERS = ("tpe", "nsga2", "gp", "random", "bruteforce")
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a folder name under runs/, never a path
RUNS = Path("runs")
SPACES_DIR = PACKAGE / "search_spaces"  # the shipped search configs; `--space NAME` is SPACES_DIR/NAME.yaml
DEFAULT_SPACE = "default"


@dataclass(frozen=True)
class MetricConfig:
    """A quality metric and its bound: exactly one of relative, within, max (lower is better) or min."""

    name: str = "fid"
    relative: float | None = 0.05  # quality at most this fraction worse than static native (same run)
    within: float | None = None  # quality at most this much worse than static native, in the metric's unit
    max: float | None = None  # absolute bound for fid / fid_native
    min: float | None = None  # absolute bound for clip / class_accuracy


@dataclass(frozen=True)
class CostConfig:
    """What a schedule costs: its FLOPs, or its predicted seconds per image from a measured cost table
    (sampling.latency) for sampling as it will be deployed: batch size, dtype, compile mode, LoRA merging."""

    type: str = "flops"  # flops | latency (the search minimises it; export reports both)
    batch_size: int | None = None  # the batch size schedules will be sampled at (default: batch_size)
    table: str | None = None  # a cost table from `flexisearch profile`; default: runs/<study>/cost_table.json,
    # measured when missing or made for another model, device, dtype, torch, compile mode or LoRA merging
    dtype: str = "float32"  # float32 | bfloat16 | float16
    compile: str = "none"  # none | default | reduce-overhead | max-autotune (torch.compile)
    merge_lora: bool = False
    repeats: int = 7  # timed repeats of each measured part (after 2 warm-up calls)
    max_memory_mb: float | None = None  # a ceiling on sampling's peak memory at batch_size (MiB, cost table): a constraint


@dataclass(frozen=True)
class SearchConfig:
    """A whole search, as read from a YAML file."""

    study: str = "default"
    model: str = "embedded:flexidit-mnist16-lora"
    space: SpaceConfig = field(default_factory=SpaceConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)  # the quality of a multi-objective search
    constraints: tuple[MetricConfig, ...] = ()  # more quality bounds every exported schedule meets
    cost: CostConfig = field(default_factory=CostConfig)
    objective: str = "single"  # "single": min FLOPs s.t. the constraint; "multi": (FLOPs, quality)
    reference: dict = field(default_factory=lambda: {"num_steps": 20, "guidance_scale": 2.0, "solver": "euler"})
    search_samples: int = 256
    fidelities: tuple[int, ...] = ()  # fewer search samples a trial is scored on first, stopping early when hopeless
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
    warm_start: str | None = None  # a best.json, pareto.json or exported study whose schedules are tried first
    native_baseline: bool = False  # find the cheapest static native with fewer steps that meets the bounds first

    @property
    def metrics(self) -> tuple[MetricConfig, ...]:
        """Every bounded metric, the searched quality (metric) first."""
        return (self.metric, *self.constraints)


def _choice(kind: type) -> Any:
    """Parser of a searched dimension: a value, a list of values, or {low, high, step} for a number."""
    def ok(v: Any) -> bool:
        return isinstance(v, (int, float) if kind is float else kind) and not isinstance(v, bool)

    def parse(value: Any, key: str, source: str) -> Choice:
        if isinstance(value, dict):
            if kind is not float or set(value) - {"low", "high", "step"} or not {"low", "high"} <= set(value):
                raise key_error(source, key, "a value, a list of values, or {low, high, step} for a number", value)
            if not all(ok(v) for v in value.values()) or value["low"] > value["high"]:
                raise key_error(source, key, "numbers with low <= high", value)
            return Choice(low=float(value["low"]), high=float(value["high"]),
                          step=float(value["step"]) if "step" in value else None)
        values = value if isinstance(value, list) else [value]
        if not values or not all(ok(v) for v in values):
            raise key_error(source, key, f"a {kind.__name__} or a non-empty list of them", value)
        return Choice(tuple(float(v) if kind is float else v for v in values))
    return parse


_CHOICES = {"num_steps": _choice(int), "guidance_scale": _choice(float), "guidance_mode": _choice(str),
            "solver": _choice(str)}


def _merge(base: dict, over: dict) -> dict:
    """base with over's keys replaced; a mapping merged into a mapping key by key (--set space.solver=ddim)."""
    return {**base, **{k: _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in over.items()}}


def load_search_config(path: str | Path | None, overrides: dict | None = None, source: str = "defaults") -> SearchConfig:
    """Read and validate a search YAML (None: the built-in defaults), then apply overrides (a mapping is merged
    into the YAML's mapping; a None value sets the key to null, as `--set key=null` does)."""
    source = str(path) if path else source
    raw: Any = {}
    if path:
        text = read_text(path, "search space file")
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}: not valid YAML{where}") from None
        except RecursionError:
            raise UserError(f"{path}: not valid YAML (nested too deeply)") from None
    if isinstance(raw, dict):
        raw = _merge(raw, overrides or {})

    def space(value: Any, key: str) -> SpaceConfig:
        return read_dataclass(SpaceConfig, value, source, "space.",
                              {k: (lambda v, kk, f=f: f(v, kk, source)) for k, f in _CHOICES.items()})

    def metric(value: Any, key: str) -> MetricConfig:
        # A metric block that gives another bound drops the default relative one.
        if isinstance(value, dict) and {"max", "min", "within"} & set(value):
            value = {"relative": None, **value}
        return read_dataclass(MetricConfig, value, source, f"{key}.")

    def constraints(value: Any, key: str) -> tuple[MetricConfig, ...]:
        if not isinstance(value, list):
            raise key_error(source, key, "a list of metric blocks ({name, relative | within | max | min})", value)
        return tuple(metric(v, f"{key}[{i}]") for i, v in enumerate(value))

    cfg = read_dataclass(SearchConfig, raw, source, parsers={"space": space, "metric": metric,
                                                             "constraints": constraints})
    _check(cfg, source)
    return cfg


def shipped_spaces() -> dict[str, str]:
    """The shipped search configs: name -> the first sentence of the comment that opens the file."""
    out = {}
    for path in sorted(SPACES_DIR.glob("*.yaml")):
        head = " ".join(line.lstrip("# ").strip() for line in path.read_text().splitlines()
                        if line.startswith("#")).split(". ")[0]
        out[path.stem] = head.rstrip(".") + "."
    return out


def space_path(space: str | os.PathLike | None) -> Path:
    """A search config file: a path, or the name of a shipped config (None: the shipped default)."""
    if space is None:
        return SPACES_DIR / f"{DEFAULT_SPACE}.yaml"
    path = Path(space)
    if path.exists() or path.suffix in (".yaml", ".yml") or os.sep in str(space):
        return path
    if (SPACES_DIR / f"{space}.yaml").is_file():
        return SPACES_DIR / f"{space}.yaml"
    raise UserError(f"--space {space}: no such file, and not a shipped search space ({', '.join(shipped_spaces())})")


def config_dict(cfg: SearchConfig) -> dict[str, Any]:
    """The config as the YAML that gives it back (config_from_dict): stored with the study, sent to workers."""
    d = dataclasses.asdict(cfg)
    d["constraints"], d["fidelities"] = list(d["constraints"]), list(d["fidelities"])
    for key in _CHOICES:
        c = d["space"][key]
        d["space"][key] = list(c["values"]) if c["values"] else {
            k: c[k] for k in ("low", "high", "step") if c[k] is not None}
    return d


def config_from_dict(d: dict[str, Any], source: str) -> SearchConfig:
    """A config_dict read back, checked as a YAML file is."""
    return load_search_config(None, d, source)


def _check(cfg: SearchConfig, source: str) -> None:
    s = cfg.space
    if s.type not in SPACES:
        raise key_error(source, "space.type", f"one of {list(SPACES)}", s.type)
    if s.branches not in ("joint", "separate"):
        raise key_error(source, "space.branches", "'joint' or 'separate'", s.branches)
    for mode in s.guidance_mode.values:
        if mode not in GUIDANCE_MODES:
            raise key_error(source, "space.guidance_mode", f"values in {list(GUIDANCE_MODES)}", mode)
    solvers = sorted({name for names in SOLVERS.values() for name in names})
    for solver in s.solver.values:  # which solvers suit the model (flow, epsilon, v_prediction) is checked with it
        if solver not in solvers:
            raise key_error(source, "space.solver", f"values in {solvers}", solver)
        expected = spacing_expected(solver, s.timestep_spacing)
        if expected is not None:
            raise key_error(source, "space.timestep_spacing", expected, s.timestep_spacing)
    scales = (*s.guidance_scale.values, s.guidance_scale.low or 0.0, s.guidance_scale.high or 0.0)
    if not all(0 <= g <= MAX_GUIDANCE for g in scales):  # NaN fails too
        raise key_error(source, "space.guidance_scale", f"scales from 0 to {MAX_GUIDANCE:g}", s.guidance_scale)
    if any(n < 1 for n in s.num_steps.values):
        raise key_error(source, "space.num_steps", "positive step counts", list(s.num_steps.values))
    if s.segments < 1:
        raise key_error(source, "space.segments", "at least 1", s.segments)
    names = [m.name for m in cfg.metrics]
    if len(set(names)) < len(names):
        raise key_error(source, "constraints", "metrics other than metric.name and each other", names)
    for key, m in [("metric", cfg.metric)] + [(f"constraints[{i}]", c) for i, c in enumerate(cfg.constraints)]:
        _check_metric(m, key, source)
    if cfg.objective not in ("single", "multi"):
        raise key_error(source, "objective", "'single' or 'multi'", cfg.objective)
    if cfg.sampler not in SAMPLERS:
        raise key_error(source, "sampler", f"one of {list(SAMPLERS)}", cfg.sampler)
    if set(cfg.reference) - {"num_steps", "guidance_scale", "solver", "guidance_mode", "timestep_spacing",
                             "guided_channels"}:
        raise key_error(source, "reference", "keys num_steps, guidance_scale, solver, guidance_mode, timestep_spacing, "
                        "guided_channels",
                        cfg.reference)
    solver, spacing = cfg.reference.get("solver", "euler"), cfg.reference.get("timestep_spacing")
    expected = spacing_expected(solver, spacing) if isinstance(solver, str) else None  # else: the Schedule refuses it
    if expected is not None:
        raise key_error(source, "reference.timestep_spacing", expected, spacing)
    if not STUDY_NAME.fullmatch(cfg.study):
        raise key_error(source, "study", "a name of letters, digits and ._- starting with a letter or digit", cfg.study)
    fid = list(cfg.fidelities)
    if fid != sorted(set(fid)) or any(not 2 <= n < cfg.search_samples for n in fid):
        raise key_error(source, "fidelities", f"increasing sample counts from 2 to below search_samples "
                        f"({cfg.search_samples})", fid)
    for key in ("search_samples", "heldout_samples", "batch_size", "n_trials", "bootstrap"):
        if getattr(cfg, key) < 1:
            raise key_error(source, key, "a positive integer", getattr(cfg, key))
    c = cfg.cost
    for key, value, allowed in (("type", c.type, COST_TYPES), ("dtype", c.dtype, list(DTYPES)),
                                ("compile", c.compile, COMPILE_MODES)):
        if value not in allowed:
            raise key_error(source, f"cost.{key}", f"one of {list(allowed)}", value)
    if c.repeats < 1 or (c.batch_size is not None and c.batch_size < 1):
        raise key_error(source, "cost", "positive repeats and batch_size", {"repeats": c.repeats, "batch_size": c.batch_size})
    if c.max_memory_mb is not None and not (isinstance(c.max_memory_mb, (int, float)) and c.max_memory_mb > 0):
        raise key_error(source, "cost.max_memory_mb", "a positive number of MiB", c.max_memory_mb)


def _check_metric(m: MetricConfig, key: str, source: str) -> None:
    if m.name not in METRICS:
        raise key_error(source, f"{key}.name", f"one of {list(METRICS)}", m.name)
    bounds = [b for b in ("relative", "within", "max", "min") if getattr(m, b) is not None]
    if len(bounds) != 1:
        raise UserError(f"{source}: key '{key}' needs exactly one of relative, within, max, min "
                        f"(has {bounds or 'none'})")
    hib = m.name in HIGHER_IS_BETTER
    if hib and m.max is not None or not hib and m.min is not None:
        raise UserError(f"{source}: key '{key}': {m.name} is bounded with "
                        f"{'min' if hib else 'max'}, not {'max' if hib else 'min'}")
    if m.name == "fid_native" and (m.relative is not None or m.within is not None):
        raise UserError(f"{source}: key '{key}.{bounds[0]}': fid_native of static native is 0; use max")


def reference_schedule(cfg: SearchConfig, native: int, fingerprint: str) -> Schedule:
    """The static native schedule every constraint and FLOPs fraction is relative to."""
    r = cfg.reference
    return Schedule.static(native, int(r.get("num_steps", 20)), guidance_scale=float(r.get("guidance_scale", 2.0)),
                           solver=r.get("solver", "euler"), guidance_mode=r.get("guidance_mode", "cfg"),
                           timestep_spacing=r.get("timestep_spacing"), guided_channels=r.get("guided_channels"),
                           model=fingerprint)


def run_dir(cfg: SearchConfig) -> Path:
    """Where a study's files go: runs/<study>/."""
    return RUNS / cfg.study


def storage_url(cfg: SearchConfig) -> str:
    return cfg.storage or f"sqlite:///{run_dir(cfg) / 'study.db'}"
