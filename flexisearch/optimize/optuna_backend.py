"""The Optuna backend: trials in this process, or in `workers` processes on this machine sharing the
study's storage (each process is `flexisearch search --worker` with the same config)."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
from optuna.trial import TrialState

from ..errors import UserError
from .config import SearchConfig, storage_url
from .evaluate import Evaluator
from .study import open_study, record, reference_quality, seed_study


def _trial_fn(cfg: SearchConfig, evaluator: Evaluator, bound: float):
    """The callable study.optimize runs: one trial evaluation, recorded in the study."""
    def fn(trial: optuna.Trial) -> float | tuple[float, float]:
        result = evaluator.evaluate(trial, bound)
        record(trial, result.report())
        return result.values(cfg.objective)
    return fn


def run_worker(cfg: SearchConfig, evaluator: Evaluator, progress: bool = True) -> optuna.Study:
    """Run trials in this process until the study holds cfg.n_trials finished trials."""
    study = open_study(cfg, evaluator)
    bound = evaluator.threshold(reference_quality(study, evaluator))
    study.set_user_attr("bound", bound)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    remaining = max(0, cfg.n_trials - done)
    if remaining:
        study.optimize(_trial_fn(cfg, evaluator, bound), n_trials=remaining, show_progress_bar=progress,
                       callbacks=[optuna.study.MaxTrialsCallback(cfg.n_trials, states=(TrialState.COMPLETE,))],
                       catch=(RuntimeError,))
    study.set_user_attr(f"calls_saved_worker_{os.getpid()}", [evaluator.cache.calls_saved, evaluator.cache.calls_run])
    return study


def run_search(cfg: SearchConfig, evaluator: Evaluator, workers: int = 1, config_path: str | None = None,
               progress: bool = True) -> optuna.Study:
    """Seed the study, then run it with `workers` processes on this machine sharing the storage."""
    seed_study(cfg, evaluator)
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
        study = run_worker(cfg, evaluator, progress=progress)
    finally:
        for p in procs:
            p.wait()
    failed = [p.returncode for p in procs if p.returncode]
    if failed:
        raise UserError(f"--workers: {len(failed)} worker process(es) failed (exit {failed[0]})")
    return study
