"""Latency cost models: the cost table (schema, errors, predictions), the cached weak path and merged LoRA,
and a search that minimises predicted latency instead of FLOPs."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import optuna
import pytest
import torch
from conftest import random_flexidit

from flexisearch.cli import main
from flexisearch.errors import UserError
from flexisearch.optimize.config import load_search_config
from flexisearch.optimize.evaluate import Evaluator
from flexisearch.sampling.latency import CostTable, Timing, _time_parts, profile
from flexisearch.sampling.schedule import Schedule


@pytest.fixture(scope="module")
def lora_model():
    return random_flexidit(size=16, lora_rank=4)


@pytest.fixture(scope="module")
def table(lora_model):
    return profile(lora_model, [1, 3], ["euler", "dpm++"], warmup=1, repeats=3)



def test_parts_are_timed_in_turns_as_runs_of_warm_consecutive_calls(monkeypatch):
    """Each round times every part once, as one untimed call and then enough calls to last unit_s; the table
    keeps seconds per call. A fake clock that each call advances by its part's cost makes this exact."""
    clock, calls = [0.0], []

    def part(name: str, cost: float):
        def fn() -> None:
            calls.append(name)
            clock[0] += cost
        return fn

    monkeypatch.setattr("flexisearch.sampling.latency.time.perf_counter", lambda: clock[0])
    a, b = 2.0**-6, 2.0**-5  # binary fractions: the clock's sums are exact
    timed = _time_parts({"a": part("a", a), "b": part("b", b)}, torch.device("cpu"), warmup=2, repeats=3,
                        unit_s=2.0**-3)
    assert timed["a"] == Timing(a, a, a, 3) and timed["b"] == Timing(b, b, b, 3)
    # warm-up, then a run of one call to size the runs (8 and 4 calls); then rounds of (untimed call + run) per part
    assert calls == ["a"] * 4 + ["b"] * 4 + (["a"] * 9 + ["b"] * 5) * 3

# ---- the cost table ------------------------------------------------------------------------------------------

def test_cost_table_covers_every_layout_and_predicts_the_sum_of_its_parts(lora_model, table):
    sizes = lora_model.config.patch_sizes
    assert set(table.steps) == {(c, u, b) for c in sizes for u in (None, *sizes) for b in (1, 3)}
    assert set(table.solvers) == {(s, b) for s in ("euler", "dpm++") for b in (1, 3)} and set(table.setup) == {1, 3}
    assert all(0 <= t.q25 <= t.median <= t.q75 and t.repeats == 3 for t in table.steps.values())
    # CFG at one size is one call on twice the batch: it holds more activations than the conditional branch alone
    assert table.peak_bytes[(2, 2, 3)] > table.peak_bytes[(2, None, 3)] > 0
    assert table.peak_bytes[(2, None, 3)] > table.peak_bytes[(4, None, 3)]  # 4x fewer tokens
    assert table.key["model"] == lora_model.fingerprint() and table.key["merge_lora"] is False

    s = Schedule(cond=(4, 4, 2), uncond=(4, 2, 2), guidance_scale=2.0, solver="dpm++", model="x")
    want = (table.setup[3].median + table.steps[(4, 4, 3)].median + table.steps[(4, 2, 3)].median
            + table.steps[(2, 2, 3)].median + 3 * table.solvers[("dpm++", 3)].median)
    assert table.batch_seconds(s, 3) == pytest.approx(want, rel=1e-12)
    no_cfg = s.replace(guidance_scale=1.0)
    assert table.batch_seconds(no_cfg, 1) == pytest.approx(
        table.setup[1].median + 2 * table.steps[(4, None, 1)].median + table.steps[(2, None, 1)].median
        + 3 * table.solvers[("dpm++", 1)].median, rel=1e-12)
    assert table.schedule_peak_bytes(s, 3) == max(table.peak_bytes[k] for k in [(4, 4, 3), (4, 2, 3), (2, 2, 3)])
    with pytest.raises(UserError, match="no entries for .* at batch 64: profile it"):
        table.batch_seconds(s, 64)
    with pytest.raises(UserError, match="with solver ddim"):
        table.batch_seconds(s.replace(solver="ddim"), 3)


