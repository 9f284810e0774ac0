import json

import pytest

from flexisearch.errors import UserError
from flexisearch.sampling.schedule import Schedule

KW = dict(guidance_scale=2.0, solver="euler", model="abc123")


def test_constructors():
    s = Schedule.weak_first(3, 5, 4, 2, **KW)
    assert s.cond == (4, 4, 4, 2, 2) and s.uncond == s.cond
    b = Schedule.branch_split(1, 4, 5, 4, 2, **KW)
    assert b.cond == (4, 2, 2, 2, 2) and b.uncond == (4, 4, 4, 4, 2)
    assert Schedule.static(2, 3, **KW).cond == (2, 2, 2)
    assert b.describe() == "cond 4x1 2x4 | uncond 4x4 2x1"
    with pytest.raises(UserError, match="k_uncond=6"):
        Schedule.branch_split(1, 6, 5, 4, 2, **KW)


def test_json_roundtrip(tmp_path):
    s = Schedule.branch_split(2, 3, 6, 4, 2, guidance_scale=3.5, solver="dpm++", model="f00", guidance_mode="weak_guidance")
    s.save(tmp_path / "s.json")
    assert Schedule.load(tmp_path / "s.json") == s
    # an exported best.json is accepted too
    (tmp_path / "best.json").write_text(json.dumps({"schedule": s.to_dict(), "cost": {}}))
    assert Schedule.load(tmp_path / "best.json") == s


def _bad(tmp_path, text):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(UserError) as e:
        Schedule.load(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
    return msg


@pytest.mark.parametrize("change,expect", [
    ({"version": 7}, "unknown schema version 7"),
    ({"cond": [2, 2]}, "'cond' has 2 entries, expected num_steps=3"),
    ({"uncond": [2, 2, 2, 2]}, "'uncond' has 4 entries"),
    ({"solver": "heun"}, "field 'solver'"),
    ({"num_steps": -1}, "field 'num_steps'"),
    ({"num_steps": 2.5}, "field 'num_steps'"),
    ({"cond": [2, -4, 2]}, "field 'cond/1'"),
    ({"cond": [2, 2.5, 2]}, "field 'cond/1'"),
    ({"guidance_scale": -1}, "field 'guidance_scale'"),
    ({"guidance_mode": "magic"}, "field 'guidance_mode'"),
    ({"extra": 1}, "'extra' was unexpected"),
    ({"model": ""}, "field 'model'"),
])
def test_bad_fields(tmp_path, change, expect):
    d = Schedule.static(2, 3, **KW).to_dict()
    d.update(change)
    assert expect in _bad(tmp_path, json.dumps(d))


def test_missing_field_and_not_json(tmp_path):
    d = Schedule.static(2, 3, **KW).to_dict()
    del d["solver"]
    assert "'solver' is a required property" in _bad(tmp_path, json.dumps(d))
    assert "not valid JSON" in _bad(tmp_path, "{nope")
    with pytest.raises(UserError, match="not found"):
        Schedule.load(tmp_path / "missing.json")


def test_check_model(tiny_model):
    fp = tiny_model.fingerprint()
    ok = Schedule.weak_first(2, 4, 4, 2, guidance_scale=2.0, solver="euler", model=fp)
    ok.check_model(tiny_model.config, fp)
    with pytest.raises(UserError, match="made for another model"):
        ok.replace(model="someone-else").check_model(tiny_model.config, fp)
    with pytest.raises(UserError, match="patch size 8"):
        Schedule.weak_first(2, 4, 8, 2, guidance_scale=2.0, solver="euler", model=fp).check_model(tiny_model.config, fp)
    with pytest.raises(UserError, match="'ddpm'.*flow model"):
        ok.replace(solver="ddpm").check_model(tiny_model.config, fp)


def _message(fn, *args, **kw) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kw)
    return str(e.value)


