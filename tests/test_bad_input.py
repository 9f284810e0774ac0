"""Bad input as a user gives it, through the CLI in a subprocess: one line on stderr naming the file or flag,
the field and what was expected; exit 2; nothing on stdout; no file written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexisearch.sampling.schedule import Schedule

SCHEDULE = Schedule.static(2, 4, guidance_scale=2.0, solver="euler", model="abc").to_dict()


def schedule_text(**change) -> str:
    return json.dumps({**SCHEDULE, **change})


# name -> (files to create: name -> text or bytes (None: a directory), argv, what the one line must contain)
CASES = {
    "study is a path": ({"s.yaml": "study: ../elsewhere\n"}, ["search", "--space", "s.yaml"], "key 'study'"),
    "study is absolute": ({"s.yaml": "study: /tmp/x\n"}, ["search", "--space", "s.yaml"], "key 'study'"),
    "--study ..": ({"s.yaml": "n_trials: 2\n"}, ["search", "--space", "s.yaml", "--study", ".."], "key 'study'"),
    "--study empty": ({"s.yaml": "n_trials: 2\n"}, ["search", "--space", "s.yaml", "--study", ""], "key 'study'"),
    "yaml is a list": ({"s.yaml": "- a\n- b\n"}, ["search", "--space", "s.yaml"], "s.yaml: expected a mapping"),
    "yaml is binary": ({"s.yaml": b"\xff\xfe\x00\x01"}, ["search", "--space", "s.yaml"], "s.yaml: not a text file"),
    "yaml is a directory": ({"s.yaml": None}, ["search", "--space", "s.yaml"], "s.yaml: is a directory"),
    "yaml too deep": ({"s.yaml": "[" * 100_000}, ["search", "--space", "s.yaml"], "s.yaml: not valid YAML"),
    "bootstrap 0": ({"s.yaml": "bootstrap: 0\n"}, ["search", "--space", "s.yaml"], "key 'bootstrap'"),
    "NaN bound": ({"s.yaml": "metric: {name: fid, max: .nan}\n"}, ["search", "--space", "s.yaml"], "key 'metric.max'"),
    "--n-trials 0": ({}, ["search", "--n-trials", "0"], "argument --n-trials: '0' is not a positive integer"),
    "--workers 0": ({}, ["search", "--workers", "0"], "argument --workers: '0' is not a positive integer"),
    "unknown flag": ({}, ["search", "--n-trails", "3"], "unrecognized arguments: --n-trails"),
    "guidance NaN": ({"s.json": schedule_text(guidance_scale=float("nan"))}, ["show", "s.json"], "s.json: not valid JSON"),
    "guidance Infinity": ({"s.json": schedule_text(guidance_scale=float("inf"))}, ["show", "s.json"], "not valid JSON"),
    "guidance 1e308": ({"s.json": schedule_text(guidance_scale=1e308)}, ["show", "s.json"], "field 'guidance_scale'"),
    "json too deep": ({"s.json": "[" * 100_000 + "]" * 100_000}, ["show", "s.json"], "s.json: not valid JSON"),
    "5000-digit int": ({"s.json": schedule_text(num_steps=int("9" * 4000)).replace("9" * 4000, "9" * 5000)},
                       ["show", "s.json"], "s.json: not valid JSON"),
    "json is a directory": ({"s.json": None}, ["show", "s.json"], "s.json: is a directory"),
    "partial best.json": ({"best.json": json.dumps({"static_native": {}, "schedule": SCHEDULE})}, ["show", "best.json"],
                          "best.json: not a complete best.json"),
    "partial pareto.json": ({"p.json": json.dumps({"metric": "fid", "points": [{"cost": {}}]})}, ["show", "p.json"],
                            "p.json: not a complete"),
    "flops bad schedule": ({"s.json": schedule_text(cond=[3, 3, 3, 3])}, ["flops", "--schedule", "s.json"],
                           "s.json: "),
    "sample --n 0": ({"s.json": schedule_text()}, ["sample", "--schedule", "s.json", "--n", "0"], "argument --n"),
    "sample --label 99": ({"s.json": schedule_text()}, ["sample", "--schedule", "s.json", "--any-model", "--label", "3",
                                                        "99"], "--label 99: this model has classes 0 to 9"),
    "sample --out dir": ({"s.json": schedule_text(), "d": None}, ["sample", "--schedule", "s.json", "--out", "d"],
                         "--out d: expected a .png file name"),
    "sample --device bogus": ({"s.json": schedule_text()}, ["sample", "--schedule", "s.json", "--device", "bogus"],
                              "--device 'bogus'"),
    "sample --device cuda:99": ({"s.json": schedule_text()}, ["sample", "--schedule", "s.json", "--device", "cuda:99"],
                                "--device cuda:99"),
}


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, name):
    files, argv, expect = CASES[name]
    for fname, content in files.items():
        if content is None:
            (tmp_path / fname).mkdir()
        elif isinstance(content, bytes):
            (tmp_path / fname).write_bytes(content)
        else:
            (tmp_path / fname).write_text(content)
    before = tree(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "flexisearch.cli", *argv], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, (r.stdout, r.stderr[-3000:])
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr[-3000:]
    assert r.stderr.startswith("flexisearch") and expect in r.stderr, r.stderr
    assert tree(tmp_path) == before


def test_version_and_a_show_that_never_imports_torch(tmp_path):
    """--version answers; `show` reads a result without importing torch (it answers at once)."""
    from flexisearch import __version__

    (tmp_path / "s.json").write_text(schedule_text())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-m", "flexisearch.cli", "--version"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == f"flexisearch {__version__}\n"
    code = ("import sys; from flexisearch.cli import main; rc = main(['show', 's.json']); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.splitlines() == [Schedule.from_dict(SCHEDULE).describe().join(
        ["4 euler steps, cfg 2.0 (cfg): ", ""]), "no torch"], r.stdout + r.stderr


@pytest.mark.parametrize("field,value,expect", [
    ("num_heads", 0, "field 'num_heads' is 0, expected an integer from 1 to"),
    ("hidden_size", 1 << 40, "field 'hidden_size' is 1099511627776, expected an integer from 1 to"),
    ("hidden_size", 1 << 15, "has shape"),  # 8 GiB of weights: checked against the file before it is allocated
    ("weights", None, "weight 'final_layer.adaLN_modulation.1.weight' has NaN or infinite values"),
])
def test_bad_model_is_one_line_before_allocation(tmp_path, field, value, expect):
    from conftest import random_flexidit

    model = tmp_path / "model"
    flexi = random_flexidit(size=16)
    if field == "weights":
        with torch.no_grad():
            flexi.final_layer.adaLN_modulation[1].weight[0, 0] = float("nan")
    flexi.save_pretrained(model)
    config = json.loads((model / "config.json").read_text())
    if field != "weights":
        (model / "config.json").write_text(json.dumps({**config, field: value}))
    before = tree(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-m", "flexisearch.cli", "flops", "--model", str(model)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr[-3000:]
    assert expect in r.stderr and str(model / ("config.json" if "field" in expect else "model.safetensors")) in r.stderr
    assert tree(tmp_path) == before


def test_the_python_api_checks_its_arguments_as_the_cli_does(tmp_path, monkeypatch):
    import flexisearch as fs
    from flexisearch.errors import UserError

    monkeypatch.chdir(tmp_path)
    for kwargs, expect in (({"device": "bogus"}, "--device 'bogus': expected cpu, cuda or cuda:N"),
                           ({"n_trials": 0}, "key 'n_trials'"), ({"study": "../x"}, "key 'study'"),
                           ({"space": {"solver": "rk4"}}, "key 'space.solver'")):
        with pytest.raises(UserError, match=expect.replace("(", r"\(")):
            fs.search(**kwargs)
    assert list(tmp_path.iterdir()) == []
