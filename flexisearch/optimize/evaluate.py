"""The one trial evaluation: a schedule's exact cost, its measured quality on fixed seeds, and its
constraint values, used by the Optuna and the Ray backend alike.

An Evaluator loads the model and every bounded metric (config `metric` and `constraints`) once and
evaluates schedules on one fixed set of seeds and labels shared by all trials (common random
numbers), reusing trajectories that share a prefix; with `fidelities` a trial is scored on the first
samples of that set first and stops there when it cannot be the answer. Held-out confirmation
re-scores schedules on seeds the search never used, with more samples and a bootstrap confidence
interval.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import asset_path
from ..metrics.registry import load_metric
from ..models import flops
from ..models.flexible import FlexibleDiT
from ..models.loading import load_model, resolve_device
from ..sampling.generate import TrajectoryCache, sample
from ..sampling.latency import CostTable, cost_table
from ..sampling.schedule import SOLVERS, Schedule
from .config import MetricConfig, SearchConfig, reference_schedule, run_dir
from .reference_samples import reference_key, reference_samples
from .sample_sets import SampleSet, search_sample_sets
from .spaces import make_space


@dataclass(frozen=True)
class TrialResult:
    """What one trial measured: the schedule, its cost (Evaluator.cost: `fraction` is the searched one), its
    quality per metric (the searched metric first) and each constraint value (<= 0: met), on the first `samples`
    search samples: fewer than the whole set when the trial stopped at a lower fidelity, `stopped` saying why
    ("cost": it costs at least the incumbent, or the name of the metric it confidently fails; "": it did not)."""

    schedule: Schedule
    cost: dict[str, float]
    qualities: dict[str, float]
    violations: dict[str, float]
    samples: int
    stopped: str

    @property
    def quality(self) -> float | None:
        """The searched metric's value (config `metric`); None when nothing was sampled."""
        return next(iter(self.qualities.values()), None)

    @property
    def feasible(self) -> bool:
        """Measured on the whole search set and within every bound."""
        return not self.stopped and all(v <= 0 for v in self.violations.values())

    @property
    def pruned(self) -> bool:
        """Stopped before sampling anything: the study records it as PRUNED (Optuna's own state for a trial that
        cannot be the answer), not as a complete trial with made-up constraint values."""
        return self.samples == 0

    def values(self, objective: str) -> float | tuple[float, float]:
        """The study's objective values: the cost fraction ("single"), or (fraction, quality) ("multi")."""
        return self.cost["fraction"] if objective == "single" else (self.cost["fraction"], self.quality)

    def report(self) -> dict[str, Any]:
        """Plain values, as a Ray trial reports them and the study records them."""
        return {"fraction": self.cost["fraction"], "quality": self.quality, "macs": self.cost["macs"],
                "qualities": json.dumps(self.qualities), "violations": json.dumps(self.violations),
                "samples": self.samples, "stopped": self.stopped, "schedule": json.dumps(self.schedule.to_dict())}


@dataclass(frozen=True)
class Constraint:
    """A loaded metric and its configured bound (config.MetricConfig)."""

    config: MetricConfig
    metric: Any  # metrics.registry: name, higher_is_better, needs_native, score, score_with_ci

    @property
    def name(self) -> str:
        return self.config.name

    def bound(self, native: float) -> float:
        """The bound: absolute, or relative to (within a distance of) static native's value in this run."""
        m, hib = self.config, self.metric.higher_is_better
        if m.max is not None or m.min is not None:
            return m.max if m.max is not None else m.min
        if m.within is not None:
            return native - m.within if hib else native + m.within
        return native * (1 - m.relative) if hib else native * (1 + m.relative)

    def violation(self, quality: float, bound: float) -> float:
        """Optuna constraint value: <= 0 when the bound is met."""
        return bound - quality if self.metric.higher_is_better else quality - bound