def test_invalid_schedule_built_in_code_names_schedule_as_source():
    msg = _message(Schedule, cond=(2, 2), uncond=(2,), **KW)
    assert msg == "schedule: field 'uncond' has 1 entries, expected num_steps=2"
    assert _message(Schedule, cond=(2,), uncond=(2,), guidance_scale=2.0, solver="heun",
                    model="abc123").startswith("schedule: field 'solver': ")


def test_branch_split_names_the_conditional_k():
    assert _message(Schedule.branch_split, 7, 1, 5, 4, 2, **KW) == "schedule: k_cond=7 must be within 0..5"
    assert _message(Schedule.branch_split, -1, 1, 5, 4, 2, **KW) == "schedule: k_cond=-1 must be within 0..5"


def test_check_model_default_source_and_full_message():
    from flexisearch.models.dit import FlexiDiTConfig

    cfg = FlexiDiTConfig(input_size=8, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=3,
                         learn_sigma=False, prediction="flow", extra_patch_sizes=(4,))
    s = Schedule.static(2, 2, guidance_scale=2.0, solver="euler", model="someone-else")
    assert _message(s.check_model, cfg, "fp1") == (
        "schedule: field 'model' is 'someone-else', but the model's fingerprint is 'fp1' "
        "(schedule made for another model)")
    assert _message(s.check_model, cfg, "fp1", source="run.json").startswith("run.json: field 'model'")
    s.check_model(cfg, None)  # no fingerprint to compare: only sizes and solver are checked


def test_from_dict_default_source_and_top_level_errors():
    d = Schedule.static(2, 3, **KW).to_dict()
    del d["solver"]
    assert _message(Schedule.from_dict, d) == "schedule: field '(top level)': 'solver' is a required property"
    assert _message(Schedule.from_dict, [2, 2]).startswith("schedule: field '(top level)': ")
    assert _message(Schedule.from_dict, d, "x.json").startswith("x.json: field '(top level)'")


@pytest.mark.parametrize("bad", [True, False, 0, -2, 2.5, "3", None])
def test_resample_rejects_non_positive_integers(bad):
    s = Schedule.weak_first(2, 6, 4, 2, **KW)
    assert _message(s.resample, bad) == f"schedule: cannot resample to {bad!r} steps, expected an integer >= 1"


def test_resample_keeps_weak_share_per_phase():
    # weak (4) on the first third of the trajectory, native (2) after: every resampling keeps the weak
    # steps at the start, as many as the first third holds (rounded to whole steps).
    s = Schedule.branch_split(2, 4, 6, 4, 2, **KW)
    r = s.resample(3)
    assert r.cond == (4, 2, 2)  # 1/3 of 3 steps
    assert r.uncond == (4, 4, 2)  # 2/3 of 3 steps
    assert (r.guidance_scale, r.solver, r.model) == (2.0, "euler", "abc123")
    r12 = s.resample(12)
    assert r12.cond == (4,) * 4 + (2,) * 8 and r12.uncond == (4,) * 8 + (2,) * 4
    assert s.resample(6) == s
    # alternating sizes stay alternating (no aliasing), a single step takes the size covering more of the run
    alt = Schedule(cond=(4, 2, 4, 2), uncond=(4, 2, 4, 2), **KW)
    assert alt.resample(8).cond == (4, 4, 2, 2, 4, 4, 2, 2)
    assert Schedule.weak_first(4, 6, 4, 2, **KW).resample(1).cond == (4,)


def test_branch_split_accepts_every_step_weak_and_refuses_more():
    s = Schedule.branch_split(4, 4, 4, 4, 2, guidance_scale=2.0, solver="euler", model="m")
    assert s.cond == s.uncond == (4, 4, 4, 4)
    with pytest.raises(UserError, match="k_uncond=5 must be within 0..4"):
        Schedule.branch_split(0, 5, 4, 4, 2, guidance_scale=2.0, solver="euler", model="m")