def test_cost_table_round_trips_and_refuses_bad_files_in_one_line(table, tmp_path):
    path = tmp_path / "t.json"
    table.save(path)
    assert CostTable.load(path) == table
    good = json.loads(path.read_text())
    bad = {
        "schema": ({**good, "schema": "other"}, "field 'schema' is not 'flexisearch.cost_table'"),
        "version": ({**good, "version": 2}, "field 'version' is 2, expected 1"),
        "key": ({**good, "key": {"model": "x"}}, "field 'key' lacks ['compile', 'device', 'dtype', 'merge_lora', 'torch']"),
        "size": ({**good, "steps": [{**good["steps"][0], "cond": 0}]}, "field 'cond' is 0, expected a positive integer"),
        "time": ({**good, "solvers": [{**good["solvers"][0], "median_s": -1}]}, "field 'solvers' has times"),
        "missing": ({**good, "setup": [{"batch": 1}]}, "missing field 'median_s'"),
        "peak": ({**good, "steps": [{**good["steps"][0], "peak_bytes": 1.5}]}, "field 'peak_bytes' is 1.5"),
        "list": ([], "field 'schema' is not"),
    }
    for name, (doc, message) in bad.items():
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(doc))
        with pytest.raises(UserError) as e:
            CostTable.load(p)
        assert str(e.value).startswith(f"{p}: not a flexisearch cost table (") and message in str(e.value), name
        assert "\n" not in str(e.value)
    (tmp_path / "nan.json").write_text(path.read_text().replace(str(good["steps"][0]["median_s"]), "NaN", 1))
    with pytest.raises(UserError, match="not valid JSON"):
        CostTable.load(tmp_path / "nan.json")


def test_timing_quartiles():
    t = Timing.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median, t.q25, t.q75, t.repeats) == (3.0, 2.0, 4.0, 5)
    assert Timing.of([0.5]) == Timing(0.5, 0.5, 0.5, 1)


# ---- the weak path: derived weights built once, rebuilt when the weights change -------------------------------------

def _weak_out(model, x, t, y):
    with torch.no_grad():
        return model(x, t, y, 4)


def test_cached_weak_weights_follow_every_weight_update():
    model = random_flexidit(size=16, lora_rank=4)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([500.0, 20.0]), torch.tensor([0, 1])
    first = _weak_out(model, x, t, y)
    embed = model.x_embedder
    with torch.no_grad():
        assert embed.weight(4) is embed.weight(4)  # built once while nothing changes
    assert embed.weight(4) is not embed.weight(4)  # never while autograd records (training)
    with torch.no_grad():  # an in-place update, as an optimizer step makes
        model.x_embedder.proj.weight.mul_(1.5)
        model.final_layer.deembed.linear.bias.add_(0.1)
        model.x_embedder.residual["4"].normal_()
    updated = _weak_out(model, x, t, y)
    fresh = copy.deepcopy(model)
    fresh.x_embedder.__dict__.pop("_derived", None)
    fresh.final_layer.deembed.__dict__.pop("_derived", None)
    assert not torch.allclose(updated, first)
    assert torch.equal(updated, _weak_out(fresh, x, t, y))
    model.load_state_dict(random_flexidit(size=16, lora_rank=4, seed=1).state_dict())  # load_state_dict copies in place
    assert torch.equal(_weak_out(model, x, t, y), _weak_out(random_flexidit(size=16, lora_rank=4, seed=1), x, t, y))


def test_training_gradients_reach_the_weights_behind_cached_ones():
    model = random_flexidit(size=16, lora_rank=0)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([500.0, 20.0]), torch.tensor([0, 1])
    _weak_out(model, x, t, y)  # fills the cache
    model(x, t, y, 4).square().mean().backward()
    assert model.x_embedder.proj.weight.grad.abs().sum() > 0 and model.x_embedder.residual["4"].grad.abs().sum() > 0


