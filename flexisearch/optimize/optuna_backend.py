"""The Optuna backend: trials in this process, or in `workers` processes on this machine sharing the
study's storage (each process is `flexisearch search --worker` with the same config).

No trial is lost and none is run twice: a trial interrupted by Ctrl-C goes back to the queue, one whose
process was killed is found on the next run (its process is gone, or its heartbeat stopped) and queued
again, and a trial asked for once n_trials others are complete or running goes back too, so the study
ends with exactly n_trials complete trials however many processes share it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import optuna
from optuna.trial import TrialState

from ..errors import UserError
from .config import SearchConfig, storage_url
from .evaluate import Evaluator
from .study import (
    DONE,
    WORKER,
    incumbent,
    open_study,
    record,
    reference_qualities,
    release,
    release_trials,
    seed_study,
)


class _Stop(BaseException):
    """Ends study.optimize from inside a trial that was put back in the queue (study.release), so that no
    one tells Optuna a result for it: Optuna catches Exception and KeyboardInterrupt in a trial, not this."""


class _StudyFull(_Stop):
    """The study already had n_trials complete or running trials when this one was asked for."""


class _Interrupted(_Stop):
    """Ctrl-C during a trial."""


def _trial_fn(cfg: SearchConfig, evaluator: Evaluator, native: dict[str, float]):
    """The callable study.optimize runs: one trial evaluation, recorded in the study."""
    def fn(trial: optuna.Trial) -> float | tuple[float, float]:
        ahead = trial.study.get_trials(deepcopy=False, states=(*DONE, TrialState.RUNNING))
        if sum(t.number < trial.number for t in ahead) >= cfg.n_trials:
            release(trial.study, trial)  # another process took the last place
            raise _StudyFull
        trial.set_user_attr("worker", WORKER)
        try:
            result = evaluator.evaluate(trial, native, incumbent(trial.study, cfg))
            record(trial, result.report())
        except KeyboardInterrupt:
            release(trial.study, trial)
            raise _Interrupted from None
        if result.pruned:
            raise optuna.TrialPruned(f"costs {result.cost['fraction']:.4g}, at least the incumbent's")
        return result.values(cfg.objective)
    return fn


def run_worker(cfg: SearchConfig, evaluator: Evaluator, progress: bool = True) -> optuna.Study:
    """Run trials in this process until the study holds cfg.n_trials complete trials."""
    study = open_study(cfg, evaluator)
    release_trials(study)
    native = reference_qualities(study, evaluator)
    remaining = max(0, cfg.n_trials - len(study.get_trials(deepcopy=False, states=DONE)))
    try:
        if remaining:
            study.optimize(_trial_fn(cfg, evaluator, native), n_trials=remaining, show_progress_bar=progress,
                           callbacks=[optuna.study.MaxTrialsCallback(cfg.n_trials, states=DONE)],
                           catch=(RuntimeError,))
    except _StudyFull:
        pass
    except _Interrupted:
        raise KeyboardInterrupt from None
    study.set_user_attr(f"calls_saved_worker_{os.getpid()}", [evaluator.cache.calls_saved, evaluator.cache.calls_run])
    return study


def run_search(cfg: SearchConfig, evaluator: Evaluator, workers: int = 1, progress: bool = True) -> optuna.Study:
    """Seed the study, then run it with `workers` processes on this machine sharing the storage; the other
    processes read the config from the study (study.stored_config), overrides included."""
    if workers > 4 and storage_url(cfg).startswith("sqlite"):
        raise UserError("--workers: SQLite serves at most 4 local workers; use a PostgreSQL or journal storage")
    cfg = evaluator.pin_costs(cfg)  # latency: every worker predicts with this process's cost table
    seed_study(cfg, evaluator)
    procs = []
    if workers > 1:
        cmd = [sys.executable, "-m", "flexisearch.cli", "search", "--worker", "--storage", storage_url(cfg),
               "--study", cfg.study, "--device", str(evaluator.device)]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // workers)))
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL) for _ in range(workers - 1)]
    try:
        study = run_worker(cfg, evaluator, progress=progress)
    except KeyboardInterrupt:  # a Ctrl-C reaches the workers too; a signal to this process alone is passed on
        for p in procs:
            p.send_signal(signal.SIGINT)
        raise
    finally:
        for p in procs:
            p.wait()
    failed = [p.returncode for p in procs if p.returncode]
    if failed:
        raise UserError(f"--workers: {len(failed)} worker process(es) failed (exit {failed[0]})")
    return study
