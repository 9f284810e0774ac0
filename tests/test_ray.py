"""The Ray backend on a real Ray cluster on this machine (a head and two worker raylet processes)."""

import datetime
import json
import os
import signal
import sqlite3
import sys
import time
from types import SimpleNamespace

import optuna
import pytest
import yaml
from conftest import finish, random_flexidit, spawn

from flexisearch.cli import main
from flexisearch.optimize.config import load_search_config
from flexisearch.optimize.evaluate import Evaluator


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    random_flexidit(size=16).save_pretrained(d)
    return d


def space(tmp_path, model_dir, name, n_trials=6, samples=16, **over):
    doc = {"study": name, "model": str(model_dir), "space": {"type": "branch_threshold", "num_steps": 6},
           "metric": {"name": "fid_native", "max": 50.0}, "reference": {"num_steps": 6, "guidance_scale": 2.0},
           "search_samples": samples, "heldout_samples": 16, "bootstrap": 10, "n_trials": n_trials,
           "resources": {"cpu": 1}, "max_concurrent": 2, "max_failures": 3, "cost": {"repeats": 1}, **over}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def trials_in(tmp_path, name, state="COMPLETE"):
    """Trials in a state as (number, params, node, start), read from the SQLite file read-only: polling
    must never create tables in a storage the search is creating at the same moment."""
    db = tmp_path / "runs" / name / "study.db"
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        rows = con.execute("SELECT t.trial_id, t.number, t.datetime_start FROM trials t JOIN studies s "
                           "USING (study_id) WHERE s.study_name = ? AND t.state = ?", (name, state)).fetchall()
        out = []
        for trial_id, number, start in rows:
            params = dict(con.execute("SELECT param_name, param_value FROM trial_params WHERE trial_id = ?",
                                      (trial_id,)).fetchall())
            node = con.execute("SELECT value_json FROM trial_user_attributes WHERE trial_id = ? AND key = 'node'",
                               (trial_id,)).fetchone()
            worker = con.execute("SELECT value_json FROM trial_user_attributes WHERE trial_id = ? AND key = 'worker'",
                                 (trial_id,)).fetchone()
            start = start and datetime.datetime.fromisoformat(start).replace(tzinfo=datetime.timezone.utc).timestamp()
            out.append(SimpleNamespace(number=number, params=params, node=node and json.loads(node[0]), start=start,
                                       worker=worker and json.loads(worker[0])))
        con.close()
        return out
    except sqlite3.Error:  # not created yet
        return []


def completed(tmp_path, name):
    return trials_in(tmp_path, name, "COMPLETE")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # the cluster's processes, and the trial workers they start, import flexisearch from where the tests do
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(sys.path)
    try:
        # trials run on the two workers only, so whichever finishes a trial first can be the one taken away
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        workers = [c.add_node(num_cpus=1) for _ in range(2)]
        c.wait_for_nodes()
        yield c, workers
        c.shutdown()
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old


def run_cli(tmp_path, argv):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return spawn([sys.executable, "-m", "flexisearch.cli", *argv], tmp_path / "logs", cwd=tmp_path, env=env)


def static_weak_quality(path):
    """Search-set quality of static weak, the cheapest schedule of a space (every step at the weak size)."""
    cfg = load_search_config(path)
    evaluator = Evaluator(cfg)
    weak = evaluator.space.suggest(optuna.trial.FixedTrial({"weak_frac_cond": 1.0, "weak_frac_uncond": 1.0}))
    return evaluator.quality(weak)


