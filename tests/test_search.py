"""Search spaces, the Optuna backend, held-out confirmation and export, on a tiny random 16x16 model."""

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import finish, random_flexidit, spawn

from flexisearch.cli import main
from flexisearch.errors import UserError
from flexisearch.files import ASSETS
from flexisearch.optimize.config import load_search_config
from flexisearch.optimize.evaluate import Evaluator, TrialResult
from flexisearch.optimize.optuna_backend import run_search
from flexisearch.optimize.spaces import SPACES, make_space
from flexisearch.sampling.schedule import Schedule


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    random_flexidit(size=16).save_pretrained(d)
    return d


def write_space(tmp_path, model_dir, filename="space.yaml", **over):
    doc = {"study": "t", "model": str(model_dir), "space": {"type": "branch_threshold", "num_steps": 4},
           "metric": {"name": "fid_native", "max": 5.0}, "reference": {"num_steps": 4, "guidance_scale": 2.0},
           "search_samples": 20, "heldout_samples": 30, "bootstrap": 20, "n_trials": 6, "batch_size": 32,
           "cost": {"repeats": 1}}  # the latency an export reports: one timed run per part is enough here
    for k, v in over.items():
        doc[k] = {**doc[k], **v} if isinstance(v, dict) and isinstance(doc.get(k), dict) else v
    p = tmp_path / filename
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("text,expect", [
    ("space: [1, 2", "not valid YAML"),
    ("spaec: {}", "unknown key 'spaec'"),
    ("space: {type: zigzag}", "key 'space.type'"),
    ("space: {num_steps: [10, -2]}", "key 'space.num_steps'"),
    ("space: {guidance_scale: {low: 3, high: 1}}", "key 'space.guidance_scale'"),
    ("space: {guidance_mode: [cfg, bogus]}", "key 'space.guidance_mode'"),
    ("space: {solver: [euler, rk4]}", "key 'space.solver'"),
    ("space: {guidance_scale: [2.0, 1000.0]}", "key 'space.guidance_scale'"),
    ("metric: {name: fid, relative: 0.1, max: 3}", "exactly one of relative, within, max, min"),
    ("metric: {name: clip, relative: null, max: 3}", "clip is bounded with min"),
    ("metric: {name: fid_native, relative: 0.1}", "fid_native of static native is 0"),
    ("constraints: {name: class_accuracy}", "key 'constraints' has"),
    ("constraints: [{name: class_accuracy, max: 0.9}]", "key 'constraints[0]': class_accuracy is bounded with min"),
    ("constraints: [{name: class_accuracy, min: 0.9, within: 0.01}]", "key 'constraints[0]' needs exactly one"),
    ("constraints: [{name: acc, within: 0.01}]", "key 'constraints[0].name'"),
    ("constraints: [{name: fid, within: 0.5}]", "key 'constraints' has ['fid', 'fid']"),
    ("metric: {name: fid_native, max: 1}\nconstraints: [{name: fid, relative: 0.1}, {name: fid_native, max: 2}]",
     "key 'constraints' has ['fid_native', 'fid', 'fid_native']"),
    ("constraints: [{name: fid_native, within: 1}]", "key 'constraints[0].within': fid_native of static native is 0"),
    ("fidelities: [64, 32]", "key 'fidelities' has [64, 32], expected increasing sample counts"),
    ("fidelities: [256]", "key 'fidelities' has [256], expected increasing sample counts from 2 to below"),
    ("n_trials: many", "key 'n_trials'"),
    ("sampler: annealing", "key 'sampler'"),
])
def test_bad_config_is_one_line_error(tmp_path, text, expect):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(UserError) as e:
        load_search_config(p)
    assert expect in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_shipped_spaces_validate():
    for p in sorted(Path(__file__).resolve().parent.parent.glob("search_spaces/*.yaml")):
        assert load_search_config(p).n_trials > 0


