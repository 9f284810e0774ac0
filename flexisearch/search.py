"""Schedule search with Optuna: minimise FLOPs subject to a quality constraint (or a Pareto front).

The study lives in an Optuna storage (SQLite under runs/<study>/ by default), so running the same
command again resumes it, several worker processes (or machines) can share it, and
optuna-dashboard opens it. The paper's threshold schedules are enqueued as starting points.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState

from .errors import UserError
from .objective import Objective
from .schedule import Schedule
from .space import SearchConfig, grid, schedule_from_trial

RUNS = Path("runs")
PAPER_FRACTIONS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 1.0)  # "weak for the first k steps", as fractions of the steps


def run_dir(cfg: SearchConfig) -> Path:
    return RUNS / cfg.study


def storage_url(cfg: SearchConfig) -> str:
    return cfg.storage or f"sqlite:///{run_dir(cfg) / 'study.db'}"


def make_sampler(cfg: SearchConfig, patch_sizes: tuple[int, ...]) -> optuna.samplers.BaseSampler:
    seed = cfg.seed
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, cfg.n_trials // 4)))
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=min(50, max(8, cfg.n_trials // 4)))
    if cfg.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=min(10, max(2, cfg.n_trials // 4)))
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    size = 1
    for values in grid(cfg.space, patch_sizes).values():
        size *= len(values)
    if size > 100_000:
        raise UserError(f"sampler 'bruteforce': the space has {size} points, too many to enumerate")
    return optuna.samplers.BruteForceSampler(seed=seed)


def open_study(cfg: SearchConfig, patch_sizes: tuple[int, ...], higher_is_better: bool) -> optuna.Study:
    """Create or resume the study; created once, before any worker starts (SQLite creation races)."""
    url = storage_url(cfg)
    directions = ["minimize"] if cfg.objective == "single" else ["minimize", "maximize" if higher_is_better else "minimize"]
    optuna.logging.set_verbosity(logging.WARNING)
    for attempt in range(3):
        try:
            if url.startswith("sqlite:///"):
                Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():  # Optuna 5 flags heartbeats experimental, on every run
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url, heartbeat_interval=60, grace_period=180,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)) \
                    if url.startswith(("sqlite", "postgresql", "mysql")) else url
            study = optuna.create_study(study_name=cfg.study, storage=storage, directions=directions,
                                        sampler=make_sampler(cfg, patch_sizes), load_if_exists=True)
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


def paper_params(cfg: SearchConfig, objective: Objective) -> list[dict[str, Any]]:
    """Trial parameters of the paper's threshold schedules in this space (static native and weak included)."""
    space = cfg.space
    n = int(objective.reference.num_steps) if objective.reference.num_steps in space.num_steps.enumerate() \
        else max(space.num_steps.enumerate())
    fixed: dict[str, Any] = {}
    for name in ("num_steps", "guidance_scale", "guidance_mode", "solver"):
        choice = getattr(space, name)
        if choice.fixed is None:
            ref = {"num_steps": n, "guidance_scale": objective.reference.guidance_scale,
                   "guidance_mode": objective.reference.guidance_mode, "solver": objective.reference.solver}[name]
            values = choice.enumerate() if choice.values else [ref]
            fixed[name] = ref if ref in values or not choice.values else values[0]
            if not choice.values:
                fixed[name] = min(max(ref, choice.low), choice.high)
    out = []
    for f in PAPER_FRACTIONS:
        k = round(f * n)
        p = dict(fixed)
        if space.type == "threshold":
            p["weak_frac"] = f
        elif space.type == "branch_threshold":
            p["weak_frac_cond"] = p["weak_frac_uncond"] = f
        elif space.type == "per_step":
            for b in (("cond", "uncond") if space.branches == "separate" else ("both",)):
                p.update({f"{b}_p{i}": objective.weak if i < k else objective.native for i in range(n)})
        else:
            for b in (("cond", "uncond") if space.branches == "separate" else ("both",)):
                p.update({f"{b}_seg{j}": objective.weak if j == 0 else objective.native for j in range(space.segments)})
                p.update({f"{b}_cut{j}": f for j in range(space.segments - 1)})
        out.append(p)
    return out


