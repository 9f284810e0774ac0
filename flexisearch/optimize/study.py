"""The Optuna study of a search: its storage and sampler, the paper's schedules enqueued first, how a
trial's result is recorded, and the completed trials read back for export.

The study lives in an Optuna storage (SQLite under runs/<study>/ by default), so running the same
command again resumes it, several worker processes (or machines, or a Ray cluster) can share it,
and optuna-dashboard opens it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState

from ..errors import UserError
from ..files import read_json
from ..sampling.schedule import Schedule
from .config import RUNS, SearchConfig, config_dict, config_from_dict, storage_url
from .evaluate import Evaluator
from .spaces import Space
from .storage import existing_study, open_storage

# "weak for the first k steps", as fractions of the steps: static native first (the reference, already
# sampled: free, and it meets relative bounds), then cheapest first, so that once one meets every bound the
# costlier ones are pruned before any sample (Evaluator.evaluate)
PAPER_FRACTIONS = (0.0, 1.0, 0.6, 0.5, 0.4, 0.3, 0.2)
DONE = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials n_trials counts: measured, or pruned for their cost
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # recorded with each trial this process runs


def make_sampler(cfg: SearchConfig, space: Space) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():  # Optuna flags GP and brute force experimental, on every run
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _sampler(cfg, space)


def _sampler(cfg: SearchConfig, space: Space) -> optuna.samplers.BaseSampler:
    seed = cfg.seed
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, cfg.n_trials // 4)))
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=min(50, max(8, cfg.n_trials // 4)))
    if cfg.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=min(10, max(2, cfg.n_trials // 4)))
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    size = math.prod(len(v) for v in space.grid().values())
    if size > 100_000:
        raise UserError(f"sampler 'bruteforce': the space has {size} points, too many to enumerate")
    return optuna.samplers.BruteForceSampler(seed=seed)


def open_study(cfg: SearchConfig, evaluator: Evaluator) -> optuna.Study:
    """Create or resume the study; created once, before any worker starts (SQLite creation races)."""
    url = storage_url(cfg)
    hib = evaluator.metric.higher_is_better
    directions = ["minimize"] if cfg.objective == "single" else ["minimize", "maximize" if hib else "minimize"]
    optuna.logging.set_verbosity(logging.WARNING)
    for attempt in range(3):
        try:
            study = optuna.create_study(study_name=cfg.study, storage=open_storage(url), directions=directions,
                                        sampler=make_sampler(cfg, evaluator.space), load_if_exists=True)
            break
        except sqlalchemy.exc.IntegrityError:  # another process created the same fresh storage at the same time
            if attempt == 2:
                raise UserError(f"storage '{url}': cannot open (other processes keep creating it)") from None
            time.sleep(0.5)
        except Exception as e:  # bad URL, unreachable server, unwritable file: all user errors here
            raise UserError(f"storage '{url}': cannot open ({str(e).splitlines()[0]})") from None
    if [d.name.lower() for d in study.directions] != directions:
        raise UserError(f"storage '{url}': study '{cfg.study}' exists with other objectives; use another study name")
    return study


def _settings(cfg: SearchConfig, evaluator: Evaluator, **over: Any) -> dict[str, Any]:
    """The sampler settings the space searches, at the reference's values (or `over`), as near as it has them."""
    space, ref = cfg.space, evaluator.reference
    n = ref.num_steps if ref.num_steps in space.num_steps.enumerate() else max(space.num_steps.enumerate())
    settings: dict[str, Any] = {}
    for name, value in (("num_steps", n), ("guidance_scale", ref.guidance_scale),
                        ("guidance_mode", ref.guidance_mode), ("solver", ref.solver)):
        choice, value = getattr(space, name), over.get(name, value)
        if choice.fixed is None:
            if choice.values:
                settings[name] = value if value in choice.values else choice.values[0]
            else:
                settings[name] = min(max(value, choice.low), choice.high)
    return settings