def test_the_shipped_spaces_are_found_from_any_directory(tmp_path, monkeypatch, capsys):
    """Outside a clone, `flexisearch search` (no --space) and `--space NAME` read the shipped configs, the same
    files the README names (search_spaces/ of the repository); `flexisearch spaces` lists them."""
    from flexisearch.optimize.run import load_config

    repo = Path(__file__).resolve().parent.parent / "search_spaces"
    monkeypatch.chdir(tmp_path)
    assert load_config(None) == load_config("default") == load_search_config(repo / "default.yaml")
    assert load_config("text-default", n_trials=3) == load_search_config(repo / "text-default.yaml", {"n_trials": 3})
    assert main(["spaces"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[:-1]]
    assert names == sorted(p.stem for p in repo.glob("*.yaml"))
    assert main(["search", "--space", "defualt"]) == 2
    assert "not a shipped search space (default, " in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("space_type", SPACES)
def test_every_space_type_builds_valid_schedules(space_type):
    cfg = load_search_config(None, {"space": {"type": space_type, "num_steps": [6, 8], "segments": 3,
                                              "branches": "separate", "guidance_scale": {"low": 1.0, "high": 3.0}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        s = make_space(cfg.space, 2, 4, (2, 4), "fp").suggest(trial)
        assert s.num_steps in (6, 8) and set(s.cond + s.uncond) <= {2, 4} and 1.0 <= s.guidance_scale <= 3.0
        if space_type in ("threshold", "branch_threshold"):  # weak first, then native
            assert list(s.cond) == sorted(s.cond, reverse=True) and list(s.uncond) == sorted(s.uncond, reverse=True)
        if space_type == "threshold":
            assert s.cond == s.uncond
        fractions = [v for k, v in trial.params.items() if "frac" in k or "_cut" in k]  # multiples of 0.05 only
        assert (len(fractions) > 0) == (space_type != "per_step")
        assert all(abs(v / 0.05 - round(v / 0.05)) < 1e-9 for v in fractions)
        seen.add((s.cond, s.uncond))
        study.tell(trial, 0.0)
    assert len(seen) > 5


def _expected_sizes(kind, branches, params, n, native=2, weak=4, segments=3):
    """The (cond, uncond) patch sizes a space's parameters describe, written from the spaces' definitions."""
    def weak_first(frac):
        k = round(frac * n)  # Python's rounding (half to even), as documented for the spaces
        return (weak,) * k + (native,) * (n - k)

    if kind == "threshold":
        return weak_first(params["weak_frac"]), weak_first(params["weak_frac"])
    if kind == "branch_threshold":
        return weak_first(params["weak_frac_cond"]), weak_first(params["weak_frac_uncond"])
    out = {}
    for b in (("cond", "uncond") if branches == "separate" else ("both",)):
        if kind == "per_step":
            out[b] = tuple(params[f"{b}_p{i}"] for i in range(n))
        else:  # segments: levels j, separated at the sorted cut fractions
            cuts = sorted(params[f"{b}_cut{j}"] for j in range(segments - 1))
            edges = [0, *(round(c * n) for c in cuts), n]
            out[b] = tuple(params[f"{b}_seg{j}"] for j in range(segments) for _ in range(edges[j + 1] - edges[j]))
    return out.get("cond", out.get("both")), out.get("uncond", out.get("both"))


@pytest.mark.parametrize("kind,branches", [("threshold", "joint"), ("branch_threshold", "joint"),
                                           ("per_step", "joint"), ("per_step", "separate"),
                                           ("segments", "joint"), ("segments", "separate")])
def test_every_space_builds_the_schedule_its_parameters_describe(kind, branches):
    """Random parameters of each space type, and the paper's weak-first schedules: the schedule suggested
    is the one the parameters describe; the brute-force grid names exactly the parameters a trial uses."""
    import random

    rng = random.Random(0)
    cfg = load_search_config(None, {"space": {
        "type": kind, "branches": branches, "segments": 3, "num_steps": [5, 7, 9],
        "guidance_scale": {"low": 1.0, "high": 3.0, "step": 0.5}, "guidance_mode": ["cfg", "weak_guidance"],
        "solver": ["euler", "dpm++"]}}).space
    space = make_space(cfg, 2, 4, (2, 4), "fp")
    fractions = [round(0.05 * i, 2) for i in range(21)]
    for _ in range(40):
        n = rng.choice([5, 7, 9])
        params = {"num_steps": n, "guidance_scale": rng.choice([1.0, 1.5, 2.0, 2.5, 3.0]),
                  "guidance_mode": rng.choice(["cfg", "weak_guidance"]), "solver": rng.choice(["euler", "dpm++"])}
        names = {"threshold": ["weak_frac"], "branch_threshold": ["weak_frac_cond", "weak_frac_uncond"]}.get(kind, [])
        params.update({k: rng.choice(fractions) for k in names})
        for b in (("cond", "uncond") if branches == "separate" else ("both",)):
            if kind == "per_step":
                params.update({f"{b}_p{i}": rng.choice([2, 4]) for i in range(n)})
            if kind == "segments":
                params.update({f"{b}_seg{j}": rng.choice([2, 4]) for j in range(3)})
                params.update({f"{b}_cut{j}": rng.choice(fractions) for j in range(2)})
        s = space.suggest(optuna.trial.FixedTrial(params))
        assert (s.cond, s.uncond) == _expected_sizes(kind, branches, params, n)
        assert (s.num_steps, s.guidance_scale, s.guidance_mode, s.solver, s.model) == \
            (n, params["guidance_scale"], params["guidance_mode"], params["solver"], "fp")
        if kind != "segments":  # segments is not enumerable
            grid = space.grid()
            used = {k for k in params if not (k.startswith(("cond_p", "uncond_p", "both_p")) and int(k.rsplit("p", 1)[1]) >= n)}
            assert used <= set(grid) and all(params[k] in grid[k] for k in params)
    settings = {"num_steps": 9, "guidance_scale": 2.0, "guidance_mode": "cfg", "solver": "euler"}
    for f in (0.0, 0.2, 0.4, 1.0):  # the paper's family: weak for the first round(f * n) steps, both branches
        s = space.suggest(optuna.trial.FixedTrial(space.paper_params(settings, f)))
        k = round(f * 9)
        assert s.cond == s.uncond == (4,) * k + (2,) * (9 - k) and s.guidance_scale == 2.0


def test_search_settings_are_fixed_listed_or_ranged():
    """A setting given as one value is not searched; a list is a categorical choice; {low, high, step} a range
    whose enumeration (for brute force) is every step from low to high; a range without a step has none."""
    from flexisearch.optimize.spaces import Choice

    trial = optuna.create_study().ask()
    assert Choice((7,)).suggest(trial, "a") == 7 and "a" not in trial.params
    assert Choice((1, 2, 3)).suggest(trial, "b") in (1, 2, 3) and trial.distributions["b"].choices == (1, 2, 3)
    v = Choice(low=1.0, high=2.0, step=0.25).suggest(trial, "c")
    d = trial.distributions["c"]
    assert (d.low, d.high, d.step) == (1.0, 2.0, 0.25) and v in (1.0, 1.25, 1.5, 1.75, 2.0)
    assert Choice(low=1.0, high=2.0, step=0.25).enumerate() == [1.0, 1.25, 1.5, 1.75, 2.0]
    assert Choice(low=0.5, high=0.5, step=0.1).enumerate() == [0.5]
    assert Choice((3, 1)).enumerate() == [3, 1] and Choice((3, 1)).fixed is None and Choice((3,)).fixed == 3
    with pytest.raises(UserError, match="continuous range cannot be enumerated"):
        Choice(low=1.0, high=2.0).enumerate()


def test_search_exports_best_and_pareto(in_tmp, model_dir):
    cfg = load_search_config(write_space(in_tmp, model_dir))
    evaluator = Evaluator(cfg)
    study = run_search(cfg, evaluator, progress=False)
    from flexisearch.optimize.export import export_study

    best = export_study(cfg, evaluator, study)
    out = in_tmp / "runs" / "t"
    doc = json.loads((out / "best.json").read_text())
    assert doc == json.loads(json.dumps(best))
    s = Schedule.from_dict(doc["schedule"])
    s.check_model(evaluator.model.config, evaluator.fingerprint)
    # the exported schedule is the cheapest feasible trial, and its held-out numbers come with an interval
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    feasible = [t for t in trials if all(v <= 0 for v in t.constraints.values())]
    assert doc["cost"]["fraction_of_static_native"] == pytest.approx(min(t.values[0] for t in feasible))
    h = doc["quality"]["heldout"]
    assert h["ci95"][0] <= h["value"] <= h["ci95"][1] and h["n"] == 30 and h["seeds"][0] >= 1_000_000
    assert doc["quality"]["search"] <= 5.0
    assert doc["provenance"]["model_calls_saved_by_prefix_reuse"] > 0
    pareto = json.loads((out / "pareto.json").read_text())
    fr = [p["cost"]["fraction_of_static_native"] for p in pareto["points"]]
    q = [p["quality"]["search"] for p in pareto["points"]]
    assert fr == sorted(fr) and q == sorted(q, reverse=True)
    assert (out / "tradeoff.png").stat().st_size > 1000 and (out / "schedule.png").stat().st_size > 1000
    # the paper's threshold family was enqueued first
    assert trials[0].user_attrs.get("family") == "threshold"


def test_resume_runs_only_the_missing_trials(in_tmp, model_dir):
    cfg = load_search_config(write_space(in_tmp, model_dir, n_trials=3))
    evaluator = Evaluator(cfg)
    first = [t.params for t in run_search(cfg, evaluator, progress=False).trials
             if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(first) == 3
    cfg5 = load_search_config(write_space(in_tmp, model_dir, n_trials=5))
    study = run_search(cfg5, Evaluator(cfg5), progress=False)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 5 and [t.params for t in done[:3]] == first


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "gp", "random"])
def test_samplers_run(in_tmp, model_dir, sampler):
    cfg = load_search_config(write_space(in_tmp, model_dir, n_trials=3, sampler=sampler, study=sampler))
    study = run_search(cfg, Evaluator(cfg), progress=False)
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 3


def test_bruteforce_enumerates_a_small_space(in_tmp, model_dir):
    cfg = load_search_config(write_space(in_tmp, model_dir, sampler="bruteforce", n_trials=8,
                                         space={"type": "per_step", "num_steps": 3}))
    study = run_search(cfg, Evaluator(cfg), progress=False)
    schedules = {tuple(t.user_attrs["schedule"]["cond"]) for t in study.trials}
    assert len(schedules) == 8  # every per-step choice of 2 sizes over 3 steps


def test_multi_objective_front(in_tmp, model_dir):
    """A multi-objective search exports pareto.json: the non-dominated feasible trials, cheapest first, with
    FLOPs fractions and qualities that match the trials, and held-out intervals around their values."""
    from flexisearch.models.flops import schedule_macs
    from flexisearch.optimize.export import export_study

    cfg = load_search_config(write_space(in_tmp, model_dir, objective="multi", n_trials=10, pareto_max=20,
                                         sampler="random", metric={"max": 10.0}))
    evaluator = Evaluator(cfg)
    study = run_search(cfg, evaluator, progress=False)
    assert len(study.directions) == 2
    export_study(cfg, evaluator, study)
    pareto = json.loads((in_tmp / "runs" / "t" / "pareto.json").read_text())
    config = random_flexidit(size=16).config
    reference = Schedule.static(2, 4, guidance_scale=2.0, solver="euler", model=evaluator.fingerprint)

    def fraction(d):
        return schedule_macs(config, Schedule.from_dict(d)) / schedule_macs(config, reference)

    # what the study holds, measured independently of the values the search reported: (FLOPs fraction, fid_native)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 10
    measured = [(fraction(t.user_attrs["schedule"]), t.user_attrs["quality"]) for t in trials]
    for t, (f, q) in zip(trials, measured):
        assert t.values == pytest.approx([f, q])  # objectives: FLOPs fraction, then quality
    feasible = {(f, q) for f, q in measured if q <= 10.0}
    front = sorted(p for p in feasible
                   if not any(g <= p[0] and r <= p[1] and (g, r) != p for g, r in feasible))
    assert pareto["constraint"]["bound"] == 10.0 and pareto["metric"] == "fid_native"
    points = pareto["points"]
    got = [(p["cost"]["fraction_of_static_native"], p["quality"]["search"]) for p in points]
    for p, (f, q) in zip(points, got):
        assert f == pytest.approx(fraction(p["schedule"]), rel=1e-12)
        assert (f, q) in feasible  # a feasible trial of the study
        assert not any(g <= f and r <= q and (g, r) != (f, q) for g, r in feasible)  # dominated by none
        h = p["quality"]["heldout"]
        # static native against its own samples: fid_native is 0 up to float noise (e.g. -2e-6), its interval [0, x]
        assert h["ci95"][0] - 1e-4 <= h["value"] <= h["ci95"][1] + 1e-4 and h["n"] == 30
    assert [f for f, _ in got] == sorted(f for f, _ in got) and len({f for f, _ in got}) == len(got)
    assert len(got) == len(front) and [x for p in got for x in p] == pytest.approx([x for p in front for x in p])
    # static native, something cheaper, dominated feasible trials, and infeasible ones
    assert len(front) >= 2 and len(feasible) > len(front) and len(feasible) < len(set(measured))


def test_unmeetable_constraint(in_tmp, model_dir):
    cfg = load_search_config(write_space(in_tmp, model_dir, metric={"name": "fid", "max": 0.001}, n_trials=2))
    evaluator = Evaluator(cfg)
    study = run_search(cfg, evaluator, progress=False)
    from flexisearch.optimize.export import export_study

    with pytest.raises(UserError, match="no schedule met it"):
        export_study(cfg, evaluator, study)
    assert not (in_tmp / "runs" / "t" / "best.json").exists()


def test_cli_errors_are_one_line(in_tmp, model_dir, capsys):
    cases = [
        (["search", "--space", str(in_tmp / "missing.yaml")], "search space file not found"),
        (["search", "--space", str(write_space(in_tmp, in_tmp / "no-model", "nomodel.yaml"))], "not an embedded name"),
        (["search", "--space", str(write_space(in_tmp, model_dir)), "--storage", "sqlite:////proc/nope/x.db"],
         "cannot open"),
        (["search", "--space", str(write_space(in_tmp, model_dir)), "--storage", "postgresql://u@127.0.0.1:1/db"],
         "cannot open"),
    ]
    for argv, expect in cases:
        assert main(argv + ["--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert expect in err and "\n" not in err, err


def test_storage_created_by_another_process_at_the_same_time(in_tmp, model_dir, monkeypatch):
    """Two processes creating one fresh SQLite storage race on its version row; the loser opens it again."""
    import sqlalchemy.exc

    from flexisearch.optimize.study import open_study

    cfg = load_search_config(write_space(in_tmp, model_dir))
    real, calls = optuna.create_study, []

    def racing(**kw):
        calls.append(1)
        if len(calls) == 1:
            real(**kw)  # the other process wins the race ...
            raise sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint"))
        return real(**kw)

    monkeypatch.setattr(optuna, "create_study", racing)
    study = open_study(cfg, Evaluator(cfg))
    assert len(calls) == 2 and study.study_name == "t"


def test_cli_search_two_workers(in_tmp, model_dir, capsys, monkeypatch):
    """--workers 2: the worker process runs trials too (each process records its model calls under its pid),
    with the command line's overrides, and the two together run exactly n_trials trials."""
    import flexisearch.optimize.optuna_backend as backend

    real, waited = backend._trial_fn, []

    def first_trial_waits(cfg, evaluator, bound):  # the trial function of this process (the worker's is the real one)
        fn = real(cfg, evaluator, bound)

        def trial_fn(trial):
            # This tiny model's trials take milliseconds, less than the worker process takes to start: as with
            # trials slower than a start-up, this process's first trial waits until the worker has completed one.
            if not waited:
                waited.append(trial.number)
                deadline = time.time() + 120
                while (not trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                       and time.time() < deadline):
                    time.sleep(0.2)
            return fn(trial)

        return trial_fn

    monkeypatch.setattr(backend, "_trial_fn", first_trial_waits)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))  # the worker imports flexisearch from where we do
    p = write_space(in_tmp, model_dir, n_trials=9)
    assert main(["search", "--space", str(p), "--workers", "2", "--n-trials", "6", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "best.json" in out and "FLOPs saving" in out
    study = optuna.load_study(study_name="t", storage="sqlite:///runs/t/study.db")
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 6
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    calls = {int(k.rsplit("_", 1)[1]): v for k, v in study.user_attrs.items() if k.startswith("calls_saved_worker_")}
    assert len(calls) == 2 and os.getpid() in calls  # this process and another one
    assert all(run > 0 for saved, run in calls.values())  # each ran the model for trials of its own


BLOCKING_SEARCH = """
import sys, time
from pathlib import Path
from flexisearch.cli import main
from flexisearch.optimize.evaluate import Evaluator
measure, calls = Evaluator.qualities, []

def qualities(self, schedule, sample_set=None):  # call 1 is the reference; the third trial (call 4) blocks
    calls.append(schedule)
    if len(calls) == 4:
        Path("blocked").touch()
        while True:
            time.sleep(0.05)
    return measure(self, schedule, sample_set)

Evaluator.qualities = qualities
sys.exit(main(sys.argv[1:]))
"""


def _completed(study_name):
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///runs/{study_name}/study.db")
    return study, [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


PER_STEP_3 = {"type": "per_step", "num_steps": 3}  # 8 schedules: bruteforce runs each once, so bests compare


@pytest.fixture(scope="module")
def uninterrupted_best(tmp_path_factory, model_dir):
    """best.json of the 8-schedule search, run without interruption."""
    root = tmp_path_factory.mktemp("whole")
    old = os.getcwd()
    os.chdir(root)
    try:
        whole = write_space(root, model_dir, "whole.yaml", study="whole", sampler="bruteforce", n_trials=8,
                            space=PER_STEP_3)
        assert main(["search", "--space", str(whole), "--quiet"]) == 0
    finally:
        os.chdir(old)
    return json.loads((root / "runs" / "whole" / "best.json").read_text())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_search_resumes_to_the_uninterrupted_result(in_tmp, model_dir, uninterrupted_best, sig):
    """Ctrl-C (one line, exit 130) or SIGKILL in the middle of a trial, then the same command again: exactly
    n_trials complete trials, the interrupted schedule run again, and the best of an uninterrupted run."""
    p = write_space(in_tmp, model_dir, study="cut", sampler="bruteforce", n_trials=8, space=PER_STEP_3)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    # as from a terminal: a suite run in the background (a non-interactive shell's `&`) would hand down an ignored SIGINT
    proc = spawn([sys.executable, "-c", BLOCKING_SEARCH, "search", "--space", str(p), "--quiet"], in_tmp / "logs",
                 env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (in_tmp / "blocked").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = finish(proc, 60)
    study, done = _completed("cut")
    states = [t.state.name for t in study.trials]
    assert len(done) == 2 and not (in_tmp / "runs" / "cut" / "best.json").exists()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and out == ""
        assert err.splitlines() == ["flexisearch: interrupted; run the same command again to resume"]
        assert states == ["COMPLETE", "COMPLETE", "WAITING"]  # back in the queue, with what it had suggested
    else:
        assert proc.returncode == -signal.SIGKILL and states == ["COMPLETE", "COMPLETE", "RUNNING"]
    interrupted = study.trials[2].params
    assert interrupted
    assert main(["search", "--space", str(p), "--quiet"]) == 0
    study, done = _completed("cut")
    # the same trial (number 2, same parameters) ran again; nothing failed, nothing ran twice
    assert [t.number for t in study.trials] == [t.number for t in done] == list(range(8))
    assert study.trials[2].params == interrupted and len({json.dumps(t.params, sort_keys=True) for t in done}) == 8
    assert json.loads((in_tmp / "runs" / "cut" / "best.json").read_text())["schedule"] == uninterrupted_best["schedule"]


CLAIM_TRIALS = """
import json, os, sys, time
import optuna
from flexisearch.optimize.storage import open_storage
url, go = sys.argv[1], sys.argv[2]
study = optuna.load_study(study_name="claims", storage=open_storage(url))
print("ready", flush=True)
while not os.path.exists(go):  # start together, so that the claims overlap
    time.sleep(0.01)
print(json.dumps([study.ask({"x": optuna.distributions.IntDistribution(0, 999)}).number for _ in range(40)]))
"""


def test_processes_sharing_a_sqlite_study_never_run_the_same_trial(tmp_path):
    """Four processes asking for trials of one SQLite study (the --workers setup): each enqueued trial (the
    paper's schedules) and each new trial goes to exactly one process."""
    from flexisearch.optimize.storage import open_storage

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="claims", storage=open_storage(url))
    for x in range(80):
        study.enqueue_trial({"x": x})
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM_TRIALS, url, str(go)], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * 4
    go.touch()
    claimed = [n for p in procs for n in json.loads(p.communicate(timeout=120)[0])]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(claimed) == list(range(160))  # 160 asks, 160 distinct trials: none handed out twice


def test_public_api_search_and_export(in_tmp, model_dir):
    """flexisearch.search / export: the documented Python entry points give what the CLI writes."""
    import flexisearch as fs

    p = write_space(in_tmp, model_dir, n_trials=3, study="api")
    result = fs.search(p)
    assert result.best == json.loads((in_tmp / "runs" / "api" / "best.json").read_text())
    assert result.pareto == json.loads((in_tmp / "runs" / "api" / "pareto.json").read_text())
    assert len([t for t in result.study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 3
    assert result.best_schedule == Schedule.from_dict(result.best["schedule"])
    again = fs.export(p)
    assert again.best_schedule == result.best_schedule and again.best["trial"] == result.best["trial"]
    with pytest.raises(AttributeError):
        fs.no_such_name  # noqa: B018


def test_rerun_add_trials_set_and_journal_storage(in_tmp, model_dir, capsys):
    """n_trials semantics on the command line: a complete study is left as it is, with one line; --add-trials N
    runs N more; --set reaches any key; a journal file (as optuna-dashboard takes it) is a storage."""
    p = write_space(in_tmp, model_dir, n_trials=9)
    argv = ["search", "--space", str(p), "--quiet", "--storage", "runs/t/journal.log", "--set", "n_trials=3",
            "--set", "space.num_steps=5", "--set", "search_samples=12"]
    assert main(argv) == 0
    capsys.readouterr()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend("runs/t/journal.log"))
    study = optuna.load_study(study_name="t", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3 and {t.user_attrs["schedule"]["num_steps"] for t in done} == {5}
    assert study.user_attrs["config"]["search_samples"] == 12
    best = in_tmp / "runs" / "t" / "best.json"
    stamp = best.stat().st_mtime_ns
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("study 't' already holds its 3 complete trials: nothing to run")
    assert best.stat().st_mtime_ns == stamp  # not re-exported
    assert main([*argv, "--add-trials", "2"]) == 0
    study = optuna.load_study(study_name="t", storage=storage)
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 5
    assert best.stat().st_mtime_ns > stamp and "best.json: runs/t/best.json" in capsys.readouterr().out
    assert main([*argv[:-6], "--set", "space.num_stesp=5"]) == 2
    assert "key 'space.num_stesp'" in capsys.readouterr().err


def test_show_and_flops_json_and_sample_a_pareto_point(in_tmp, model_dir, capsys):
    """--json gives what the text shows, as data; `sample --point N` samples the N-th Pareto point."""
    p = write_space(in_tmp, model_dir, n_trials=6, objective="multi")
    assert main(["search", "--space", str(p), "--quiet"]) == 0
    capsys.readouterr()
    pareto = json.loads((in_tmp / "runs" / "t" / "pareto.json").read_text())
    assert main(["show", "runs/t/pareto.json", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [q["schedule"] for q in shown["points"]] == [q["schedule"] for q in pareto["points"]]
    assert [q["fraction_of_static_native"] for q in shown["points"]] == \
        [q["cost"]["fraction_of_static_native"] for q in pareto["points"]]
    assert shown["reference"] == {"num_steps": 4, "guidance_scale": 2.0}
    last = len(pareto["points"]) - 1
    assert main(["flops", "--model", str(model_dir), "--schedule", "runs/t/pareto.json", "--point", str(last),
                 "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)
    assert cost["schedule"]["fraction"] == pytest.approx(pareto["points"][last]["cost"]["fraction_of_static_native"])
    assert [r["patch"] for r in cost["per_forward"]] == [2, 4] and cost["per_forward"][0]["vs_native"] == 1.0
    assert main(["sample", "--model", str(model_dir), "--schedule", "runs/t/pareto.json", "--point", str(last),
                 "--n", "4", "--quiet", "--out", "runs/p.png"]) == 0
    assert (in_tmp / "runs" / "p.png").is_file()
    assert main(["sample", "--model", str(model_dir), "--schedule", "runs/t/pareto.json", "--n", "4"]) == 2
    assert f"pick one with --point N, N from 0 to {last}" in capsys.readouterr().err


def test_optuna_dashboard_sees_which_trials_are_feasible(in_tmp, model_dir):
    """The study as optuna-dashboard serves it (its WSGI app): every trial with its constraint, which the
    dashboard reads from the key Optuna < 5 used, so infeasible trials are shown as such."""
    import wsgiref.util

    import optuna_dashboard

    p = write_space(in_tmp, model_dir, n_trials=6, metric={"max": 0.5})  # a tight bound: some trials infeasible
    assert main(["search", "--space", str(p), "--quiet"]) == 0
    study = optuna.load_study(study_name="t", storage="sqlite:///runs/t/study.db")
    app = optuna_dashboard.wsgi("sqlite:///runs/t/study.db")
    environ = {"PATH_INFO": f"/api/studies/{study._study_id}"}
    wsgiref.util.setup_testing_defaults(environ)
    status = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status == ["200 OK"], body[-2000:]
    served = json.loads(body)
    violation = {t.number: t.user_attrs["quality"] - 0.5 for t in study.trials if "quality" in t.user_attrs}
    assert {v > 0 for v in violation.values()} == {True, False}  # both kinds present
    for t in served["trials"]:
        if t["number"] in violation:
            assert t["constraints"] == [pytest.approx(violation[t["number"]])]
    # what the dashboard marks infeasible (its best-trial box is a query on values alone: the marks tell them apart)
    assert sorted(t["number"] for t in served["trials"] if t["constraints"] and t["constraints"][0] > 0) == \
        sorted(n for n, v in violation.items() if v > 0)


@pytest.mark.parametrize("higher_is_better", [False, True])
def test_pareto_front_and_best_record_match_a_brute_force(higher_is_better):
    """pareto_front: the records no other record dominates (no more FLOPs and no worse quality), cheapest first;
    best_record: the cheapest feasible record, ties broken by quality. Checked pairwise, by definition."""
    import random

    from flexisearch.optimize.export import best_record, pareto_front

    rng = random.Random(1)
    records = [{"fraction": rng.choice([0.2, 0.35, 0.5, 0.8, 1.0]), "quality": rng.uniform(0.3, 3.0),
                "feasible": rng.random() < 0.6, "number": i} for i in range(60)]
    good = (lambda r: -r["quality"]) if higher_is_better else (lambda r: r["quality"])
    front = pareto_front(records, higher_is_better)
    expected = [r for r in records if not any(
        s is not r and s["fraction"] <= r["fraction"] and good(s) <= good(r) for s in records)]
    assert sorted(r["number"] for r in front) == sorted(r["number"] for r in expected)
    assert [r["fraction"] for r in front] == sorted(r["fraction"] for r in front)
    feasible = [r for r in records if r["feasible"]]
    cheapest = min(r["fraction"] for r in feasible)
    assert best_record(records, higher_is_better) is min((r for r in feasible if r["fraction"] == cheapest), key=good)
    assert best_record([{**r, "feasible": False} for r in records], higher_is_better) is None


def test_exported_documents_describe_the_study(in_tmp, model_dir):
    """best.json and pareto.json: every field against what the study, the config and an independent FLOPs count
    say (the provenance, the constraint, static native, each entry's cost and qualities), and the plots."""
    import datetime

    from flexisearch import __version__
    from flexisearch.models.flops import schedule_macs
    from flexisearch.optimize.export import export_study
    from flexisearch.sampling.latency import CostTable

    cfg = load_search_config(write_space(in_tmp, model_dir, n_trials=5, sampler="random", pareto_max=20))
    evaluator = Evaluator(cfg)
    study = run_search(cfg, evaluator, progress=False)
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    best = export_study(cfg, evaluator, study)
    assert best == json.loads((in_tmp / "runs" / "t" / "best.json").read_text())
    pareto = json.loads((in_tmp / "runs" / "t" / "pareto.json").read_text())
    trials = {t.number: t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    config = random_flexidit(size=16).config
    reference = Schedule.static(2, 4, guidance_scale=2.0, solver="euler", model=evaluator.fingerprint)
    calls = [v for k, v in study.user_attrs.items() if k.startswith("calls_saved_worker_")]

    prov = best["provenance"]
    created = datetime.datetime.fromisoformat(prov.pop("created"))
    assert before <= created <= datetime.datetime.now(datetime.timezone.utc)
    assert prov == {"study": "t", "storage": "sqlite:///runs/t/study.db", "sampler": "random", "objective": "single",
                    "cost": "flops",
                    "space": "branch_threshold", "n_trials": 5, "search_samples": 20, "search_seeds": [0, 19],
                    "fidelities": [20], "trials_stopped_early": 0, "trials_pruned": 0, "trials_stopped_by": {},
                    "flexisearch": __version__, "model_calls_saved_by_prefix_reuse": sum(c[0] for c in calls),
                    "model_calls_run": sum(c[1] for c in calls)}
    assert len(calls) == 1 and calls[0][1] > 0
    c = {"metric": "fid_native", "bound": 5.0, "relative": None, "within": None, "absolute": 5.0,
         "search_reference_quality": study.user_attrs["reference_quality:fid_native"]}
    assert best["constraint"] == {**c, "constraints": [c], "max_memory_mb": None}  # one metric: the list holds the searched one
    native = best["static_native"]
    native_latency = native["cost"]["latency"]
    assert native["schedule"] == reference.to_dict() and native["cost"]["macs"] == schedule_macs(config, reference)
    table = CostTable.load(in_tmp / "runs" / "t" / "cost_table.json")  # measured at export, kept for the next
    assert table.key["model"] == evaluator.fingerprint and table.key["dtype"] == "float32"
    assert native_latency == {"seconds_per_image": table.batch_seconds(reference, 32) / 32,
                              "peak_bytes": table.schedule_peak_bytes(reference, 32), "fraction_of_static_native": 1.0,
                              "batch_size": 32, **{k: table.key[k] for k in ("device", "dtype", "compile", "merge_lora",
                                                                              "torch")}}
    assert native["quality"]["metric"] == "fid_native" and native["quality"]["heldout"]["n"] == 30
    assert best["model"] == evaluator.fingerprint and best["model_spec"] == str(model_dir)
    for key in ("model", "constraint", "static_native"):
        assert pareto[key] == best[key]
    assert pareto["metric"] == "fid_native" and pareto["provenance"]["n_trials"] == 5

    for entry in [best, *pareto["points"]]:
        t = trials[entry["trial"]]
        s = Schedule.from_dict(entry["schedule"])
        macs = schedule_macs(config, s)
        assert entry["schedule"] == t.user_attrs["schedule"]
        assert entry["family"] == t.user_attrs.get("family", "search")
        latency = entry["cost"].pop("latency")
        assert latency["seconds_per_image"] == table.batch_seconds(s, 32) / 32 > 0
        assert latency["fraction_of_static_native"] == pytest.approx(
            latency["seconds_per_image"] / native_latency["seconds_per_image"])
        assert latency["peak_bytes"] == table.schedule_peak_bytes(s, 32) > 0
        assert entry["cost"] == {"macs": macs, "flops": 2 * macs, "units": "MACs per sample; flops = 2 x macs",
                                 "fraction_of_static_native": pytest.approx(macs / native["cost"]["macs"]),
                                 "saving": pytest.approx(1 - macs / native["cost"]["macs"])}
        q = entry["quality"]
        assert q["metric"] == "fid_native" and q["search"] == t.user_attrs["quality"]
        assert entry["qualities"] == {"fid_native": {k: q[k] for k in ("heldout", "search")}}
        h = q["heldout"]
        assert h["n"] == 30 and h["seeds"] == [1_000_000, 1_000_029]  # held-out seeds: never the search's 0..19
        assert h["ci95"][0] - 1e-4 <= h["value"] <= h["ci95"][1] + 1e-4
    assert best["quality"]["search"] <= 5.0
    for name in ("tradeoff.png", "schedule.png"):
        assert (in_tmp / "runs" / "t" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_of_a_study_where_nothing_met_the_bound_is_one_line(in_tmp, model_dir):
    from flexisearch.optimize.export import export_study

    # 3-step schedules against the 4-step static native: none reaches fid_native 1e-9
    cfg = load_search_config(write_space(in_tmp, model_dir, n_trials=3, metric={"max": 1e-9}, sampler="random",
                                         space={"num_steps": 3}))
    evaluator = Evaluator(cfg)
    study = run_search(cfg, evaluator, progress=False)
    lowest = min(t.user_attrs["quality"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert lowest > 1e-9
    with pytest.raises(UserError) as e:
        export_study(cfg, evaluator, study)
    assert str(e.value) == (f"constraint fid_native <= 1e-09: no schedule met it in 3 trials "
                            f"(best fid_native: {lowest:.4g})")


def test_export_of_a_study_without_complete_trials_is_one_line(in_tmp, model_dir):
    from flexisearch.optimize.export import export_study
    from flexisearch.optimize.study import open_study

    cfg = load_search_config(write_space(in_tmp, model_dir, n_trials=1))
    evaluator = Evaluator(cfg)
    with pytest.raises(UserError) as e:
        export_study(cfg, evaluator, open_study(cfg, evaluator))
    assert str(e.value) == "study 't' in sqlite:///runs/t/study.db has no completed trials"
    assert not (in_tmp / "runs" / "t" / "best.json").exists()


# ---- warm starts -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,branches", [("threshold", "joint"), ("branch_threshold", "joint"),
                                           ("per_step", "joint"), ("per_step", "separate"),
                                           ("segments", "joint"), ("segments", "separate")])
def test_params_of_recovers_every_schedule_of_the_space_and_projects_others(kind, branches):
    """A schedule the space made comes back exactly; another schedule becomes the space's schedule with its
    settings (or the nearest offered), its steps resampled to an offered count and as many weak steps."""
    cfg = load_search_config(None, {"space": {
        "type": kind, "branches": branches, "segments": 3, "num_steps": [5, 7, 9],
        "guidance_scale": {"low": 1.0, "high": 3.0, "step": 0.5}, "guidance_mode": ["cfg", "weak_guidance"],
        "solver": ["euler", "dpm++"]}}).space
    space = make_space(cfg, 2, 4, (2, 4), "fp")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(40):
        trial = study.ask()
        s = space.suggest(trial)
        study.tell(trial, 0.0)
        params = space.params_of(s)
        assert space.suggest(optuna.trial.FixedTrial(params)) == s
        assert set(params) == set(trial.params)  # the parameters a trial of the space has, no others
    if kind == "segments":  # the paper's schedules are enqueued with the same parameters as well
        assert set(space.paper_params({"num_steps": 5}, 0.4)) == set(trial.params) - {
            "guidance_scale", "guidance_mode", "solver"}

    # another model's best: 10 steps (resampled to 9), CFG 2.2 (-> 2.0), weak for 4 of 10 cond / 6 of 10 uncond steps
    other = Schedule(cond=(4,) * 4 + (2,) * 6, uncond=(4,) * 6 + (2,) * 4, guidance_scale=2.2,
                     guidance_mode="weak_guidance", solver="ddim", model="another")
    got = space.suggest(optuna.trial.FixedTrial(space.params_of(other)))
    want = other.resample(9)
    assert (got.num_steps, got.guidance_scale, got.guidance_mode, got.solver, got.model) == \
        (9, 2.0, "weak_guidance", "euler", "fp")
    if kind == "threshold":  # one threshold for both branches: the conditional one's
        assert got.cond == got.uncond == want.cond
    elif branches == "joint" and kind != "branch_threshold":
        assert got.cond == got.uncond == want.cond
    else:
        assert (got.cond, got.uncond) == (want.cond, want.uncond)
    assert space.params_of(other.replace(cond=(8,) * 10, uncond=(1,) * 10)) == space.params_of(
        other.replace(cond=(4,) * 10, uncond=(2,) * 10))  # sizes the model lacks: its nearest
    # more changes of size than the space can express: as many weak steps, first (the paper's schedule)
    zigzag = other.replace(cond=(4, 2) * 5)
    got = space.suggest(optuna.trial.FixedTrial(space.params_of(zigzag)))
    k = zigzag.resample(9).cond.count(4)
    assert got.cond == (zigzag.resample(9).cond if kind == "per_step" else (4,) * k + (2,) * (9 - k))


def test_choices_offer_their_nearest_value_and_say_what_cannot_be_enumerated():
    from flexisearch.optimize.spaces import Choice, nearest_fraction

    assert Choice((1.5, 2.0, 2.5)).nearest(2.2) == 2.0 and Choice((1.5, 2.0, 2.5)).nearest(2.5) == 2.5
    assert Choice(("cfg", "weak_guidance")).nearest("weak_guidance") == "weak_guidance"
    assert Choice(("euler",)).nearest("ddim") == "euler"
    assert Choice(low=1.0, high=3.0).nearest(2.2) == 2.2 and Choice(low=1.0, high=3.0).nearest(5.0) == 3.0
    assert Choice(low=1.0, high=3.0, step=0.5).nearest(2.2) == 2.0 and Choice(low=1.0, high=3.0, step=0.5).nearest(0) == 1.0
    assert [round(nearest_fraction(k, 9) * 9) for k in range(10)] == list(range(10))
    assert nearest_fraction(1, 3) == 0.35  # 1/3 = 0.333: the nearest multiple of 0.05
    with pytest.raises(UserError) as e:
        Choice(low=1.0, high=3.0).enumerate()
    assert str(e.value) == "a continuous range cannot be enumerated (give it a step, or use another sampler)"
    segments = make_space(load_search_config(None, {"space": {"type": "segments"}}).space, 2, 4, (2, 4), "fp")
    with pytest.raises(UserError) as e:
        segments.grid()
    assert str(e.value) == "segments spaces are not enumerable; use another sampler"


def test_warm_start_evaluates_another_searchs_schedules_first(in_tmp, model_dir, capsys):
    from flexisearch.optimize.export import export_study

    first = load_search_config(write_space(in_tmp, model_dir, n_trials=4, sampler="random", study="a"))
    evaluator = Evaluator(first)
    export_study(first, evaluator, run_search(first, evaluator, progress=False))
    pareto = json.loads((in_tmp / "runs" / "a" / "pareto.json").read_text())
    best = json.loads((in_tmp / "runs" / "a" / "best.json").read_text())
    expected = [Schedule.from_dict(best["schedule"])] + [Schedule.from_dict(p["schedule"]) for p in pareto["points"]]

    second = load_search_config(write_space(in_tmp, model_dir, "b.yaml", n_trials=len(expected) + 1, study="b",
                                            warm_start="a", space={"num_steps": 3}))
    study = run_search(second, Evaluator(second), progress=False)
    trials = sorted(study.trials, key=lambda t: t.number)
    space = Evaluator(second).space
    warm = [Schedule.from_dict(t.user_attrs["schedule"]) for t in trials if t.user_attrs.get("family") == "warm_start"]
    seen = []
    for s in expected:  # as the 3-step space expresses them, each once, before anything else
        e = space.suggest(optuna.trial.FixedTrial(space.params_of(s)))
        if e not in seen:
            seen.append(e)
    assert warm == seen and all(t.user_attrs["family"] == "warm_start" for t in trials[:len(seen)])
    assert trials[len(seen)].user_attrs.get("family") == "threshold"
    missing = load_search_config(write_space(in_tmp, model_dir, "c.yaml", study="c", warm_start="nowhere"))
    with pytest.raises(UserError, match="warm_start nowhere: no such best.json or pareto.json"):
        run_search(missing, Evaluator(missing), progress=False)


def test_native_baseline_is_the_cheapest_feasible_static_native_and_every_costlier_trial_is_pruned(in_tmp, model_dir):
    """native_baseline: the cheapest static native with fewer steps than the reference that meets the bound (step
    counts cheapest first, each at every listed guidance scale) is found before the search and enqueued right after
    static native; as the incumbent from the start, it gets every costlier trial pruned before any sample."""
    over = dict(space={"num_steps": [2, 3, 4, 6], "guidance_scale": [1.5, 2.0]}, n_trials=8, fidelities=[8],
                reference={"num_steps": 6, "guidance_scale": 2.0}, sampler="random", native_baseline=True)
    probe = Evaluator(load_search_config(write_space(in_tmp, model_dir, "probe.yaml", study="probe", **over)))

    def native_params(n, g):
        return probe.space.paper_params({"num_steps": n, "guidance_scale": g}, 0.0)
    quality = {(n, g): probe.quality(probe.space.suggest(optuna.trial.FixedTrial(native_params(n, g))))
               for n in (2, 3) for g in (1.5, 2.0)}
    bound = min(quality[3, g] for g in (1.5, 2.0)) * 1.001  # met by a 3-step native, by no 2-step one
    assert min(quality[2, g] for g in (1.5, 2.0)) > bound
    expected = native_params(3, next(g for g in (1.5, 2.0) if quality[3, g] <= bound))

    cfg = load_search_config(write_space(in_tmp, model_dir, metric={"name": "fid_native", "max": bound}, **over))
    study = run_search(cfg, Evaluator(cfg), progress=False)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert trials[0].params == native_params(6, 2.0) and trials[0].user_attrs["family"] == "threshold"
    baseline = trials[1]
    assert baseline.params == expected and baseline.user_attrs["family"] == "native_baseline"
    assert baseline.state == optuna.trial.TrialState.COMPLETE and all(v <= 0 for v in baseline.constraints.values())
    costlier = [t for t in trials[2:] if t.user_attrs["macs"] >= baseline.user_attrs["macs"]]
    assert costlier and all(t.state == optuna.trial.TrialState.PRUNED and t.user_attrs["samples"] == 0
                            for t in costlier)

    off = load_search_config(write_space(in_tmp, model_dir, "off.yaml", **{
        **over, "study": "off", "native_baseline": False, "n_trials": 2,
        "metric": {"name": "fid_native", "max": bound}}))
    families = [t.user_attrs.get("family") for t in sorted(run_search(off, Evaluator(off), progress=False).trials,
                                                            key=lambda t: t.number)]
    assert "native_baseline" not in families and families[:2] == ["threshold", "threshold"]


def three_class_net(directory):
    """The shipped digit net told to tell apart 0, 1 and 2 only (the random models generate 3 classes)."""
    from flexisearch.metrics.featnet import DigitFeatureNet

    digits = DigitFeatureNet.from_pretrained(ASSETS / "featnet")
    net = DigitFeatureNet(dataclasses.replace(digits.config, num_classes=3)).eval()
    net.load_state_dict({k: v[:3] if k.startswith("head.") else v for k, v in digits.state_dict().items()})
    net.save_pretrained(directory / "net3")
    return str(directory / "net3")


def test_several_constraints_each_reach_optuna_and_a_schedule_is_feasible_only_when_it_meets_all(in_tmp, model_dir,
                                                                                                  capsys):
    """fid_native and class_accuracy (a classifier over the model's 3 classes) bound together: each metric is its
    own Optuna constraint equal to its value against its bound, a trial is feasible only when every constraint is
    met, and export picks the cheapest schedule meeting them all and reports each metric held out."""
    from flexisearch.metrics.accuracy import classifier_accuracy
    from flexisearch.metrics.featnet import DigitFeatureNet
    from flexisearch.optimize.export import export_study
    from flexisearch.optimize.study import trial_records

    net = DigitFeatureNet.from_pretrained(three_class_net(in_tmp))
    base = {"study": "both", "sampler": "bruteforce", "n_trials": 8, "space": PER_STEP_3, "search_samples": 60,
            "feature_net": three_class_net(in_tmp)}
    probe = Evaluator(load_search_config(write_space(in_tmp, model_dir, "probe.yaml", **base,
                                                     constraints=[{"name": "class_accuracy", "min": 0.0}])))
    grid = probe.space.grid()
    schedules = [probe.space.suggest(optuna.trial.FixedTrial(dict(zip(grid, values))))
                 for values in itertools.product(*grid.values())]
    measured = [probe.qualities(s) for s in schedules]
    images = probe.samples(schedules[0], probe.search_set)  # the metric is the classifier's accuracy on the samples
    assert measured[0]["class_accuracy"] == classifier_accuracy(net, images, torch.tensor(probe.search_set.labels))

    def split(fid_max, acc_min):  # (feasible, failing only accuracy, failing only FID) schedules
        ok = [(q["fid_native"] <= fid_max, q["class_accuracy"] >= acc_min) for q in measured]
        return sum(f and a for f, a in ok), sum(f and not a for f, a in ok), sum(a and not f for f, a in ok)

    # bounds under which each constraint alone would let through a schedule that the pair rejects
    fid_max, acc_min = next((f, a) for f in sorted({q["fid_native"] for q in measured})
                            for a in sorted({q["class_accuracy"] for q in measured}) if all(split(f, a)))
    cfg = load_search_config(write_space(in_tmp, model_dir, **base, metric={"max": fid_max},
                                         constraints=[{"name": "class_accuracy", "min": acc_min}]))
    evaluator = Evaluator(cfg)
    study = run_search(cfg, evaluator, progress=False)
    records = trial_records(study)
    assert len(records) == 8
    for r, t in zip(records, study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))):
        q = r["qualities"]
        assert q == probe.qualities(r["schedule"])  # the same seeds: the same values
        assert t.constraints == {"fid_native": pytest.approx(q["fid_native"] - fid_max),
                                 "class_accuracy": pytest.approx(acc_min - q["class_accuracy"]),
                                 "0": t.constraints["fid_native"], "1": t.constraints["class_accuracy"]}
        fid_ok, acc_ok = q["fid_native"] <= fid_max, q["class_accuracy"] >= acc_min
        assert r["feasible"] == (fid_ok and acc_ok)
    best = export_study(cfg, evaluator, study)
    feasible = [r for r in records if r["feasible"]]
    assert best["trial"] == min(feasible, key=lambda r: (r["fraction"], r["quality"]))["number"]
    assert [c["metric"] for c in best["constraint"]["constraints"]] == ["fid_native", "class_accuracy"]
    assert [c["bound"] for c in best["constraint"]["constraints"]] == [fid_max, acc_min]
    assert best["constraint"]["constraints"][1]["search_reference_quality"] == probe.qualities(probe.reference)[
        "class_accuracy"]
    acc = best["qualities"]["class_accuracy"]
    held = evaluator.samples(Schedule.from_dict(best["schedule"]), evaluator.heldout_set)
    assert acc["heldout"]["value"] == classifier_accuracy(net, held, torch.tensor(evaluator.heldout_set.labels))
    assert acc["heldout"]["ci95"][0] <= acc["heldout"]["value"] <= acc["heldout"]["ci95"][1]
    assert acc["search"] >= acc_min and best["qualities"]["fid_native"]["search"] <= fid_max
    capsys.readouterr()
    assert main(["show", "runs/both/best.json"]) == 0  # every metric: held out, static native, search seeds and bound
    shown = dict(line.split("  ", 1) for line in capsys.readouterr().out.splitlines() if "  " in line)
    for name, bound in (("fid_native", fid_max), ("class_accuracy", acc_min)):
        q, native = best["qualities"][name], best["static_native"]["qualities"][name]["heldout"]
        assert shown[f"{name} held-out"].strip().startswith(f"{q['heldout']['value']:.3f}  [{q['heldout']['ci95'][0]:.3f}")
        assert shown[f"{name} static native"].strip().startswith(f"{native['value']:.3f}")
        assert shown[f"{name} search seeds"].strip() == f"{q['search']:.3f}  (bound {bound:.3f})"
    assert best["schedule"] != best["static_native"]["schedule"]  # so class accuracy has a paired held-out difference
    d = acc["heldout"]["vs_static_native"]
    assert shown["class_accuracy minus static native"].strip() == (
        f"{d['difference']:+.3f}  [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]  same held-out seeds")
    assert "fid_native minus static native" not in shown


def test_class_accuracy_needs_a_classifier_of_the_models_classes(in_tmp, model_dir):
    # the embedded digit net classifies 10 digits; the random model generates 3 classes
    cfg = load_search_config(write_space(in_tmp, model_dir, constraints=[{"name": "class_accuracy", "within": 0.01}]))
    with pytest.raises(UserError, match="classifies 10 classes, the model generates 3"):
        Evaluator(cfg)


def test_multi_fidelity_stops_hopeless_trials_at_the_first_fidelity_and_keeps_the_best(in_tmp, model_dir):
    """The embedded model, fidelities [16] of 64 search samples, class accuracy at least 0.9: a trial that costs at
    least the cheapest feasible schedule so far is pruned before any sample (Optuna's PRUNED state: its cost is
    exact, it cannot be the answer); one that is confidently below 0.9 on the first 16 samples (static native's
    accuracy on all 64 plus the upper end of the paired interval of its difference from static native on those 16
    is below 0.9: guidance scale 0 ignores the class) stops there (scored on 16 samples, never exported); every
    other trial is scored on all 64, and the exported best is the one of a search that scored every schedule on
    all 64."""
    from optuna.trial import TrialState

    from flexisearch.optimize.export import export_study
    from flexisearch.optimize.study import trial_records

    over = {"model": "embedded:flexidit-mnist16-lora", "sampler": "bruteforce", "n_trials": 10,
            "space": {"type": "threshold", "num_steps": [1, 4], "guidance_scale": [0.0, 2.0]},
            "reference": {"num_steps": 4}, "search_samples": 64, "batch_size": 64,
            "metric": {"name": "fid", "max": 1e6}, "constraints": [{"name": "class_accuracy", "min": 0.9}]}
    whole_cfg = load_search_config(write_space(in_tmp, model_dir, "whole.yaml", study="whole", **over))
    cfg = load_search_config(write_space(in_tmp, model_dir, study="mf", fidelities=[16], **over))
    evaluator = Evaluator(cfg)
    study = run_search(cfg, evaluator, progress=False)
    records = {r["number"]: r for r in trial_records(study)}
    assert len(study.trials) == 10
    head = evaluator.search_set.head(16)
    native = evaluator.qualities(evaluator.reference)["class_accuracy"]
    accuracy = evaluator.constraints[1].metric
    cheapest, why = None, set()
    for t in study.trials:
        schedule = Schedule.from_dict(t.user_attrs["schedule"])
        if cheapest is not None and evaluator.cost(schedule)["fraction"] >= cheapest:
            assert t.state == TrialState.PRUNED and t.number not in records and not t.constraints
            assert t.user_attrs["samples"] == 0 and t.user_attrs["stopped"] == "cost"
            why.add("dominated")
            continue
        r = records[t.number]
        paired = accuracy.paired_interval(evaluator.samples(schedule, head), evaluator.native_samples(head), head,
                                          cfg.bootstrap)
        infeasible = native + paired[2] < 0.9
        assert r["stopped"] == ("class_accuracy" if infeasible else "")
        assert t.user_attrs["samples"] == (16 if r["stopped"] else 64)
        why |= {"infeasible"} if infeasible else set()
        on = head if r["stopped"] else evaluator.search_set  # the qualities recorded: of the samples it was scored on
        assert r["qualities"] == pytest.approx(evaluator.qualities(schedule, on), rel=1e-9)
        assert t.constraints["class_accuracy"] == pytest.approx(0.9 - r["qualities"]["class_accuracy"])
        assert r["feasible"] == (not r["stopped"] and r["qualities"]["class_accuracy"] >= 0.9)
        if r["feasible"]:
            cheapest = min(cheapest if cheapest is not None else r["fraction"], r["fraction"])
    assert why == {"infeasible", "dominated"}  # both rules stopped trials
    assert all(r["stopped"] for r in records.values() if r["schedule"].guidance_scale == 0.0)

    best = export_study(cfg, evaluator, study)
    whole = Evaluator(whole_cfg)
    assert best["schedule"] == export_study(whole_cfg, whole, run_search(whole_cfg, whole, progress=False))["schedule"]
    pruned = sum(t.state == TrialState.PRUNED for t in study.trials)
    stopped = [r["stopped"] for r in records.values() if r["stopped"]] + ["cost"] * pruned
    assert best["provenance"]["fidelities"] == [16, 64] and best["provenance"]["trials_stopped_early"] == len(stopped)
    assert best["provenance"]["trials_stopped_by"] == {k: stopped.count(k) for k in ("cost", "class_accuracy")}
    assert best["provenance"]["n_trials"] == 10 and best["provenance"]["trials_pruned"] == pruned > 0
    assert best["provenance"]["model_calls_run"] < whole.cache.calls_run  # the stopped trials' calls were saved


def test_fid_stops_a_trial_by_its_paired_difference_from_static_native(in_tmp, model_dir):
    """FID relative 5% of 4 native steps, fidelities [32] of 64: one weak step (FID several times static
    native's) stops at 32 samples on FID alone, static native itself never (difference 0), and fid_native (no
    paired difference: it is 0 for static native at every sample count) never stops a trial; the stop follows
    the rule: static native's FID on all 64 plus the low end of the paired interval on the first 32 is above
    the bound."""
    over = {"model": "embedded:flexidit-mnist16-lora", "space": {"type": "threshold", "num_steps": [1, 4]},
            "reference": {"num_steps": 4}, "search_samples": 64, "batch_size": 64, "fidelities": [32],
            "bootstrap": 50, "metric": {"name": "fid", "relative": 0.05, "max": None}}
    cfg = load_search_config(write_space(in_tmp, model_dir, **over))
    evaluator = Evaluator(cfg)
    native = evaluator.qualities(evaluator.reference)
    head = evaluator.search_set.head(32)

    def run(steps: int, fraction: float, e: Evaluator = evaluator) -> TrialResult:
        params = e.space.paper_params({"num_steps": steps}, fraction)
        return e.evaluate(optuna.trial.FixedTrial(params), e.qualities(e.reference))

    weak, static = run(1, 1.0), run(4, 0.0)
    assert weak.stopped == "fid" and weak.samples == 32 and static.stopped == "" and static.samples == 64
    _, low, _ = evaluator.metric.paired_interval(evaluator.samples(weak.schedule, head), evaluator.native_samples(head),
                                                 head, cfg.bootstrap)
    assert native["fid"] + low > evaluator.bounds(native)["fid"]
    assert weak.qualities["fid"] == pytest.approx(evaluator.metric.score(evaluator.samples(weak.schedule, head)))
    own = Evaluator(load_search_config(write_space(in_tmp, model_dir, "own.yaml",
                                                   **{**over, "metric": {"name": "fid_native", "max": 0.5}})))
    weak_own = run(1, 1.0, own)
    assert weak_own.stopped == "" and weak_own.violations["fid_native"] > 0  # infeasible, but measured on all 64


def test_heldout_confirmation_reports_the_paired_difference_from_static_native(in_tmp, model_dir):
    """confirm() adds, per metric with a paired interval, the difference from static native on the same held-out
    seeds: the difference of the two confirmed values, inside its own interval; static native has none, and
    neither has fid_native (static native's own samples are its target)."""
    over = {"model": "embedded:flexidit-mnist16-lora", "space": {"type": "threshold", "num_steps": 4},
            "reference": {"num_steps": 4}, "heldout_samples": 64, "batch_size": 64, "bootstrap": 50,
            "constraints": [{"name": "class_accuracy", "within": 0.01}, {"name": "fid", "relative": 0.05}]}
    evaluator = Evaluator(load_search_config(write_space(in_tmp, model_dir, **over)))
    weak = evaluator.space.suggest(optuna.trial.FixedTrial(evaluator.space.paper_params({}, 1.0)))
    native, held = evaluator.confirm(evaluator.reference), evaluator.confirm(weak)
    assert all("vs_static_native" not in v for v in native.values()) and "vs_static_native" not in held["fid_native"]
    for name in ("class_accuracy", "fid"):
        d = held[name]["vs_static_native"]
        assert d["difference"] == pytest.approx(held[name]["value"] - native[name]["value"], rel=1e-6, abs=1e-12)
        assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    assert held["fid"]["vs_static_native"]["difference"] > 0  # static weak is worse than static native


@pytest.mark.parametrize("bound,hib,want", [
    ({"relative": 0.05}, False, 2.0 * 1.05), ({"relative": 0.05}, True, 2.0 * 0.95),
    ({"within": 0.01}, False, 2.01), ({"within": 0.01}, True, 1.99),
    ({"max": 3.0}, False, 3.0), ({"min": 1.5}, True, 1.5),
])
def test_each_kind_of_bound_lies_on_the_worse_side_of_static_native(bound, hib, want):
    """A bound relative to static native (value 2.0) is that much worse than it: above for lower-is-better metrics,
    below for higher-is-better ones; an absolute bound is itself. The constraint value is <= 0 exactly when met."""
    from types import SimpleNamespace

    from flexisearch.optimize.config import MetricConfig
    from flexisearch.optimize.evaluate import Constraint

    c = Constraint(MetricConfig(**{"name": "x", "relative": None, **bound}), SimpleNamespace(higher_is_better=hib))
    assert c.bound(2.0) == pytest.approx(want, rel=1e-12)
    better, worse = (want + 0.1, want - 0.1) if hib else (want - 0.1, want + 0.1)
    assert c.violation(better, want) == pytest.approx(-0.1) and c.violation(worse, want) == pytest.approx(0.1)
    assert c.violation(want, want) == 0
