"""The Ray backend on a real two-node Ray cluster on this machine (a head and a second raylet process)."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import yaml
from conftest import random_flexidit

from flexisearch.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    random_flexidit(size=16).save_pretrained(d)
    return d


def space(tmp_path, model_dir, name, n_trials=6, samples=16, **over):
    doc = {"study": name, "model": str(model_dir), "space": {"type": "branch_threshold", "num_steps": 6},
           "metric": {"name": "fid_native", "max": 50.0}, "reference": {"num_steps": 6, "guidance_scale": 2.0},
           "search_samples": samples, "heldout_samples": 16, "bootstrap": 10, "n_trials": n_trials,
           "resources": {"cpu": 1}, "max_concurrent": 2, "max_failures": 3, **over}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def completed(tmp_path, name):
    """Completed trials as (number, params, node), read from the SQLite file read-only: polling must never
    create tables in a storage the search is creating at the same moment."""
    db = tmp_path / "runs" / name / "study.db"
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        rows = con.execute("SELECT t.trial_id, t.number FROM trials t JOIN studies s USING (study_id) "
                           "WHERE s.study_name = ? AND t.state = 'COMPLETE'", (name,)).fetchall()
        out = []
        for trial_id, number in rows:
            params = dict(con.execute("SELECT param_name, param_value FROM trial_params WHERE trial_id = ?",
                                      (trial_id,)).fetchall())
            node = con.execute("SELECT value_json FROM trial_user_attributes WHERE trial_id = ? AND key = 'node'",
                               (trial_id,)).fetchone()
            out.append(SimpleNamespace(number=number, params=params, node=node and json.loads(node[0])))
        con.close()
        return out
    except sqlite3.Error:  # not created yet
        return []


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c, worker
    c.shutdown()


def run_cli(tmp_path, argv):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-m", "flexisearch.cli", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_search_uses_both_nodes_and_survives_losing_one(tmp_path, model_dir, cluster):
    c, worker = cluster
    p = space(tmp_path, model_dir, "two", n_trials=8, samples=48)
    proc = run_cli(tmp_path, ["search", "--backend", "ray", "--address", c.address, "--space", str(p), "--quiet"])
    deadline = time.time() + 400
    # wait until both nodes have finished trials, then take the second node away mid-search
    while (len({t.node for t in completed(tmp_path, "two")}) < 2 and time.time() < deadline
           and proc.poll() is None):
        time.sleep(0.5)
    before = {t.number: t.params for t in completed(tmp_path, "two")}
    nodes_before = {t.node for t in completed(tmp_path, "two")}
    c.remove_node(worker)  # the second node goes away, most likely in the middle of a trial
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-2000:]
    done = completed(tmp_path, "two")
    assert len(done) == 8
    assert all(before[t.number] == t.params for t in done if t.number in before)  # no completed trial lost
    assert len(nodes_before) == 2  # trials ran on both nodes
    assert (tmp_path / "runs" / "two" / "best.json").is_file() and "FLOPs saving" in out
    c.add_node(num_cpus=1)  # give the module's cluster its second node back


def test_interrupted_run_resumes_without_repeating(tmp_path, model_dir):
    p = space(tmp_path, model_dir, "resume", n_trials=6, samples=256, max_concurrent=1)
    argv = ["search", "--backend", "ray", "--space", str(p), "--quiet"]
    proc = run_cli(tmp_path, argv)
    deadline = time.time() + 240
    while len(completed(tmp_path, "resume")) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-2000:]  # still running: it must not have failed early
    proc.send_signal(signal.SIGKILL)  # a hard stop, as when the driver's machine is preempted
    proc.communicate(timeout=400)
    first = {t.number: t.params for t in completed(tmp_path, "resume")}
    assert 2 <= len(first) < 6
    assert (tmp_path / "runs" / "resume" / "ray" / "resume").is_dir()
    proc = run_cli(tmp_path, argv)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-2000:]
    done = completed(tmp_path, "resume")
    # Finished trials are kept and never re-run into the study; after a hard kill Tune's last experiment
    # checkpoint can predate the trial in flight, which is then asked anew: at most one trial over budget.
    assert 6 <= len(done) <= 7 and all(first[t.number] == t.params for t in done if t.number in first)
    assert len({t.number for t in done}) == len(done)


@pytest.mark.parametrize("address,expect", [
    ("not-an-address", "expected auto or HOST:PORT"),
    ("127.0.0.1:1", "cannot reach a Ray cluster"),
])
def test_bad_address_is_a_quick_one_line_error(tmp_path, model_dir, monkeypatch, capsys, address, expect):
    monkeypatch.chdir(tmp_path)
    t0 = time.time()
    assert main(["search", "--backend", "ray", "--address", address, "--space",
                 str(space(tmp_path, model_dir, "bad")), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and "\n" not in err and time.time() - t0 < 60


def test_resources_no_node_has(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    p = space(tmp_path, model_dir, "gpu", resources={"cpu": 1, "gpu": 1})
    assert main(["search", "--backend", "ray", "--space", str(p), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no node of the cluster has them" in err and "\n" not in err