def paper_params(cfg: SearchConfig, evaluator: Evaluator) -> list[dict[str, Any]]:
    """Trial parameters of the paper's threshold schedules in this space (static native and weak included),
    at the reference's sampler settings where the space has them."""
    settings = _settings(cfg, evaluator)
    return [evaluator.space.paper_params(settings, f) for f in PAPER_FRACTIONS]


def native_baseline(cfg: SearchConfig, evaluator: Evaluator, native: dict[str, float]) -> dict[str, Any] | None:
    """Trial parameters of the cheapest static native schedule with fewer steps than the reference that meets every
    bound on the search seeds, or None. Fewer native steps at a retuned guidance scale are the baseline a
    searched schedule has to beat; found before the search (step counts cheapest first, each at every guidance
    scale the space lists, by the trial evaluation itself, lower fidelities included) and enqueued right after
    static native, it is the incumbent from the start, and trials that cost more are pruned unsampled."""
    space, ref = cfg.space, evaluator.reference
    scales = space.guidance_scale.values or (ref.guidance_scale,)
    for n in sorted(n for n in space.num_steps.enumerate() if n < ref.num_steps):
        for g in scales:
            params = evaluator.space.paper_params(_settings(cfg, evaluator, num_steps=n, guidance_scale=g), 0.0)
            if evaluator.evaluate(optuna.trial.FixedTrial(params), native).feasible:
                return params
    return None


def record(trial: Any, report: dict[str, Any]) -> None:
    """Store a trial's result (TrialResult.report) in the study: its schedule, MACs, quality per metric and
    one constraint per metric, which Optuna's constrained samplers and export read."""
    violations = json.loads(report["violations"])
    trial.set_user_attr("schedule", json.loads(report["schedule"]))
    trial.set_user_attr("macs", report["macs"])
    trial.set_user_attr("quality", report["quality"])
    trial.set_user_attr("qualities", json.loads(report["qualities"]))
    trial.set_user_attr("samples", report["samples"])
    if report["stopped"]:  # measured on fewer samples: never exported (trial_records: not feasible)
        trial.set_user_attr("stopped", report["stopped"])  # why: "cost" or the metric it failed
    for name, value in violations.items():
        trial.set_constraint(name, value)
    # optuna-dashboard (0.21) reads only the list Optuna < 5 kept under "constraints"; Optuna reads both.
    trial.storage.set_trial_system_attr(trial._trial_id, "constraints", list(violations.values()))


def release(study: optuna.Study, trial: optuna.Trial | optuna.trial.FrozenTrial) -> bool:
    """Put a RUNNING trial back in the queue with its number and the parameters it has so far: the next
    process to ask for a trial runs it first (Optuna hands out waiting trials lowest number first).
    Optuna has no public call for this; its storage's own state transition is used."""
    try:
        return study._storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)
    except optuna.exceptions.UpdateFinishedTrialError:  # it finished meanwhile
        return False


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


def release_trials(study: optuna.Study, mine: bool = False) -> int:
    """Put back in the queue the trials left RUNNING by a process of this machine that is gone (killed), and
    with mine=True those of this process (it is stopping). Trials of other machines are failed and queued
    again by their heartbeat (open_storage) once it is stale."""
    released = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and (
                int(pid) == os.getpid() if mine else _process_gone(int(pid))):
            released += release(study, t)
    return released


def reference_qualities(study: optuna.Study, evaluator: Evaluator) -> dict[str, float]:
    """Static native's value of every metric on the search seeds: measured once per study, then read back."""
    keys = {c.name: f"reference_quality:{c.name}" for c in evaluator.constraints}
    if not set(keys.values()) <= set(study.user_attrs):
        measured = evaluator.qualities(evaluator.reference)
        for name, key in keys.items():
            if key not in study.user_attrs:
                study.set_user_attr(key, measured[name])
    attrs = study.user_attrs
    return {name: float(attrs[key]) for name, key in keys.items()}


