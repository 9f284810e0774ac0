"""Export a finished study: held-out confirmation, best.json, pareto.json and plots.

The exported quality of every schedule is measured on held-out seeds (never used by the search)
with a bootstrap interval; the search-time value is kept beside it.
"""

from __future__ import annotations

import collections
import datetime
from typing import Any

import optuna
from optuna.trial import TrialState

from .. import __version__
from ..errors import UserError
from ..files import atomic_write_json
from ..sampling.schedule import Schedule
from .config import SearchConfig, run_dir, storage_url
from .evaluate import Evaluator
from .plots import plot_schedule, plot_tradeoff
from .study import quality_bounds, reference_qualities, trial_records


def _loss(record: dict[str, Any], higher_is_better: bool) -> float:
    return -record["quality"] if higher_is_better else record["quality"]


def _cost_then_loss(record: dict[str, Any], higher_is_better: bool) -> tuple[float, float]:
    return record["fraction"], _loss(record, higher_is_better)


def pareto_front(records: list[dict[str, Any]], higher_is_better: bool) -> list[dict[str, Any]]:
    """Feasible-or-not non-dominated records in (FLOPs fraction, quality), cheapest first."""
    front: list[dict[str, Any]] = []
    for r in sorted(records, key=lambda r: _cost_then_loss(r, higher_is_better)):
        if not front or _loss(r, higher_is_better) < _loss(front[-1], higher_is_better):
            front.append(r)
    return front


def best_record(records: list[dict[str, Any]], higher_is_better: bool) -> dict[str, Any] | None:
    """The cheapest feasible schedule (ties: better quality)."""
    feasible = [r for r in records if r["feasible"]]
    return min(feasible, key=lambda r: _cost_then_loss(r, higher_is_better)) if feasible else None


_KEY = ("device", "dtype", "compile", "merge_lora", "torch")  # what a latency prediction holds for


def _latency(evaluator: Evaluator, schedule: Schedule) -> dict[str, Any]:
    """Predicted sampling latency and peak memory, and what the prediction holds for."""
    lat = evaluator.latency(schedule)
    return {**lat, "fraction_of_static_native": lat["seconds_per_image"] / evaluator.latency(evaluator.reference)[
        "seconds_per_image"], "batch_size": evaluator.cost_batch, **{k: evaluator.costs.key[k] for k in _KEY}}


def _entry(evaluator: Evaluator, r: dict[str, Any], heldout: dict[str, dict[str, Any]]) -> dict[str, Any]:
    cost = evaluator.cost(r["schedule"])
    return {"schedule": r["schedule"].to_dict(), "trial": r["number"], "family": r["family"],
            "cost": {"macs": cost["macs"], "flops": cost["flops"], "fraction_of_static_native": cost["flops_fraction"],
                     "saving": 1 - cost["flops_fraction"], "units": "MACs per sample; flops = 2 x macs",
                     "latency": _latency(evaluator, r["schedule"])},
            **_quality(evaluator, heldout, r["qualities"] or {evaluator.constraints[0].name: r["quality"]})}


def _quality(evaluator: Evaluator, heldout: dict[str, Any], search: dict[str, float] | None = None) -> dict[str, Any]:
    """"quality": the searched metric, held out (and on the search seeds); "qualities": every metric the same way."""
    every = {c.name: {"heldout": heldout[c.name], **({"search": search.get(c.name)} if search else {})}
             for c in evaluator.constraints}
    return {"quality": {"metric": evaluator.metric.name, **every[evaluator.constraints[0].name]}, "qualities": every}


def _bounds_text(evaluator: Evaluator, bounds: dict[str, float]) -> str:
    ceiling = evaluator.cfg.cost.max_memory_mb
    return " and ".join([f"{c.name} {'>=' if c.metric.higher_is_better else '<='} {bounds[c.name]:.4g}"
                         for c in evaluator.constraints] + ([f"peak memory <= {ceiling:g} MiB"] if ceiling else []))