def test_load_picks_a_pareto_point_only_by_a_valid_index(tmp_path):
    """best.json and plain schedule files give their one schedule; a pareto.json needs --point N with
    0 <= N < number of points (no negative indices), and --point on a one-schedule file is refused."""
    first = Schedule.weak_first(2, 4, 4, 2, **KW)
    second = Schedule.weak_first(1, 4, 4, 2, **KW)
    pareto = tmp_path / "pareto.json"
    pareto.write_text(json.dumps({"points": [{"schedule": first.to_dict()}, {"schedule": second.to_dict()}]}))
    assert Schedule.load(pareto, 0) == first and Schedule.load(pareto, 1) == second
    expect = f"{pareto}: a Pareto front of 2 points: pick one with --point N, N from 0 to 1"
    for point in (None, -1, 2):
        assert _message(Schedule.load, pareto, point) == expect
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"points": [first.to_dict(), "not a point"]}))
    assert _message(Schedule.load, broken, 1) == f"{broken}: a Pareto front of 2 points: pick one with --point N, N from 0 to 1"
    single = tmp_path / "best.json"
    single.write_text(json.dumps({"schedule": first.to_dict(), "trial": 3}))
    assert Schedule.load(single) == first
    assert _message(Schedule.load, single, 0) == (f"{single}: --point 0 picks a point of a pareto.json; "
                                                  "this file has one schedule")
    assert _message(Schedule.load, tmp_path / "missing.json") == f"{tmp_path / 'missing.json'}: schedule file not found"


def test_guidance_scale_up_to_the_maximum_is_accepted_and_nan_is_refused_by_name():
    d = Schedule.static(2, 3, **KW).to_dict()
    assert Schedule.from_dict({**d, "guidance_scale": 100.0}).guidance_scale == 100.0  # the bound itself is allowed
    assert _message(Schedule.from_dict, {**d, "guidance_scale": float("nan")}, "s.json") == \
        "s.json: field 'guidance_scale': nan is not a number in [0, 100.0]"


# ---- timestep spacing (version 2) -------------------------------------------------------------
def test_a_schedule_without_timestep_spacing_is_written_as_before_and_one_with_it_as_version_2(tmp_path):
    s = Schedule.static(2, 2, guidance_scale=2.0, solver="ddpm", model="m")
    assert s.timestep_spacing is None and s.to_dict() == {
        "schema": "flexisearch.schedule", "version": 1, "num_steps": 2, "cond": [2, 2], "uncond": [2, 2],
        "guidance_scale": 2.0, "guidance_mode": "cfg", "solver": "ddpm", "model": "m"}
    spaced = s.replace(timestep_spacing="linspace")
    assert spaced.to_dict() == {**s.to_dict(), "version": 2, "timestep_spacing": "linspace"}
    spaced.save(tmp_path / "s.json")
    assert Schedule.load(tmp_path / "s.json") == spaced != s
    assert spaced.resample(4).timestep_spacing == "linspace"
    assert Schedule.from_dict({**s.to_dict(), "version": 2}) == s  # version 2 without the field: the default spacing


V2 = {"version": 2}
ONLY_LEADING = "(diffusers' DDIMScheduler steps by a fixed stride, exact for 'leading' only)"


@pytest.mark.parametrize("change,expect", [
    ({"timestep_spacing": "linspace"}, "Additional properties are not allowed ('timestep_spacing' was unexpected)"),
    ({**V2, "timestep_spacing": "every"}, "field 'timestep_spacing': 'every' is not one of ['leading', 'linspace'"),
    ({**V2, "timestep_spacing": "linspace", "solver": "euler"}, "expected none for solver 'euler' (only ddpm and ddim"),
    ({**V2, "timestep_spacing": "trailing", "solver": "dpm++"}, "'timestep_spacing' is 'trailing', expected none"),
    ({**V2, "timestep_spacing": "linspace", "solver": "ddim"}, f"one of ['leading'] for solver 'ddim' {ONLY_LEADING}"),
    ({"version": 4}, "unknown schema version 4, expected 1 or 2 or 3"),
])
def test_bad_timestep_spacing(tmp_path, change, expect):
    d = {**Schedule.static(2, 3, guidance_scale=2.0, solver="ddpm", model="m").to_dict(), **change}
    assert expect in _bad(tmp_path, json.dumps(d))


