"""Flexify on a Ray cluster: Ray Train's TorchTrainer runs the single-process recipe on N workers.

The same FlexifyConfig drives both runs. Ray Train starts the workers and their torch.distributed group
(gloo on CPU, NCCL on GPU); training.loop does the rest: every worker draws the whole global batch from
the same seed and trains on its rows, gradients are averaged before each step, and worker 0 writes the
log, the checkpoints and the results into the run folder, which every worker must reach (shared
storage on a multi-node cluster). When a worker dies, FailureConfig restarts the group and every
worker resumes from the last checkpoint in the run folder: the run ends with the weights of an
uninterrupted one. Every driver run is a new Ray Train run (its own name under OUT/ray): Ray's state
of an earlier run is never read back.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..optimize.ray_backend import check_address, init_ray
from ..validate import read_dataclass
from .dit import FlexifyConfig, train_flexify


def _worker(loop_config: dict[str, Any]) -> None:
    from ray.train.torch import get_device

    config = read_dataclass(FlexifyConfig, loop_config["config"], "flexify config")
    train_flexify(config, loop_config["out"], get_device())


def _absolute_paths(config: FlexifyConfig) -> FlexifyConfig:
    """The config with its local paths made absolute: Ray runs the workers in other working directories."""
    def absolute(value: str) -> str:
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    data = config.data if config.data in ("mnist", "digits8") else absolute(config.data)
    return dataclasses.replace(config, base=absolute(config.base), data=data,
                               cache_dir=str(Path(config.cache_dir).resolve()) if config.cache_dir else "")


def train_flexify_ray(config: FlexifyConfig, out_dir: str | Path, num_workers: int, gpus_per_worker: float = 0.0,
                      address: str | None = None, max_failures: int = 3, cpus_per_worker: float = 1.0) -> None:
    """Run train_flexify on num_workers Ray workers (each with cpus_per_worker CPUs, which Ray also gives torch as
    its thread count, and gpus_per_worker GPUs) of the cluster at address (None: a local one); writes what the
    single-process run writes into out_dir."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if config.batch_size % num_workers:
        raise UserError(f"flexify config: field 'batch_size' is {config.batch_size}, expected a multiple of "
                        f"--num-workers {num_workers}")
    out = Path(out_dir).resolve()
    config = _absolute_paths(config)
    address = check_address(address)
    init_ray(address, out / "ray_tmp")
    try:
        resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
        trainer = TorchTrainer(
            _worker, train_loop_config={"config": dataclasses.asdict(config), "out": str(out)},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpus_per_worker > 0,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=f"flexify-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}",
                                 storage_path=str(out / "ray"),
                                 failure_config=FailureConfig(max_failures=max_failures)))
        result = trainer.fit()
        if result.error is not None:
            raise UserError(f"flexify on Ray: the workers failed ({str(result.error).splitlines()[0]})")
    finally:
        ray.shutdown()


__all__ = ["train_flexify_ray"]