def export_study(cfg: SearchConfig, evaluator: Evaluator, study: optuna.Study, progress: bool = False) -> dict[str, Any]:
    """Re-score the best schedule and the Pareto points on held-out seeds; write JSON and plots."""
    records = trial_records(study)
    if not records:
        raise UserError(f"study '{cfg.study}' in {storage_url(cfg)} has no completed trials")
    hib = evaluator.metric.higher_is_better
    best = best_record(records, hib)
    bounds = quality_bounds(study, evaluator)
    bound = bounds[evaluator.constraints[0].name]
    if best is None:
        raise UserError(f"constraint {_bounds_text(evaluator, bounds)}: no schedule met "
                        f"{'it' if len(bounds) == 1 else 'them all'} in {len(records)} trials (best "
                        f"{evaluator.metric.name}: {(max if hib else min)(r['quality'] for r in records):.4g})")
    out = run_dir(cfg)
    full_front = pareto_front([r for r in records if r["feasible"]] or records, hib)
    front = full_front[: cfg.pareto_max]
    confirmed: dict[int, dict[str, Any]] = {}
    for r in [best] + front:
        if r["number"] not in confirmed:
            confirmed[r["number"]] = evaluator.confirm(r["schedule"], progress=progress)
    native = evaluator.confirm(evaluator.reference, progress=progress)
    calls = [v for k, v in study.user_attrs.items() if k.startswith("calls_saved_worker_")]
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))  # costlier than the incumbent: unsampled
    stopped_by = collections.Counter([r["stopped"] for r in records if r["stopped"]] + ["cost"] * len(pruned))
    provenance = {"study": cfg.study, "storage": storage_url(cfg), "sampler": cfg.sampler, "objective": cfg.objective,
                  "cost": cfg.cost.type,
                  "space": cfg.space.type, "n_trials": len(records) + len(pruned), "search_samples": cfg.search_samples,
                  "search_seeds": [0, cfg.search_samples - 1], "fidelities": list(evaluator.fidelities),
                  "trials_stopped_early": sum(stopped_by.values()), "trials_pruned": len(pruned),
                  "trials_stopped_by": dict(stopped_by),
                  "flexisearch": __version__,
                  "model_calls_saved_by_prefix_reuse": sum(c[0] for c in calls),
                  "model_calls_run": sum(c[1] for c in calls),
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    native_search = reference_qualities(study, evaluator)
    every = [{"metric": c.name, "bound": bounds[c.name], "relative": c.config.relative, "within": c.config.within,
              "absolute": c.config.max if c.config.max is not None else c.config.min,
              "search_reference_quality": native_search[c.name]} for c in evaluator.constraints]
    constraint = {**every[0], "constraints": every, "max_memory_mb": cfg.cost.max_memory_mb}
    reference = {"schedule": evaluator.reference.to_dict(),
                 "cost": {"macs": evaluator.reference_macs, "latency": _latency(evaluator, evaluator.reference)},
                 **_quality(evaluator, native)}
    best_doc = {**_entry(evaluator, best, confirmed[best["number"]]), "constraint": constraint, "model": evaluator.fingerprint,
                "model_spec": cfg.model, "static_native": reference, "provenance": provenance}
    pareto_doc = {"model": evaluator.fingerprint, "metric": evaluator.metric.name, "constraint": constraint,
                  "static_native": reference, "provenance": provenance,
                  "points": [_entry(evaluator, r, confirmed[r["number"]]) for r in front]}
    atomic_write_json(out / "best.json", best_doc)
    atomic_write_json(out / "pareto.json", pareto_doc)
    plot_tradeoff(records, full_front, evaluator, bound, best,
                  f"study {cfg.study}: {len(records)} schedules of {cfg.model}", out / "tradeoff.png")
    plot_schedule(best["schedule"], best["fraction"], out / "schedule.png")
    return best_doc