def test_v_prediction_models_take_the_ddpm_family_of_solvers():
    from flexisearch.models.dit import FlexiDiTConfig

    cfg = FlexiDiTConfig(input_size=8, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=3,
                         learn_sigma=False, prediction="v_prediction", extra_patch_sizes=(4,))
    cfg.check()
    for solver in ("ddpm", "ddim", "dpm++"):
        Schedule.static(2, 2, guidance_scale=2.0, solver=solver, model="m").check_model(cfg, None)
    assert _message(Schedule.static(2, 2, **KW).check_model, cfg, None) == (
        "schedule: field 'solver' is 'euler', expected one of ['ddpm', 'ddim', 'dpm++'] for a v_prediction model")
    assert _message(FlexiDiTConfig(prediction="x").check) == (
        "config: field 'prediction' is 'x', expected 'epsilon', 'v_prediction' or 'flow'")


def test_a_search_config_gives_its_timestep_spacing_to_every_schedule(tmp_path):
    """space.timestep_spacing is one value for the whole space, checked with each of its solvers; the reference
    takes its own. The shipped DiT-XL/2 config samples as DiT does (linspace)."""
    import optuna

    from flexisearch.optimize.config import (
        SPACES_DIR,
        config_dict,
        config_from_dict,
        load_search_config,
        reference_schedule,
    )
    from flexisearch.optimize.spaces import make_space

    cfg = load_search_config(SPACES_DIR / "dit-xl-2-256.yaml")
    assert cfg.space.timestep_spacing == "linspace" and config_from_dict(config_dict(cfg), "again") == cfg
    assert reference_schedule(cfg, 2, "fp").timestep_spacing == "linspace"
    space = make_space(cfg.space, 2, 4, (2, 4), "fp")
    params = space.paper_params({"num_steps": 50, "guidance_scale": 1.5, "guidance_mode": "cfg"}, 0.3)
    suggested = space.suggest(optuna.trial.FixedTrial(params))
    assert suggested.timestep_spacing == "linspace" and suggested.guided_channels == 3  # DiT's sampler
    assert reference_schedule(cfg, 2, "fp").guided_channels == 3
    assert load_search_config(None).space.timestep_spacing is None  # the default: the solver's own spacing
    for overrides, expect in [
        ({"space": {"solver": ["ddpm", "euler"], "timestep_spacing": "linspace"}},
         "key 'space.timestep_spacing' has 'linspace', expected none for solver 'euler'"),
        ({"space": {"solver": "ddim", "timestep_spacing": "linspace"}}, "one of ['leading'] for solver 'ddim'"),
        ({"reference": {"solver": "euler", "timestep_spacing": "leading"}},
         "key 'reference.timestep_spacing' has 'leading', expected none for solver 'euler'"),
    ]:
        assert expect in _message(load_search_config, None, overrides, "x.yaml")


def test_show_names_the_timestep_spacing(tmp_path, capsys):
    from flexisearch.cli import main

    for spacing, text in (("linspace", "2 ddpm steps (linspace spacing), cfg 1.5"), (None, "2 ddpm steps, cfg 1.5")):
        Schedule(cond=(2, 2), uncond=(2, 2), guidance_scale=1.5, solver="ddpm", model="x",
                 timestep_spacing=spacing).save(tmp_path / "s.json")
        assert main(["show", str(tmp_path / "s.json")]) == 0
        assert capsys.readouterr().out.startswith(text)