class Evaluator:
    """Evaluates schedules for one search config: cost relative to static native, quality, constraint."""

    def __init__(self, cfg: SearchConfig, device: str | torch.device | None = None, model: FlexibleDiT | None = None):
        self.cfg = cfg
        self.device = resolve_device(device)
        self.model = model if model is not None else load_model(cfg.model, self.device)
        mc = self.model.config
        self.fingerprint = self.model.fingerprint()
        self.decode = getattr(self.model, "decode_images", None)  # latent models: VAE decode before any metric
        self.native = mc.patch_size
        if not mc.extra_patch_sizes:
            raise UserError(f"model '{cfg.model}' has no weak patch size: flexify it first (flexisearch train flexify)")
        self.weak = cfg.space.weak_patch_size or max(mc.extra_patch_sizes, key=lambda p: (-flops.tokens(mc, p), p))
        if self.weak not in mc.extra_patch_sizes:
            raise UserError(f"space.weak_patch_size is {self.weak}, the model has {list(mc.extra_patch_sizes)}")
        solvers = SOLVERS[mc.prediction]
        for solver in cfg.space.solver.values:
            if solver not in solvers:
                raise UserError(f"space.solver: {solver!r} does not suit a {mc.prediction} model, expected one of "
                                f"{list(solvers)}")
        self.reference = reference_schedule(cfg, self.native, self.fingerprint)
        self.reference.check_model(mc, None, "reference")  # its sizes and solver; it is made for this model
        self.reference_macs = flops.schedule_macs(mc, self.reference)
        if cfg.cost.merge_lora:
            self.model.merge_lora()  # quality is measured on the model as it will be deployed
        self.cost_batch = cfg.cost.batch_size or cfg.batch_size
        self._costs: CostTable | None = None
        self.constraints = [Constraint(m, load_metric(m.name, cfg, self.model)) for m in cfg.metrics]
        self.metric = self.constraints[0].metric  # the searched quality
        self.search_set, self.heldout_set = search_sample_sets(self.model, cfg)
        self.space = make_space(cfg.space, self.native, self.weak, mc.patch_sizes, self.fingerprint)
        self.cache = TrajectoryCache()  # the search set's trajectories, of this one model
        self._memo: dict[str, dict[str, float]] = {}
        self._interims: dict[str, dict[str, tuple[float, float, float]]] = {}
        self.fidelities = (*cfg.fidelities, cfg.search_samples)  # search samples of each stage of a trial
        self._native_samples: dict[str, torch.Tensor] = {}

    def samples(self, schedule: Schedule, sample_set: SampleSet, progress: bool = False) -> torch.Tensor:
        """Images of a schedule on a sample set: a latent model's samples are decoded by its VAE."""
        out = sample(self.model, schedule, list(sample_set.labels), list(sample_set.seeds),
                     batch_size=self.cfg.batch_size, cache=self.cache if sample_set.name == "search" else None,
                     progress=progress)
        return self.decode(out) if self.decode is not None else out

    def cost(self, schedule: Schedule) -> dict[str, float]:
        """MACs, FLOPs and their fraction of static native; under `cost: latency` also the predicted latency.
        `fraction` is the searched cost: the FLOPs fraction, or the latency fraction."""
        macs = flops.schedule_macs(self.model.config, schedule)
        out = {"macs": macs, "flops": 2 * macs, "flops_fraction": macs / self.reference_macs}
        if self.cfg.cost.type == "flops":
            return {**out, "fraction": out["flops_fraction"]}
        latency = self.latency(schedule)
        return {**out, **latency, "fraction": latency["seconds_per_image"] / self.latency(self.reference)["seconds_per_image"]}

    def latency(self, schedule: Schedule) -> dict[str, float]:
        """Predicted seconds per image and peak memory (bytes) of sampling at cost.batch_size, from the cost table."""
        b = self.cost_batch
        return {"seconds_per_image": self.costs.batch_seconds(schedule, b) / b,
                "peak_bytes": self.costs.schedule_peak_bytes(schedule, b)}

    @property
    def costs(self) -> CostTable:
        """The cost table of sampling as cfg.cost describes (latency.cost_table: cost.table, or the run's own)."""
        if self._costs is None:
            c = self.cfg.cost
            self._costs = cost_table(self.model, self.cost_batch, {*self.cfg.space.solver.values, self.reference.solver},
                                     given=c.table, own=self.own_cost_table(), dtype=c.dtype, compile_mode=c.compile,
                                     repeats=c.repeats)
        return self._costs

    def own_cost_table(self) -> Path:
        return run_dir(self.cfg) / "cost_table.json"

    def pin_costs(self, cfg: SearchConfig) -> SearchConfig:
        """cfg naming the cost table this evaluator predicts with (a latency search or a memory ceiling without
        cost.table): the worker processes and Ray workers then use the same table, whichever device they run on."""
        if (cfg.cost.type != "latency" and cfg.cost.max_memory_mb is None) or cfg.cost.table:
            return cfg
        _ = self.costs
        return dataclasses.replace(cfg, cost=dataclasses.replace(cfg.cost, table=str(self.own_cost_table().resolve())))

    def native_samples(self, sample_set: SampleSet, progress: bool = False) -> torch.Tensor:
        """Samples of the static native reference on a sample set (the bounds' reference, the fid_native target,
        what a paired difference compares with): sampled once per set and model, kept on disk (reference_samples).
        Those of a lower fidelity are the first of the whole search set's: a sample depends on its seed and label."""
        n = len(sample_set.seeds)
        if n < len(self.search_set.seeds) and sample_set == self.search_set.head(n):
            return self.native_samples(self.search_set, progress)[:n]
        key = f"{sample_set.name}|{n}"
        if key not in self._native_samples:
            self._native_samples[key] = reference_samples(
                reference_key(self.model, self.reference, sample_set), [asset_path(self.cfg.model)], run_dir(self.cfg),
                lambda: self.samples(self.reference, sample_set, progress))
        return self._native_samples[key]

    def qualities(self, schedule: Schedule, sample_set: SampleSet | None = None) -> dict[str, float]:
        """Every metric on the search set (memoised per schedule), or on another sample set; one sampling."""
        sample_set = sample_set or self.search_set
        key = f"{sample_set.name}|{len(sample_set.seeds)}|{json.dumps(schedule.to_dict())}"
        if key not in self._memo:
            images = self._images(schedule, sample_set, False)
            self._memo[key] = {c.name: c.metric.score(images, sample_set, self._target(c, sample_set))
                               for c in self.constraints}
        return self._memo[key]

    def quality(self, schedule: Schedule, sample_set: SampleSet | None = None) -> float:
        """The searched metric (config `metric`) on the search set, or on another sample set."""
        return self.qualities(schedule, sample_set)[self.constraints[0].name]

    def _target(self, constraint: Constraint, sample_set: SampleSet) -> torch.Tensor | None:
        return self.native_samples(sample_set) if constraint.metric.needs_native else None

    def intervals(self, schedule: Schedule, sample_set: SampleSet,
                  progress: bool = False) -> dict[str, tuple[float, float, float]]:
        """Every metric as (value, low, high) with a bootstrap 95% interval over the samples of a sample set."""
        return self._intervals(self._images(schedule, sample_set, progress), sample_set)

    def _images(self, schedule: Schedule, sample_set: SampleSet, progress: bool) -> torch.Tensor:
        if schedule == self.reference:
            return self.native_samples(sample_set, progress)
        return self.samples(schedule, sample_set, progress=progress)

    def _intervals(self, images: torch.Tensor, sample_set: SampleSet) -> dict[str, tuple[float, float, float]]:
        return {c.name: c.metric.score_with_ci(images, sample_set, self._target(c, sample_set), self.cfg.bootstrap)
                for c in self.constraints}

    def confirm(self, schedule: Schedule, progress: bool = False) -> dict[str, dict[str, Any]]:
        """Held-out value of every metric with a bootstrap 95% interval, on seeds never used during the search, and
        (where the metric has a paired interval) its difference from static native on the same held-out seeds:
        sharing their sampling noise, it is measured more tightly than the two intervals side by side suggest."""
        h = self.heldout_set
        images, native = self._images(schedule, h, progress), self.native_samples(h, progress)
        out: dict[str, dict[str, Any]] = {}
        for name, (value, low, high) in self._intervals(images, h).items():
            out[name] = {"value": value, "ci95": [low, high], "n": len(h.seeds), "seeds": [h.seeds[0], h.seeds[-1]]}
        for c in self.constraints:
            paired = c.metric.paired_interval(images, native, h, self.cfg.bootstrap) if schedule != self.reference else None
            if paired is not None:
                out[c.name]["vs_static_native"] = {"difference": paired[0], "ci95": [paired[1], paired[2]]}
        return out

    def bounds(self, native: dict[str, float]) -> dict[str, float]:
        """Each metric's bound, given static native's values on the search set."""
        return {c.name: c.bound(native[c.name]) for c in self.constraints}

    def evaluate(self, trial: Any, native: dict[str, float], incumbent: float | None = None) -> TrialResult:
        """The trial's schedule (an Optuna Trial, or a FixedTrial of a Ray trial's parameters), measured on growing
        prefixes of the search set (cfg.fidelities, then all of it) against the bounds that static native's values
        on the whole search set (`native`) give. With fidelities, a schedule that costs at least the incumbent (the
        cheapest schedule known to meet every bound: it cannot be better) is stopped before any sample (`pruned`);
        another stops at a lower fidelity when its predicted peak memory is above cost.max_memory_mb, or when it
        is confidently infeasible there: compared with static native on the same samples, even the favourable end
        of the 95% interval of the difference, added to static native's value on the whole set, violates a bound.
        The difference, not the value, carries over between sample counts: FID's finite-sample bias is shared by
        both schedules on the same seeds, and a mean over samples is unbiased anyway."""
        schedule = self.space.suggest(trial)  # made of the model's sizes and solvers (checked at construction)
        cost, bounds = self.cost(schedule), self.bounds(native)
        if len(self.fidelities) > 1 and incumbent is not None and cost["fraction"] >= incumbent:
            return TrialResult(schedule, cost, {}, {}, 0, "cost")  # its cost is exact: no sample can change that
        for n in self.fidelities[:-1]:
            scored = self._interim(schedule, n)
            # a metric without a paired interval has nan ends: its comparison is False, it never stops a trial
            why = [name for name, v in self._memory(schedule).items() if v > 0]
            why += [c.name for c in self.constraints if c.violation(
                native[c.name] + scored[c.name][2 if c.metric.higher_is_better else 1], bounds[c.name]) > 0]
            if why:
                return self._result(schedule, cost, {k: v[0] for k, v in scored.items()}, bounds, n, why[0])
        return self._result(schedule, cost, self.qualities(schedule), bounds, self.fidelities[-1])

    def _interim(self, schedule: Schedule, n: int) -> dict[str, tuple[float, float, float]]:
        """Every metric on the first n search samples: (value, low, high), where low and high bound the difference
        from static native on the same samples (nan for a metric without a paired interval)."""
        key = f"{n}|{json.dumps(schedule.to_dict())}"
        if key not in self._interims:
            sample_set = self.search_set.head(n)
            images, native = self.samples(schedule, sample_set), self.native_samples(sample_set)
            out = {}
            for c in self.constraints:
                value = c.metric.score(images, sample_set, self._target(c, sample_set))
                paired = c.metric.paired_interval(images, native, sample_set, self.cfg.bootstrap)
                out[c.name] = (value, *(paired[1:] if paired is not None else (float("nan"),) * 2))
            self._interims[key] = out
        return self._interims[key]

    def _result(self, schedule: Schedule, cost: dict[str, float], qualities: dict[str, float],
                bounds: dict[str, float], n: int, stopped: str = "") -> TrialResult:
        violations = {c.name: c.violation(qualities[c.name], bounds[c.name]) for c in self.constraints}
        return TrialResult(schedule, cost, qualities, {**violations, **self._memory(schedule)}, n, stopped)

    def _memory(self, schedule: Schedule) -> dict[str, float]:
        """The memory ceiling's constraint (cost.max_memory_mb): {"peak_memory": peak MiB minus the ceiling}, or {}."""
        ceiling = self.cfg.cost.max_memory_mb
        return {} if ceiling is None else {"peak_memory": self.latency(schedule)["peak_bytes"] / 2**20 - ceiling}