def quality_bounds(study: optuna.Study, evaluator: Evaluator) -> dict[str, float]:
    """The study's bound per metric (relative ones: to its static native values), also kept as user attrs
    "bounds" and "bound" (the searched metric's)."""
    bounds = evaluator.bounds(reference_qualities(study, evaluator))
    study.set_user_attr("bounds", bounds)
    study.set_user_attr("bound", bounds[evaluator.constraints[0].name])
    return bounds


def incumbent(study: optuna.Study, cfg: SearchConfig) -> float | None:
    """The cost of the cheapest schedule known to meet every bound (None: none yet, or a multi-objective study,
    where a costlier schedule can still be on the front)."""
    if cfg.objective != "single":
        return None
    return min((r["fraction"] for r in trial_records(study) if r["feasible"]), default=None)


def stored_config(url: str, name: str) -> SearchConfig | None:
    """The config study `name` was last searched with (seed_study stores it; None: no such study, or one from
    before configs were stored). Worker processes and export read it, so they use what the search used."""
    study = existing_study(url, name)
    stored = study.user_attrs.get("config") if study is not None else None
    return None if stored is None else config_from_dict({**stored, "storage": url}, f"study '{name}' in {url}")


def warm_start_schedules(source: str) -> list[Schedule]:
    """The schedules another search found: a best.json, every point of a pareto.json, or both files of a study
    exported under runs/<source>/."""
    path = Path(source)
    files = [path] if path.suffix == ".json" else [RUNS / source / "best.json", RUNS / source / "pareto.json"]
    found = [f for f in files if f.is_file()]
    if not found:
        raise UserError(f"warm_start {source}: no such best.json or pareto.json, nor an exported study runs/{source}/")
    out = []
    for f in found:
        d = read_json(f, "result file")
        points = d.get("points") if isinstance(d, dict) else None
        out += [Schedule.load(f, i) for i in range(len(points))] if isinstance(points, list) else [Schedule.load(f)]
    return out


def seed_study(cfg: SearchConfig, evaluator: Evaluator) -> optuna.Study:
    """Open the study, store its config and enqueue (once) the warm start's schedules, as this space expresses
    them, then the paper's threshold schedules (static native first, then the native baseline where the config
    asks for it): the sampler takes over after them."""
    study = open_study(cfg, evaluator)
    study.set_user_attr("config", config_dict(cfg))
    if cfg.warm_start and not study.user_attrs.get("warm_started") and cfg.sampler != "bruteforce":
        for schedule in warm_start_schedules(cfg.warm_start):
            study.enqueue_trial(evaluator.space.params_of(schedule), user_attrs={"family": "warm_start"},
                                skip_if_exists=True)
        study.set_user_attr("warm_started", cfg.warm_start)
    if not study.user_attrs.get("enqueued") and cfg.sampler != "bruteforce":
        queue = [(params, "threshold") for params in paper_params(cfg, evaluator)]
        if cfg.native_baseline and (baseline := native_baseline(cfg, evaluator, reference_qualities(study, evaluator))):
            queue.insert(1, (baseline, "native_baseline"))  # right after static native (already sampled: free)
        for params, family in queue:
            study.enqueue_trial(params, user_attrs={"family": family}, skip_if_exists=True)
        study.set_user_attr("enqueued", True)
    return study


def trial_records(study: optuna.Study) -> list[dict[str, Any]]:
    """Completed trials as plain records (schedule, cost, quality, feasibility, family). A trial stopped at a
    lower fidelity is never feasible: it was not measured on the whole search set."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "schedule" not in t.user_attrs:
            continue
        out.append({"number": t.number, "schedule": Schedule.from_dict(t.user_attrs["schedule"]),
                    "fraction": t.values[0], "macs": t.user_attrs["macs"], "quality": t.user_attrs["quality"],
                    "qualities": t.user_attrs.get("qualities", {}),
                    "feasible": all(v <= 0 for v in t.constraints.values()) and not t.user_attrs.get("stopped"),
                    "stopped": str(t.user_attrs.get("stopped") or ""),
                    "family": t.user_attrs.get("family", "search"), "params": t.params})
    return out