def test_merged_lora_equals_unmerged_and_follows_lora_updates():
    model = random_flexidit(size=16, lora_rank=4)
    with torch.no_grad():
        for lin in model._lora_linears():
            for b in lin.lora_b.values():
                b.normal_(std=0.05)  # a trained adapter (a fresh one is zero)
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([900.0, 500.0, 20.0]), torch.tensor([0, 1, 2])
    plain = _weak_out(model, x, t, y)
    assert not model.lora_merged
    merged = _weak_out(model.merge_lora(), x, t, y)
    assert model.lora_merged
    torch.testing.assert_close(merged, plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model.blocks[0].attn.qkv.lora_a["4"].mul_(-1)
    after = _weak_out(model, x, t, y)
    assert torch.allclose(after, _weak_out(model.merge_lora(False), x, t, y), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, plain, atol=1e-4)
    native = model.merge_lora()
    with torch.no_grad():
        assert torch.equal(native(x, t, y, 2), model.merge_lora(False)(x, t, y, 2))  # the native path has no LoRA


# ---- a search by latency ------------------------------------------------------------------------------------------

def test_latency_search_minimises_predicted_seconds_from_a_matching_table(tmp_path, monkeypatch):
    from flexisearch.optimize.optuna_backend import run_search

    monkeypatch.chdir(tmp_path)
    model = random_flexidit(size=16)
    model.save_pretrained(tmp_path / "m")
    doc = {"study": "lat", "model": str(tmp_path / "m"), "space": {"type": "branch_threshold", "num_steps": 4},
           "metric": {"name": "fid_native", "max": 1e6}, "reference": {"num_steps": 4, "guidance_scale": 2.0},
           "search_samples": 4, "heldout_samples": 4, "bootstrap": 2, "n_trials": 3, "batch_size": 4,
           "cost": {"type": "latency", "batch_size": 2, "repeats": 2}}
    cfg = load_search_config(None, doc)
    evaluator = Evaluator(cfg)
    pinned = evaluator.pin_costs(cfg)  # measured before any worker could start, and named in the config
    assert Path(pinned.cost.table).is_file() and evaluator.pin_costs(pinned) is pinned
    flops = load_search_config(None, {**doc, "cost": {"type": "flops"}})
    assert evaluator.pin_costs(flops) is flops  # a FLOPs search needs no table
    study = run_search(cfg, evaluator, progress=False)
    table = CostTable.load(tmp_path / "runs" / "lat" / "cost_table.json")
    assert table == evaluator.costs and set(table.setup) == {2}
    ref = table.batch_seconds(evaluator.reference, 2)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3
    for trial in done:
        s = Schedule.from_dict(trial.user_attrs["schedule"])
        assert trial.values[0] == pytest.approx(table.batch_seconds(s, 2) / ref, rel=1e-12)

    # the config the study keeps (worker processes and export read it) names the table: all predict with it
    from flexisearch.optimize.study import stored_config
    stored = stored_config(f"sqlite:///{tmp_path / 'runs' / 'lat' / 'study.db'}", "lat")
    assert stored.cost.table == str((tmp_path / "runs" / "lat" / "cost_table.json").resolve())

    # a new run reads its table back; a given table is used as it is, if it is of this model and covers the space
    monkeypatch.setattr("flexisearch.sampling.latency.profile", lambda *a, **k: pytest.fail("profiled again"))
    assert Evaluator(cfg).costs == table
    elsewhere = CostTable({**table.key, "device": "NVIDIA H200", "dtype": "bfloat16"}, table.steps, table.peak_bytes,
                          table.solvers, table.setup)
    for name, t, message in [("gpu", elsewhere, None),
                             ("other", CostTable({**table.key, "model": "another"}, table.steps, table.peak_bytes,
                                                 table.solvers, table.setup),
                              f"measured for model another, this model is {evaluator.fingerprint}"),
                             ("short", CostTable(table.key, table.steps, table.peak_bytes, table.solvers, {}),
                              re.escape("lacks batch 2 or solvers ['euler']"))]:
        t.save(tmp_path / f"{name}.json")
        given = Evaluator(load_search_config(None, {**doc, "cost": {**doc["cost"], "table": str(tmp_path / f"{name}.json")}}))
        if message is None:
            assert given.costs == elsewhere
        else:
            with pytest.raises(UserError, match=message):
                _ = given.costs


def test_cli_profile_writes_a_table_and_refuses_bad_options(tmp_path, capsys):
    random_flexidit(size=16).save_pretrained(tmp_path / "m")
    out = tmp_path / "costs" / "t.json"
    assert main(["profile", "--model", str(tmp_path / "m"), "--batch", "2", "--repeats", "2", "--out", str(out)]) == 0
    table = CostTable.load(out)
    assert set(table.setup) == {2} and set(table.solvers) == {("euler", 2)}
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"wrote {out}" and len(lines) == 2 + len(table.steps) + 1 + 1
    for argv, message in [(["--dtype", "f8"], "--dtype f8: expected one of ['float32', 'bfloat16', 'float16']"),
                          (["--compile", "fast"], "--compile fast: expected one of"),
                          (["--out", str(tmp_path / "t.txt")], "expected a .json file name")]:
        assert main(["profile", "--model", str(tmp_path / "m"), *argv, "--out", str(tmp_path / "x.json"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def test_a_memory_ceiling_is_a_constraint_that_stops_trials_over_it(tmp_path, monkeypatch):
    """cost.max_memory_mb: each trial carries a "peak_memory" constraint, its predicted peak (the cost table's,
    at cost.batch_size) minus the ceiling; a schedule over it stops at the first fidelity and is never
    exported, even in a FLOPs search (which then measures a cost table too)."""
    from flexisearch.optimize.export import export_study
    from flexisearch.optimize.optuna_backend import run_search
    from flexisearch.optimize.study import trial_records

    monkeypatch.chdir(tmp_path)
    model = random_flexidit(size=16)
    model.save_pretrained(tmp_path / "m")
    doc = {"study": "mem", "model": str(tmp_path / "m"), "space": {"type": "branch_threshold", "num_steps": 4},
           "metric": {"name": "fid_native", "max": 1e6}, "reference": {"num_steps": 4, "guidance_scale": 2.0},
           "search_samples": 8, "fidelities": [4], "heldout_samples": 4, "bootstrap": 2, "n_trials": 8,
           "batch_size": 4, "cost": {"type": "flops", "batch_size": 2, "repeats": 2, "max_memory_mb": 1e6}}
    probe = Evaluator(load_search_config(None, doc))
    assert Path(probe.pin_costs(probe.cfg).cost.table).is_file()
    weak = Schedule.static(4, 4, guidance_scale=2.0, solver="euler", model=probe.fingerprint)
    low, high = (probe.latency(s)["peak_bytes"] / 2**20 for s in (weak, probe.reference))
    assert low < high  # four times fewer tokens
    ceiling = (low + high) / 2
    cfg = load_search_config(None, {**doc, "cost": {**doc["cost"], "max_memory_mb": ceiling}})
    evaluator = Evaluator(cfg, model=probe.model)
    study = run_search(cfg, evaluator, progress=False)
    over = 0
    for r, t in zip(trial_records(study), study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))):
        peak = evaluator.latency(r["schedule"])["peak_bytes"] / 2**20
        assert t.constraints["peak_memory"] == pytest.approx(peak - ceiling, rel=1e-12)
        assert (r["stopped"] == "peak_memory") == (peak > ceiling)  # under it: only the cost rule may stop it
        assert r["feasible"] == (not r["stopped"])  # fid_native <= 1e6: every other bound is met
        over += peak > ceiling
    assert 0 < over < 8  # static native (the first trial) is over it, static weak (the second) under
    best = export_study(cfg, evaluator, study)
    assert best["cost"]["latency"]["peak_bytes"] / 2**20 <= ceiling and best["constraint"]["max_memory_mb"] == ceiling
