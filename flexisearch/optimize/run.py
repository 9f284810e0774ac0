"""A whole search as one call: read the config, run the trials (Optuna or Ray backend), confirm the
best and the Pareto schedules on held-out seeds and export them. The CLI and the Python API use it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import optuna

from ..errors import UserError
from ..files import read_json
from ..sampling.schedule import Schedule
from .config import (
    SearchConfig,
    config_dict,
    config_from_dict,
    load_search_config,
    run_dir,
    space_path,
    storage_url,
)
from .evaluate import Evaluator
from .export import export_study
from .optuna_backend import run_search
from .storage import existing_study
from .study import DONE, open_study, stored_config


@dataclass
class SearchResult:
    """A finished search: its config, the Optuna study, and the exported best.json and pareto.json."""

    config: SearchConfig
    study: optuna.Study
    best: dict[str, Any]
    pareto: dict[str, Any]
    searched: bool = True  # False: the study already held n_trials complete trials; nothing ran or was re-exported

    @property
    def best_schedule(self) -> Schedule:
        return Schedule.from_dict(self.best["schedule"])

    @property
    def pareto_schedules(self) -> list[Schedule]:
        return [Schedule.from_dict(p["schedule"]) for p in self.pareto["points"]]


def load_config(config: str | os.PathLike | SearchConfig | None, **overrides: Any) -> SearchConfig:
    """A SearchConfig from a YAML path, a shipped config's name (None: the shipped default) or a SearchConfig,
    with top-level overrides."""
    if isinstance(config, SearchConfig):  # checked as a YAML file is
        return config_from_dict({**config_dict(config), **overrides}, "config argument")
    return load_search_config(space_path(config), overrides)


def _result(cfg: SearchConfig, study: optuna.Study) -> SearchResult:
    out = run_dir(cfg)
    return SearchResult(cfg, study, read_json(out / "best.json"), read_json(out / "pareto.json"))


def search(config: str | os.PathLike | SearchConfig | None = None, *, device: str | None = None, backend: str = "optuna",
           workers: int = 1, address: str | None = None, progress: bool = False, add_trials: int = 0,
           **overrides: Any) -> SearchResult:
    """Run (or resume) the search a config describes and export its results to runs/<study>/.

    config: a search YAML, a shipped config's name (`flexisearch spaces`), a SearchConfig, or None (the shipped
    default); overrides replace top-level keys (study, n_trials, sampler, storage, objective, ...). n_trials is
    the number of trials the study should hold (complete, or pruned for their cost): a rerun runs the missing
    ones, add_trials > 0 runs that many more, and a study that is complete and exported is returned as it is
    (searched=False). backend "optuna" runs `workers` processes on this machine; "ray" runs on the Ray cluster at
    `address` (None: a local one). device: cpu, cuda or cuda:N (None: cuda when there is one)."""
    cfg = load_config(config, **overrides)
    existing = existing_study(storage_url(cfg), cfg.study)
    done = len(existing.get_trials(deepcopy=False, states=DONE)) if existing else 0
    if add_trials > 0:
        cfg = dataclasses.replace(cfg, n_trials=done + add_trials)
    elif existing is not None and done >= cfg.n_trials and (run_dir(cfg) / "best.json").is_file():
        return dataclasses.replace(_result(cfg, existing), searched=False)
    evaluator = Evaluator(cfg, device)
    if backend == "ray":
        from .ray_backend import run_ray_search  # Ray is imported only when asked for

        study = run_ray_search(cfg, evaluator, address=address)
    else:
        study = run_search(cfg, evaluator, workers=workers, progress=progress)
    export_study(cfg, evaluator, study, progress=progress)
    return _result(cfg, study)


def export(config: str | os.PathLike | SearchConfig | None = None, *, device: str | None = None, progress: bool = False,
           **overrides: Any) -> SearchResult:
    """Re-score the best and Pareto schedules of an existing study on held-out seeds and rewrite its exports.
    The config and overrides name the study; what it was searched with is read from the study itself."""
    named = load_config(config, **overrides)
    cfg = stored_config(storage_url(named), named.study)
    if cfg is None:
        raise UserError(f"study '{named.study}': not found in {storage_url(named)} (run `flexisearch search` first)")
    evaluator = Evaluator(cfg, device)
    study = open_study(cfg, evaluator)
    export_study(cfg, evaluator, study, progress=progress)
    return _result(cfg, study)
