"""Distributed schedule search on a Ray cluster (Ray Tune driving the same Optuna study).

The driver runs Ray Tune with an OptunaSearch over the same storage as the Optuna backend, so the
study opens in optuna-dashboard and `flexisearch export` works on it. OptunaSearch only tells
Optuna the objective values; ConstrainedOptunaSearch also records the trial's result (schedule,
quality constraint: study.record, as the Optuna backend does) before telling it, so constrained
samplers see it. A trial runs the same evaluation as the Optuna backend (Evaluator.evaluate).

Each Ray worker process builds its Evaluator (model, feature network, reference statistics) once
and reuses it for every trial it runs (actors are reused); only the trial parameters travel.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import optuna

from ..errors import UserError
from .config import SearchConfig, config_dict, config_from_dict, run_dir
from .evaluate import Evaluator
from .spaces import Space
from .study import (
    DONE,
    WORKER,
    incumbent,
    open_study,
    record,
    reference_qualities,
    release_trials,
    seed_study,
)

_WORKER_EVALUATORS: dict[str, Evaluator] = {}


def _worker_evaluator(cfg_json: str) -> Evaluator:
    """The Evaluator of this worker process (on its GPU if it has one), built on its first trial."""
    if cfg_json not in _WORKER_EVALUATORS:
        _WORKER_EVALUATORS[cfg_json] = Evaluator(config_from_dict(json.loads(cfg_json), "the driver's config"))
    return _WORKER_EVALUATORS[cfg_json]


INCUMBENT = "_incumbent"  # passed with a trial's parameters: workers do not read the study


def _trainable(config: dict, cfg_json: str, native: dict[str, float]) -> None:
    import ray
    from ray import tune

    evaluator = _worker_evaluator(cfg_json)
    params = {k: v for k, v in config.items() if k != INCUMBENT}
    result = evaluator.evaluate(optuna.trial.FixedTrial(params), native, config.get(INCUMBENT))
    tune.report({**result.report(), "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                 "calls_saved": evaluator.cache.calls_saved, "calls_run": evaluator.cache.calls_run})


class _SpaceFn:
    """Define-by-run space for OptunaSearch (a picklable callable: Tune checkpoints its searcher)."""

    def __init__(self, space: Space):
        self.space = space

    def __call__(self, trial: Any) -> None:
        self.space.suggest(trial)


def constrained_optuna_search(cfg: SearchConfig, **kwargs: Any) -> Any:
    """An OptunaSearch that sets the quality constraint and the schedule on each Optuna trial."""
    from ray.tune.search.optuna import OptunaSearch

    class ConstrainedOptunaSearch(OptunaSearch):
        def on_trial_result(self, trial_id: str, result: dict) -> None:
            pass  # a trial reports once, at its end: there are no intermediate values to prune on

        def suggest(self, trial_id: str) -> dict | None:
            params = super().suggest(trial_id)
            if trial_id in self._ot_trials:  # released and queued again if this driver dies (study.release_trials)
                self._ot_trials[trial_id].set_user_attr("worker", WORKER)
            return params if not isinstance(params, dict) else {**params, INCUMBENT: incumbent(self._ot_study, cfg)}

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            ot_trial = self._ot_trials.get(trial_id)
            if result and ot_trial is not None and trial_id not in self._completed_trials and "violations" in result:
                record(ot_trial, result)
                ot_trial.set_user_attr("node", result["node"])
                self._ot_study.set_user_attr(f"calls_saved_worker_{result['node'][:8]}_{result['pid']}",
                                             [result["calls_saved"], result["calls_run"]])
                if result["samples"] == 0:  # TrialResult.pruned: the study records it as the Optuna backend does
                    self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
                    self._completed_trials.add(trial_id)
                    return
            super().on_trial_complete(trial_id, result, error)

    return ConstrainedOptunaSearch(**kwargs)


def check_address(address: str | None) -> str | None:
    """Validate --address quickly, so a bad or unreachable cluster is an error, not a hang."""
    if address in (None, "", "local"):
        return None
    if address == "auto":
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--address {address!r}: expected auto or HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        raise UserError(f"--address {address}: cannot reach a Ray cluster there ({e.strerror or e})") from None
    return address


def init_ray(address: str | None, tmp_dir: Path) -> None:
    """Connect to the cluster at a checked address (check_address), or start a local one with its files under
    tmp_dir (or RAY_TMPDIR, or a short path in the system's temp folder when tmp_dir is too long for Ray)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Tune's result loggers and experiment checkpoints are never read (the study is the only state read back)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "3600")
    if address is None:
        tmp = Path(os.environ.get("RAY_TMPDIR") or tmp_dir).resolve()
        if len(str(tmp)) > 40:  # Ray's socket paths below it must fit in 107 bytes (AF_UNIX)
            tmp = Path(tempfile.gettempdir()) / f"flexisearch-ray-{os.getuid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        ray.init(include_dashboard=False, _temp_dir=str(tmp), log_to_driver=False, configure_logging=False)
        return
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError) as e:
        raise UserError(f"--address {address}: cannot connect to a Ray cluster ({str(e).splitlines()[0]})") from None


