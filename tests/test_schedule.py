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