def _objective_fn(cfg: SearchConfig, objective: Objective, bound: float):
    mc = objective.model.config

    def fn(trial: optuna.Trial) -> float | tuple[float, float]:
        schedule = schedule_from_trial(trial, cfg.space, objective.native, objective.weak, mc.patch_sizes,
                                       objective.fingerprint)
        schedule.check_model(mc, objective.fingerprint, "trial")
        cost = objective.cost(schedule)
        quality = objective.quality(schedule)
        trial.set_user_attr("schedule", schedule.to_dict())
        trial.set_user_attr("macs", cost["macs"])
        trial.set_user_attr("quality", quality)
        trial.set_constraint("quality", objective.violation(quality, bound))
        return cost["fraction"] if cfg.objective == "single" else (cost["fraction"], quality)

    return fn


def reference_quality(study: optuna.Study, objective: Objective) -> float:
    """Static native quality on the search seeds: measured once per study, then read back."""
    key = f"reference_quality:{objective.metric.name}"
    if key not in study.user_attrs:
        study.set_user_attr(key, objective.quality(objective.reference))
    return float(study.user_attrs[key])


def run_worker(cfg: SearchConfig, objective: Objective, progress: bool = True) -> optuna.Study:
    """Run trials in this process until the study holds cfg.n_trials finished trials."""
    study = open_study(cfg, objective.model.config.patch_sizes, objective.metric.higher_is_better)
    bound = objective.threshold(reference_quality(study, objective))
    study.set_user_attr("bound", bound)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    remaining = max(0, cfg.n_trials - done)
    if remaining:
        study.optimize(_objective_fn(cfg, objective, bound), n_trials=remaining, show_progress_bar=progress,
                       callbacks=[optuna.study.MaxTrialsCallback(cfg.n_trials, states=(TrialState.COMPLETE,))],
                       catch=(RuntimeError,))
    study.set_user_attr(f"calls_saved_worker_{os.getpid()}", [objective.cache.calls_saved, objective.cache.calls_run])
    return study


def seed_study(cfg: SearchConfig, objective: Objective) -> optuna.Study:
    """Open the study and enqueue the paper's threshold schedules (once)."""
    study = open_study(cfg, objective.model.config.patch_sizes, objective.metric.higher_is_better)
    if not study.user_attrs.get("enqueued") and cfg.sampler != "bruteforce":
        for params in paper_params(cfg, objective):
            study.enqueue_trial(params, user_attrs={"family": "threshold"}, skip_if_exists=True)
        study.set_user_attr("enqueued", True)
    return study


def run_search(cfg: SearchConfig, objective: Objective, workers: int = 1, config_path: str | None = None,
               progress: bool = True) -> optuna.Study:
    """Seed the study, then run it with `workers` processes on this machine sharing the storage."""
    seed_study(cfg, objective)
    procs = []
    if workers > 1:
        if storage_url(cfg).startswith("sqlite") and workers > 4:
            raise UserError("--workers: SQLite serves at most 4 local workers; use a PostgreSQL or journal storage")
        cmd = [sys.executable, "-m", "flexisearch.cli", "search", "--worker", "--storage", storage_url(cfg),
               "--study", cfg.study]
        if config_path:
            cmd += ["--space", config_path]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // workers)))
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL) for _ in range(workers - 1)]
    try:
        study = run_worker(cfg, objective, progress=progress)
    finally:
        for p in procs:
            p.wait()
    failed = [p.returncode for p in procs if p.returncode]
    if failed:
        raise UserError(f"--workers: {len(failed)} worker process(es) failed (exit {failed[0]})")
    return study


def trial_records(study: optuna.Study) -> list[dict[str, Any]]:
    """Completed trials as plain records (schedule, cost, quality, feasibility, family)."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "schedule" not in t.user_attrs:
            continue
        out.append({"number": t.number, "schedule": Schedule.from_dict(t.user_attrs["schedule"]),
                    "fraction": t.values[0], "macs": t.user_attrs["macs"], "quality": t.user_attrs["quality"],
                    "feasible": all(v <= 0 for v in t.constraints.values()),
                    "family": t.user_attrs.get("family", "search"), "params": t.params})
    return out