def test_search_uses_both_nodes_and_survives_losing_one(tmp_path, model_dir, cluster, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run folder of static_weak_quality, where the search runs too
    c, workers = cluster
    n, samples = 12, 128
    # a bound between static native (fid_native 0) and static weak: the cheapest schedules miss it
    bound = static_weak_quality(space(tmp_path, model_dir, "two", n_trials=n, samples=samples)) / 2
    p = space(tmp_path, model_dir, "two", n_trials=n, samples=samples, metric={"name": "fid_native", "max": bound},
              fidelities=[32])
    proc = run_cli(tmp_path, ["search", "--backend", "ray", "--address", c.address, "--space", str(p), "--quiet"])
    ids = {w.node_id: w for w in workers}
    deadline = time.time() + 400
    # as soon as a node has finished a trial, take that node away (the other may still be starting its first)
    while (not (first := [t for t in completed(tmp_path, "two") if t.node in ids]) and time.time() < deadline
           and proc.poll() is None):
        time.sleep(0.2)
    before = {t.number: t.params for t in completed(tmp_path, "two")}
    assert proc.poll() is None and len(before) < n, f"the search was over before the node loss ({len(before)} trials)"
    c.remove_node(ids[first[0].node])  # a node goes away in the middle of the search, most likely of a trial
    out, err = finish(proc, 400)
    assert proc.returncode == 0, err[-2000:]
    done = completed(tmp_path, "two") + trials_in(tmp_path, "two", "PRUNED")
    assert len(done) == n
    assert all(before[t.number] == t.params for t in done if t.number in before)  # no completed trial lost
    assert {t.node for t in done} == set(ids)  # trials ran on both nodes
    assert (tmp_path / "runs" / "two" / "best.json").is_file() and "FLOPs saving" in out

    # Optuna was told each trial's quality constraint (fid_native - bound: <= 0 when met) ...
    study = optuna.load_study(study_name="two", storage=f"sqlite:///{tmp_path / 'runs' / 'two' / 'study.db'}")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    for t in trials:
        # under its metric's name, and as the list optuna-dashboard reads (Optuna reports it as constraint "0")
        assert t.constraints == {"fid_native": pytest.approx(t.user_attrs["quality"] - bound),
                                 "0": t.constraints["fid_native"]}
    feasible = [t for t in trials if t.user_attrs["quality"] <= bound]
    assert feasible and len(feasible) < len(trials)  # some trials met the bound, some did not
    # ... so the exported schedule meets the bound: the cheapest trial that does, not the cheapest of all
    best = json.loads((tmp_path / "runs" / "two" / "best.json").read_text())
    assert best["quality"]["search"] <= bound and best["constraint"]["bound"] == pytest.approx(bound)
    assert best["trial"] in {t.number for t in feasible}
    assert best["cost"]["fraction_of_static_native"] == pytest.approx(min(t.values[0] for t in feasible))
    assert min(t.values[0] for t in trials) < best["cost"]["fraction_of_static_native"]
    # a trial that cost at least the cheapest feasible one when it started was pruned, before any sample
    pruned = study.get_trials(states=(optuna.trial.TrialState.PRUNED,))
    assert pruned and best["provenance"]["trials_pruned"] == len(pruned)
    for t in pruned:
        assert t.user_attrs["samples"] == 0 and t.user_attrs["stopped"] == "cost" and not t.constraints
        assert t.user_attrs["macs"] >= best["cost"]["macs"]


class _Planted:
    """A pickle that runs code when loaded: it makes the directory `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_killed_driver_resumes_from_the_study_and_never_unpickles_the_run_directory(tmp_path, model_dir):
    """SIGKILL of the driver with a trial in flight, pickles that run code planted wherever Tune keeps state in
    the (shared) run directory, then the same command: the pickles are never loaded, finished trials are kept,
    the trial in flight runs again, and the study ends with exactly n_trials complete trials."""
    import pickle

    n = 6
    p = space(tmp_path, model_dir, "resume", n_trials=n, samples=256, max_concurrent=1)
    argv = ["search", "--backend", "ray", "--space", str(p), "--quiet"]
    proc = run_cli(tmp_path, argv)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        running = trials_in(tmp_path, "resume", "RUNNING")
        # a trial in flight that has recorded its driver (the driver writes it just after Optuna hands the trial out)
        if len(completed(tmp_path, "resume")) >= 2 and len(running) == 1 and running[0].worker:
            break
        time.sleep(0.05)
    assert proc.poll() is None, finish(proc, 10)[1][-2000:]  # still running: it must not have failed early
    waited = time.time() - deadline + 240
    proc.send_signal(signal.SIGKILL)  # a hard stop, as when the driver's machine is preempted
    _, err = finish(proc, 400)
    first = {t.number: t.params for t in completed(tmp_path, "resume")}
    in_flight = {t.number: t.params for t in trials_in(tmp_path, "resume", "RUNNING")}
    seen = {state: [t.number for t in trials_in(tmp_path, "resume", state)] for state in ("FAIL", "WAITING")}
    assert 2 <= len(first) < n and len(in_flight) == 1, (f"killed after {waited:.0f} s: complete {sorted(first)}, "
                                                         f"running {sorted(in_flight)}, {seen}; stderr: {err[-2000:]}")

    ray_dir = tmp_path / "runs" / "resume" / "ray"
    marker = tmp_path / "pickle-was-loaded"
    payload = pickle.dumps(_Planted(marker))
    dirs = [ray_dir, ray_dir / "resume", *(d for d in ray_dir.rglob("*") if d.is_dir())]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        for name in ("tuner.pkl", "trainable.pkl", "searcher-state-planted.pkl", *(f.name for f in d.glob("*.pkl"))):
            (d / name).write_bytes(payload)
    proc = run_cli(tmp_path, argv)
    _, err = finish(proc, 400)
    assert proc.returncode == 0, err[-2000:]
    assert not marker.exists()
    done = {t.number: t.params for t in completed(tmp_path, "resume")}
    assert sorted(done) == list(range(n)) and trials_in(tmp_path, "resume", "RUNNING") == []
    before = {**first, **in_flight}  # finished trials kept, not re-run; the trial in flight run again, as itself
    assert all(done[k] == before[k] for k in before)


@pytest.mark.parametrize("address,expect", [
    ("not-an-address", "expected auto or HOST:PORT"),
    ("127.0.0.1:1", "cannot reach a Ray cluster"),
])
def test_bad_address_is_a_quick_one_line_error(tmp_path, model_dir, monkeypatch, capsys, address, expect):
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--backend", "ray", "--address", address, "--space",
                 str(space(tmp_path, model_dir, "bad")), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and "\n" not in err


def test_resources_no_node_has(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    p = space(tmp_path, model_dir, "gpu", resources={"cpu": 1, "gpu": 1})
    assert main(["search", "--backend", "ray", "--space", str(p), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no node of the cluster has them" in err and "\n" not in err
