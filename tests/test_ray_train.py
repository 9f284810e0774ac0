"""Flexify with Ray Train: two workers on half batches train exactly as one process on the whole batch, and a
worker killed mid-run is replaced and resumes from the last checkpoint to the uninterrupted run's weights."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from conftest import finish, spawn

from flexisearch.files import load_weights
from flexisearch.models.dit import FlexiDiT
from flexisearch.training.dit import FlexifyConfig, train_flexify

CONFIG = {"mode": "shared", "batch_size": 16, "ckpt_every": 10, "steps": 40, "lr": 1e-3}


def _losses(path: Path) -> dict[int, float]:
    """Loss per step; after a resume the repeated steps' last entries count."""
    return {rec["step"]: rec["loss"] for rec in map(json.loads, path.read_text().splitlines())}


def _train_workers() -> list[int]:
    """PIDs of Ray Train's worker processes (their process titles name the actor class)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_two_ray_workers_equal_one_process_and_survive_a_killed_worker(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CONFIG))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), RAY_TMPDIR=str(tmp_path / "r"))
    proc = spawn([sys.executable, "-m", "flexisearch.cli", "train", "flexify", "--base", "embedded:dit-mnist16-base",
                  "--config", str(cfg), "--out", str(tmp_path / "ray"), "--backend", "ray", "--num-workers", "2"],
                 tmp_path / "logs", env=env)
    train_flexify(FlexifyConfig(base="embedded:dit-mnist16-base", **CONFIG), tmp_path / "one")  # meanwhile

    log = tmp_path / "ray" / "loss.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (log.is_file() and len(_losses(log)) >= 12):
        time.sleep(0.02)
    workers = _train_workers()
    assert proc.poll() is None and len(_losses(log)) < CONFIG["steps"] and len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)  # a worker dies after checkpoint 10, before the end
    _, err = finish(proc, 300)
    assert proc.returncode == 0, err[-2000:]

    info = json.loads((tmp_path / "ray" / "train_info.json").read_text())
    assert info["workers"] == 2 and info["resumed_from_step"] >= 10  # the replaced group resumed from a checkpoint
    single, distributed = _losses(tmp_path / "one" / "loss.jsonl"), _losses(log)
    assert sorted(distributed) == sorted(single) == list(range(1, CONFIG["steps"] + 1))
    assert max(abs(single[s] - distributed[s]) for s in single) < 1e-4
    # The same network: equal outputs. (Not every weight: the attention key bias has zero gradient, softmax being
    # invariant to it, and Adam turns the rounding noise of a zero gradient into steps of the learning rate.)
    one, ray = FlexiDiT.from_pretrained(tmp_path / "one" / "raw"), FlexiDiT.from_pretrained(tmp_path / "ray" / "raw")
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([50.0, 300.0, 600.0, 950.0]), torch.tensor([0, 3, 7, 10])
    with torch.no_grad():
        for p in (2, 4):
            torch.testing.assert_close(ray(x, t, y, p), one(x, t, y, p), atol=1e-4, rtol=0)
    assert torch.equal(load_weights(tmp_path / "ray" / "checkpoint.safetensors")["step"], torch.tensor(CONFIG["steps"]))
