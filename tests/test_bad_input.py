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
    "--set key=null": ({}, ["search", "--set", "fidelities=null"], "key 'fidelities' has None, expected a list"),
    "flexify dm with lora": ({"c.json": '{"dm_weight": 1.0}'}, ["train", "flexify", "--base", "embedded:dit-mnist16-base",
                                                              "--mode", "lora", "--config", "c.json", "--out", "o"],
                             "field 'dm_weight' needs mode 'shared'"),
}


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# Every case in one interpreter (the cost of a run is importing torch): each case calls the console script's
# entry point, flexisearch.cli.main, in its own folder, with stdout and stderr captured; a traceback that
# escaped main would be recorded with exit status 1.
DRIVER = """
import contextlib, io, json, os, sys, traceback
from flexisearch.cli import main
results = []
for folder, argv in json.loads(sys.argv[1]):
    os.chdir(folder)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """name -> (exit status, stdout, stderr, files before, files after) of every case."""
    runs, before = [], {}
    for name, (files, argv, _) in CASES.items():
        folder = tmp_path_factory.mktemp("case")
        for fname, content in files.items():
            if content is None:
                (folder / fname).mkdir()
            elif isinstance(content, bytes):
                (folder / fname).write_bytes(content)
            else:
                (folder / fname).write_text(content)
        before[name] = (folder, tree(folder))
        runs.append([str(folder), argv])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.splitlines()[-1])
    return {name: (*res, before[name][1], tree(before[name][0])) for name, res in zip(CASES, results)}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(outcomes, name):
    code, out, err, files_before, files_after = outcomes[name]
    expect = CASES[name][2]
    assert code == 2, (out, err[-3000:])
    assert out == "" and len(err.splitlines()) == 1, err[-3000:]
    assert err.startswith("flexisearch") and expect in err, err
    assert files_after == files_before


def test_the_cli_process_itself_exits_2_with_one_line(tmp_path):
    """The installed entry point in its own process: exit status 2, one line, no traceback."""
    (tmp_path / "s.yaml").write_text("study: ../elsewhere\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-m", "flexisearch.cli", "search", "--space", "s.yaml"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "key 'study'" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


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