def check_resources(resources: dict[str, float]) -> None:
    """Refuse per-trial resources that no alive node has (Tune would wait for them forever)."""
    import ray

    need = {k.upper() if k in ("cpu", "gpu") else k: float(v) for k, v in resources.items() if v}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(all(node.get(k, 0.0) >= v for k, v in need.items()) for node in nodes):
        have = [{k: node.get(k, 0.0) for k in need} for node in nodes]
        raise UserError(f"resources {resources}: no node of the cluster has them (nodes have {have})")


def _tuner(cfg: SearchConfig, evaluator: Evaluator, study: optuna.Study, trainable: Any, name: str,
           storage_path: str, num_samples: int) -> Any:
    from ray import tune

    multi = cfg.objective == "multi"
    hib = evaluator.metric.higher_is_better
    searcher = constrained_optuna_search(
        cfg, space=_SpaceFn(evaluator.space), metric=["fraction", "quality"] if multi else "fraction",
        mode=["min", "max" if hib else "min"] if multi else "min",
        study_name=cfg.study, storage=study._storage, sampler=study.sampler, seed=cfg.seed)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=num_samples,
                                    max_concurrent_trials=cfg.max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures)))


def run_ray_search(cfg: SearchConfig, evaluator: Evaluator, address: str | None = None) -> optuna.Study:
    """Run the search through Ray Tune. The Optuna study is the only state read back: a run resumes an
    interrupted one by running the trials the study lacks (Tune's own saved state, pickles, is never read)."""
    import ray
    from ray import tune

    address = check_address(address)
    cfg = evaluator.pin_costs(cfg)  # latency: every worker predicts with this process's cost table
    study = seed_study(cfg, evaluator)  # created once, before any worker; the threshold family enqueued
    release_trials(study)  # those a killed driver left running are queued again
    native = reference_qualities(study, evaluator)
    init_ray(address, run_dir(cfg) / "ray_tmp")
    try:
        check_resources(cfg.resources)
        storage_path = str((run_dir(cfg) / "ray").resolve())
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, cfg_json=json.dumps(config_dict(cfg), sort_keys=True), native=native),
            {k: v for k, v in cfg.resources.items() if v})
        # Round 0 runs the trials the study lacks; later rounds top up trials that failed for good (e.g. their
        # node died more often than FailureConfig allows). Each round is a new Tune experiment.
        for round_ in range(cfg.max_failures + 1):
            remaining = cfg.n_trials - len(study.get_trials(deepcopy=False, states=DONE))
            if remaining <= 0:
                break
            name = f"{cfg.study}-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}-{round_}"
            grid = _tuner(cfg, evaluator, study, trainable, name, storage_path, remaining).fit()
            if grid.num_terminated + grid.num_errors < len(grid):  # Tune stopped early: Ctrl-C
                release_trials(study, mine=True)
                raise KeyboardInterrupt
    finally:
        ray.shutdown()
    return open_study(cfg, evaluator)
