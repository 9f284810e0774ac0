"""Behaviour tests: what a user sees of the relative quality bound, the trajectory cache, the text models'
prompt sets, schedule checks and the README's CLI commands (export, show, sample, flops).

Each test checks an outcome against an expectation computed independently of the code path under test."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from conftest import random_flexidit

from flexisearch.cli import main
from flexisearch.errors import UserError
from flexisearch.models import flops
from flexisearch.optimize.config import load_search_config
from flexisearch.optimize.evaluate import Evaluator
from flexisearch.sampling.generate import TrajectoryCache, sample
from flexisearch.sampling.schedule import Schedule

STEPS, GUIDANCE = 4, 2.0


def independent_fraction(config, schedule: Schedule) -> float:
    """MACs of a schedule over MACs of static native at the same step count, from per-forward MACs only."""
    per = {p: flops.forward_macs(config, p) for p in config.patch_sizes}
    branches = [schedule.cond, schedule.uncond] if schedule.guidance_scale != 1.0 else [schedule.cond]
    macs = sum(per[p] for b in branches for p in b)
    return macs / (len(branches) * schedule.num_steps * per[config.patch_size])


def native_schedule(native: int, fingerprint: str) -> Schedule:
    return Schedule(cond=(native,) * STEPS, uncond=(native,) * STEPS, guidance_scale=GUIDANCE, solver="euler",
                    model=fingerprint)


# ---- one small FID search, shared by the bound test and the CLI tests ------------------------------------

@pytest.fixture(scope="module")
def fid_run(tmp_path_factory):
    """A 3-trial search of a random 16x16 1-channel model (the embedded FID reference fits it) with
    metric fid, relative 0.05, exported to runs/t/ under a temporary directory."""
    from flexisearch.optimize.export import export_study
    from flexisearch.optimize.optuna_backend import run_search

    root = tmp_path_factory.mktemp("fidrun")
    model = random_flexidit(size=16)
    model.save_pretrained(root / "model")
    doc = {"study": "t", "model": str(root / "model"), "space": {"type": "branch_threshold", "num_steps": STEPS},
           "metric": {"name": "fid", "relative": 0.05}, "reference": {"num_steps": STEPS, "guidance_scale": GUIDANCE},
           "search_samples": 8, "heldout_samples": 8, "bootstrap": 5, "n_trials": 3, "batch_size": 32,
           "pareto_max": 3, "cost": {"repeats": 1}}
    (root / "space.yaml").write_text(yaml.safe_dump(doc))
    error = None
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        cfg = load_search_config(root / "space.yaml")
        evaluator = Evaluator(cfg)
        study = run_search(cfg, evaluator, progress=False)
        try:
            export_study(cfg, evaluator, study)
        except UserError as e:  # reported by the tests that need the export
            error = str(e)
    return root, model, error


@pytest.fixture
def exported(fid_run):
    root, model, error = fid_run
    assert error is None, f"export of a search whose first trial is static native failed: {error}"
    return root, model


def load_doc(path: Path) -> dict:
    return json.loads(path.read_text())


# ---- 1. the relative bound: above the reference for FID, below it for CLIP ----------------------------------

def test_relative_fid_bound_is_above_the_reference_and_static_native_is_feasible(fid_run):
    root, model, error = fid_run
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{root / 'runs' / 't' / 'study.db'}")
    # The first trial is the paper's k = 0: static native, scored on the same seeds as the reference.
    first = study.trials[0]
    assert Schedule.from_dict(first.user_attrs["schedule"]) == native_schedule(2, model.fingerprint())
    assert first.user_attrs["quality"] > 0
    assert all(v <= 0 for v in first.constraints.values()), "static native misses a bound relative to itself"
    assert error is None
    best = load_doc(root / "runs" / "t" / "best.json")
    c = best["constraint"]
    assert c["metric"] == "fid" and c["relative"] == 0.05
    assert c["bound"] == pytest.approx(c["search_reference_quality"] * 1.05, rel=1e-12)
    assert c["bound"] > c["search_reference_quality"] > 0
    assert best["quality"]["search"] <= c["bound"]
    assert first.user_attrs["quality"] == c["search_reference_quality"]


@pytest.fixture(scope="module")
def embedded_text(tmp_path_factory):
    """The shipped text-to-image model with the shipped CLIP, metric clip relative 0.1, a one-trial search."""
    root = tmp_path_factory.mktemp("text")
    doc = {"study": "tx", "model": "embedded:text/flexidit-mnist16",
           "space": {"type": "threshold", "num_steps": STEPS, "guidance_scale": GUIDANCE},
           "metric": {"name": "clip", "relative": 0.1}, "reference": {"num_steps": STEPS, "guidance_scale": GUIDANCE},
           "search_samples": 6, "heldout_samples": 6, "bootstrap": 5, "n_trials": 1, "batch_size": 6,
           "cost": {"repeats": 1}}
    (root / "space.yaml").write_text(yaml.safe_dump(doc))
    cfg = load_search_config(root / "space.yaml")
    return root, cfg, Evaluator(cfg)


def test_relative_clip_bound_is_below_the_reference_and_static_native_is_best(embedded_text, monkeypatch):
    from flexisearch.optimize.export import export_study
    from flexisearch.optimize.optuna_backend import run_search

    root, cfg, evaluator = embedded_text
    monkeypatch.chdir(root)
    study = run_search(cfg, evaluator, progress=False)  # one trial: the paper's k = 0, static native
    best = export_study(cfg, evaluator, study)
    assert best == load_doc(root / "runs" / "tx" / "best.json")
    c = best["constraint"]
    assert c["search_reference_quality"] > 0
    assert c["bound"] == pytest.approx(c["search_reference_quality"] * 0.9, rel=1e-12)
    s = Schedule.from_dict(best["schedule"])
    assert s.cond == s.uncond == (evaluator.native,) * STEPS and best["cost"]["fraction_of_static_native"] == 1.0


# ---- 2. the trajectory cache never mixes schedules that differ in guidance or solver ---------------------------

@pytest.mark.parametrize("prediction,first,second", [
    ("flow", {"guidance_scale": 2.0}, {"guidance_scale": 4.0}),
    ("flow", {"guidance_mode": "cfg"}, {"guidance_mode": "weak_guidance"}),
    ("flow", {"solver": "euler"}, {"solver": "dpm++"}),
    ("epsilon", {"solver": "ddim"}, {"solver": "ddpm"}),
])
def test_shared_cache_gives_the_uncached_images(prediction, first, second):
    m = random_flexidit(prediction)
    # cond native throughout, uncond weak for the first two steps: weak guidance differs from CFG there
    solver = "euler" if prediction == "flow" else "ddim"
    base = Schedule.branch_split(0, 2, STEPS, 4, 2, guidance_scale=3.0, solver=solver, model=m.fingerprint())
    a, b = base.replace(**first), base.replace(**second)
    labels, seeds = [0, 1, 2], [5, 6, 7]
    cache = TrajectoryCache()
    got_a = sample(m, a, labels, seeds, cache=cache, cache_tag="search")
    got_b = sample(m, b, labels, seeds, cache=cache, cache_tag="search")
    want_b = sample(m, b, labels, seeds)
    assert not torch.allclose(got_a, want_b, atol=1e-4)  # the two schedules do make different images
    assert torch.equal(got_b, want_b)
    assert torch.equal(got_a, sample(m, a, labels, seeds))


# ---- 3. text models: search and held-out prompts are different rows and different captions ----------------------

def _tiny_text_dir(path: Path) -> None:
    from flexisearch.models.text_dit import FlexiTextDiT, FlexiTextDiTConfig

    torch.manual_seed(0)
    rows = 6
    cfg = FlexiTextDiTConfig(input_size=16, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=rows,
                             num_search_prompts=4, learn_sigma=False, prediction="flow", caption_channels=8,
                             text_len=4, text_encoder="test")
    m = FlexiTextDiT(cfg, [f"caption {i}" for i in range(rows)] + [""])
    with torch.no_grad():
        m.prompt_embeds.normal_()
        m.prompt_mask.fill_(1.0)
    m.with_patch_sizes((4,), init_std=0.05).eval().save_pretrained(path)


def _check_disjoint(evaluator: Evaluator, n_search: int, n_heldout: int) -> None:
    search, held = evaluator.search_set, evaluator.heldout_set
    assert len(search.labels) == n_search and len(held.labels) == n_heldout
    assert not set(search.labels) & set(held.labels)
    captions = evaluator.model.captions
    search_caps = {captions[y] for y in search.labels}
    held_caps = {captions[y] for y in held.labels}
    assert "" not in search_caps | held_caps and not search_caps & held_caps
    assert not set(search.seeds) & set(held.seeds)


def test_embedded_text_objective_has_disjoint_prompt_sets(embedded_text):
    _, cfg, evaluator = embedded_text
    _check_disjoint(evaluator, cfg.search_samples, cfg.heldout_samples)


def test_saved_text_model_objective_has_disjoint_prompt_sets(tmp_path):
    _tiny_text_dir(tmp_path / "m")
    cfg = load_search_config(None, {"model": str(tmp_path / "m"), "metric": {"name": "fid", "relative": 0.05},
                                    "search_samples": 7, "heldout_samples": 5,
                                    "space": {"num_steps": STEPS}, "reference": {"num_steps": STEPS}})
    evaluator = Evaluator(cfg)
    _check_disjoint(evaluator, 7, 5)
    assert set(evaluator.search_set.labels) == {0, 1, 2, 3} and set(evaluator.heldout_set.labels) == {4, 5}


# ---- 4. schedules whose unconditional branch the model cannot run --------------------------------------------

BAD_UNCOND = {"cond": (2,) * 3, "uncond": (8, 2, 2), "guidance_scale": 2.0, "solver": "euler", "model": "another-model"}


def test_uncond_patch_size_the_model_lacks_is_refused():
    m = random_flexidit()
    with pytest.raises(UserError, match=r"'uncond'.*patch size 8"):
        Schedule(**BAD_UNCOND).check_model(m.config, None)
    with pytest.raises(UserError, match=r"'uncond'.*patch size 8"):
        Schedule(**BAD_UNCOND).replace(model=m.fingerprint()).check_model(m.config, m.fingerprint())


def test_cli_sample_refuses_uncond_patch_size_the_model_lacks(tmp_path, capsys):
    random_flexidit().save_pretrained(tmp_path / "m")
    Schedule(**BAD_UNCOND).save(tmp_path / "bad.json")
    argv = ["sample", "--schedule", str(tmp_path / "bad.json"), "--model", str(tmp_path / "m"), "--any-model",
            "--n", "2", "--out", str(tmp_path / "x.png"), "--quiet"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "uncond" in err and "patch size 8" in err and "\n" not in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("size", [0, -2])
def test_schedule_file_with_nonpositive_uncond_size_is_refused(tmp_path, size):
    d = Schedule.static(2, 3, guidance_scale=2.0, solver="euler", model="abc").to_dict()
    d["uncond"] = [2, size, 2]
    p = tmp_path / "s.json"
    p.write_text(json.dumps(d))
    with pytest.raises(UserError) as e:
        Schedule.load(p)
    assert "field 'uncond/1'" in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


# ---- 6. the README's CLI commands ---------------------------------------------------------------------------

def test_cli_export_rewrites_best_with_the_same_schedule(exported, monkeypatch, capsys):
    root, _ = exported
    monkeypatch.chdir(root)
    out = root / "runs" / "t"
    before = load_doc(out / "best.json")
    pareto_before = load_doc(out / "pareto.json")
    stamps = {name: (out / name).stat().st_mtime_ns for name in ("best.json", "pareto.json")}
    # --study picks the study, whatever the space file calls it; what the study was searched with is its own
    other = yaml.safe_load((root / "space.yaml").read_text())
    (root / "other.yaml").write_text(yaml.safe_dump({**other, "study": "not-searched", "sampler": "random",
                                                     "heldout_samples": other["heldout_samples"] + 5}))
    assert main(["export", "--space", str(root / "other.yaml"), "--study", "not-searched"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "flexisearch: error: study 'not-searched': not found in sqlite:///runs/not-searched/study.db "
        "(run `flexisearch search` first)"]
    assert not (root / "runs" / "not-searched").exists()
    assert main(["export", "--space", str(root / "other.yaml"), "--study", "t", "--quiet"]) == 0
    assert all((out / name).stat().st_mtime_ns > t for name, t in stamps.items())  # both files written again
    after = load_doc(out / "best.json")
    assert after["schedule"] == before["schedule"] and after["trial"] == before["trial"]
    assert after["cost"] == before["cost"] and after["quality"] == before["quality"]
    assert after["provenance"]["sampler"] == before["provenance"]["sampler"] == "tpe"
    assert [p["schedule"] for p in load_doc(out / "pareto.json")["points"]] == \
        [p["schedule"] for p in pareto_before["points"]]
    stdout = capsys.readouterr().out
    assert f"best.json: {Path('runs') / 't' / 'best.json'}" in stdout


def test_cli_show_best_and_pareto(exported, monkeypatch, capsys):
    root, model = exported
    monkeypatch.chdir(root)
    best = load_doc(root / "runs" / "t" / "best.json")
    s = Schedule.from_dict(best["schedule"])
    assert main(["show", "runs/t/best.json"]) == 0
    out = capsys.readouterr().out
    assert s.describe() in out
    fraction = independent_fraction(model.config, s)
    assert re.search(rf"FLOPs\s+{fraction:.3f} of static native, \d+ steps, CFG [0-9.]+ ", out), out
    assert f"saving {100 * (1 - fraction):.1f}%" in out
    lat = best["cost"]["latency"]
    assert re.search(rf"latency \(predicted\) +{1e3 * lat['seconds_per_image']:.3g} ms per image at batch 32 "
                     rf"\({lat['fraction_of_static_native']:.3f} of static native\)", out), out

    pareto = load_doc(root / "runs" / "t" / "pareto.json")
    assert main(["show", "runs/t/pareto.json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(pareto["points"]) >= 1 and len(lines) == 1 + len(pareto["points"])  # a header, then one row a point
    for line, p in zip(lines[1:], pareto["points"]):
        ps = Schedule.from_dict(p["schedule"])
        assert line.strip().startswith(f"{independent_fraction(model.config, ps):.3f}") and ps.describe() in line
        assert line.split()[2] == f"{p['cost']['latency']['fraction_of_static_native']:.3f}"


def test_cli_sample_writes_the_grid(exported, monkeypatch, capsys):
    from PIL import Image

    root, model = exported
    monkeypatch.chdir(root)
    assert main(["sample", "--schedule", "runs/t/best.json", "--model", str(root / "model"), "--n", "3",
                 "--label", "2", "0", "--out", "x.png", "--quiet"]) == 0
    assert "wrote x.png (2 rows of 3: classes 2, 0)" in capsys.readouterr().out
    img = Image.open(root / "x.png")
    side, k = model.config.input_size, 64 // model.config.input_size  # 16 px samples shown 4x larger
    assert img.size == (3 * (k * side + 1) + 1, 2 * (k * side + 1) + 1)  # (width, height): 3 columns, 2 rows
    pix = torch.from_numpy(np.array(img)).float()
    # row r holds class r of --label, tile i the sample of seed i, quantised to 8 bits, each pixel a k x k block
    s = Schedule.load(root / "runs" / "t" / "best.json")
    want = sample(model, s, [2, 2, 2, 0, 0, 0], list(range(6)))
    want = ((want.clamp(-1, 1) + 1) * 127.5).round()
    for i in range(6):
        r, q = divmod(i, 3)
        y, x = 1 + r * (k * side + 1), 1 + q * (k * side + 1)
        tile = pix[y: y + k * side, x: x + k * side]
        assert (tile - want[i, 0].repeat_interleave(k, 0).repeat_interleave(k, 1)).abs().max() <= 1
    assert pix[0].max() == 0 and pix[:, 0].max() == 0  # the border


def test_cli_flops_of_a_schedule_and_of_the_dit_preset(exported, monkeypatch, capsys):
    root, model = exported
    monkeypatch.chdir(root)
    s = Schedule.load(root / "runs" / "t" / "best.json")
    assert main(["flops", "--model", str(root / "model"), "--schedule", "runs/t/best.json"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"([0-9.]+) vs static native, (\d+) steps, CFG ", out)
    assert m, out
    assert int(m.group(2)) == s.num_steps
    assert float(m.group(1)) == pytest.approx(independent_fraction(model.config, s), abs=5e-4)
    assert (float(m.group(1)) < 1.0) == (4 in s.cond + s.uncond)  # weak steps are cheaper than native ones

    assert main(["flops", "--preset", "DiT-XL/2"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "118.6 G" in rows["2"]


# ---- 7. the trial evaluation: refuses what cannot run, uses the model it is given, no extra work --------------

def _cfg(model: str, **over) -> object:
    doc = {"model": model, "metric": {"name": "fid", "relative": 0.05}, "search_samples": 8, "heldout_samples": 8,
           "bootstrap": 5, "space": {"type": "branch_threshold", "num_steps": STEPS},
           "reference": {"num_steps": STEPS, "guidance_scale": GUIDANCE}}
    for key, value in over.items():
        doc[key] = {**doc[key], **value} if key in ("space", "reference") else value
    return load_search_config(None, doc)


def test_evaluator_refuses_what_it_cannot_search_before_any_work(tmp_path, monkeypatch):
    random_flexidit(size=16, extra=()).save_pretrained(tmp_path / "plain")
    random_flexidit(size=16).save_pretrained(tmp_path / "m")
    m = str(tmp_path / "m")
    with pytest.raises(UserError, match=r"has no weak patch size: flexify it first"):
        Evaluator(_cfg(str(tmp_path / "plain")))
    with pytest.raises(UserError, match=r"^space.weak_patch_size is 8, the model has \[4\]$"):
        Evaluator(_cfg(m, space={"weak_patch_size": 8}))
    with pytest.raises(UserError, match=r"^reference: field 'solver' is 'ddim', expected one of \['euler', 'dpm\+\+'\] "
                                        r"for a flow model$"):
        Evaluator(_cfg(m, reference={"solver": "ddim"}))
    with pytest.raises(UserError, match=r"^space.solver: 'ddpm' does not suit a flow model, expected one of "):
        Evaluator(_cfg(m, space={"solver": ["euler", "ddpm"]}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        Evaluator(_cfg(m), device="cuda")


def test_evaluator_uses_the_model_it_is_given(tmp_path):
    model = random_flexidit(size=16)
    evaluator = Evaluator(_cfg(str(tmp_path / "never-loaded")), model=model)
    assert evaluator.model is model and evaluator.fingerprint == model.fingerprint()
    assert evaluator.device == torch.device("cpu")


def _count_forwards(model) -> list[int]:
    calls = [0]
    forward = model.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    model.forward = counted
    return calls


@pytest.mark.parametrize("metric,native_runs", [({"name": "fid", "relative": 0.05}, 0),
                                                ({"name": "fid_native", "max": 5.0}, 1)])
def test_quality_and_confirmation_sample_only_what_the_metric_needs(metric, native_runs, capsys, tmp_path, monkeypatch):
    """FID has fixed statistics: scoring a schedule samples it alone; fid_native also samples static native,
    once per sample set. Confirmation samples static native on the held-out set once for both (the paired
    difference; export confirms static native anyway). Counted model calls against the same sampling done
    directly."""
    monkeypatch.chdir(tmp_path)  # static native's samples are kept in the run folder (reference_samples)
    model = random_flexidit(size=16)
    cfg = _cfg("unused", metric=metric)
    evaluator = Evaluator(cfg, model=model)
    s = Schedule.weak_first(2, 4, STEPS, 2, guidance_scale=GUIDANCE, solver="euler", model=evaluator.fingerprint)
    t = s.replace(guidance_scale=3.0)
    direct = _count_forwards(model)
    for sample_set in (evaluator.search_set, evaluator.heldout_set):
        sample(model, s, list(sample_set.labels), list(sample_set.seeds), batch_size=cfg.batch_size)
    per_schedule = direct[0] // 2
    native = per_schedule  # static native: same steps and branches, same batches
    direct[0] = 0
    evaluator.quality(s)
    evaluator.quality(s)  # memoised
    evaluator.confirm(t)
    evaluator.confirm(s)
    assert direct[0] == 3 * per_schedule + (1 + native_runs) * native
    assert capsys.readouterr() == ("", "")  # quiet unless asked
    evaluator.confirm(s, progress=True)
    assert "sampling" in capsys.readouterr().err


def test_export_shows_progress_only_when_asked(exported, monkeypatch, capsys):
    from flexisearch.optimize.export import export_study
    from flexisearch.optimize.study import open_study

    root, _ = exported
    monkeypatch.chdir(root)
    cfg = load_search_config(root / "space.yaml")
    evaluator = Evaluator(cfg)
    study = open_study(cfg, evaluator)
    capsys.readouterr()
    export_study(cfg, evaluator, study)
    assert capsys.readouterr() == ("", "")
    export_study(cfg, evaluator, study, progress=True)
    assert capsys.readouterr().err.count("sampling") >= 2  # the best / Pareto points and static native


def test_clip_export_keeps_the_best_front_and_absolute_bound_of_a_higher_is_better_metric(tmp_path, monkeypatch):
    """CLIP score: higher is better. An absolute lower bound is reported as such, the Pareto front is the
    brute-force front of the trials (more quality for more cost), and a bound nobody meets names '>='."""
    from flexisearch.optimize.export import export_study
    from flexisearch.optimize.optuna_backend import run_search

    monkeypatch.chdir(tmp_path)
    base = {"model": "embedded:text/flexidit-mnist16", "space": {"type": "threshold", "num_steps": STEPS,
            "guidance_scale": GUIDANCE}, "reference": {"num_steps": STEPS, "guidance_scale": GUIDANCE},
            "search_samples": 6, "heldout_samples": 6, "bootstrap": 5, "batch_size": 6, "sampler": "random"}
    cfg = load_search_config(None, {**base, "study": "low", "n_trials": 4, "metric": {"name": "clip", "min": 0.0}})
    evaluator = Evaluator(cfg)
    study = run_search(cfg, evaluator, progress=False)
    best = export_study(cfg, evaluator, study)
    assert best["constraint"]["absolute"] == 0.0 and best["constraint"]["bound"] == 0.0  # CLIP scores are >= 0
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    point = {t.number: (t.values[0], -t.user_attrs["quality"]) for t in trials}  # (cost, loss)
    front = [n for n, (c, q) in point.items()  # nothing dominates it; of equal points, the first trial
             if not any(d != n and d_c <= c and d_q <= q and ((d_c, d_q) != (c, q) or d < n)
                        for d, (d_c, d_q) in point.items())]
    assert len(front) >= 2
    pareto = load_doc(tmp_path / "runs" / "low" / "pareto.json")
    assert sorted(p["trial"] for p in pareto["points"]) == sorted(front)
    cheapest = min(t.values[0] for t in trials)
    assert best["trial"] == max((t for t in trials if t.values[0] == cheapest),
                                key=lambda t: t.user_attrs["quality"]).number

    high = load_search_config(None, {**base, "study": "high", "n_trials": 1, "metric": {"name": "clip", "min": 1e9}})
    evaluator = Evaluator(high)
    study = run_search(high, evaluator, progress=False)
    with pytest.raises(UserError) as e:
        export_study(high, evaluator, study)
    q = study.trials[0].user_attrs["quality"]
    assert str(e.value) == f"constraint clip >= 1e+09: no schedule met it in 1 trials (best clip: {q:.4g})"
