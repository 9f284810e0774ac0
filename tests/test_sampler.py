import pytest
import torch
from conftest import random_flexidit

from flexisearch.sampling.generate import (
    TrajectoryCache,
    guided_output,
    make_scheduler,
    sample,
)
from flexisearch.sampling.schedule import Schedule

SOLVERS = [("flow", False, "euler"), ("flow", False, "dpm++"), ("epsilon", True, "ddpm"), ("epsilon", False, "ddim"),
           ("epsilon", True, "dpm++")]


@pytest.mark.parametrize("prediction,learn_sigma,solver", SOLVERS)
def test_sample_does_not_depend_on_batch(prediction, learn_sigma, solver):
    m = random_flexidit(prediction, learn_sigma)
    s = Schedule.branch_split(2, 4, 6, 4, 2, guidance_scale=2.0, solver=solver, model=m.fingerprint())
    seeds, labels = list(range(7)), [0, 1, 2, 0, 1, 2, 3]  # 3 = the null class
    full = sample(m, s, labels, seeds, batch_size=7)
    chunked = sample(m, s, labels, seeds, batch_size=3)
    alone = sample(m, s, labels[4:5], seeds[4:5], batch_size=1)
    scale = full.abs().max()
    assert torch.allclose(full, chunked, atol=1e-5 * scale)
    assert torch.allclose(full[4:5], alone, atol=1e-5 * scale)
    # and another seed gives another sample
    assert not torch.allclose(full[4:5], sample(m, s, labels[4:5], [99], batch_size=1), atol=1e-3)


def test_schedule_changes_samples_and_weak_steps_are_used():
    m = random_flexidit()
    fp = m.fingerprint()
    native = sample(m, Schedule.static(2, 4, guidance_scale=2.0, solver="euler", model=fp), [0, 1], [0, 1])
    weak = sample(m, Schedule.static(4, 4, guidance_scale=2.0, solver="euler", model=fp), [0, 1], [0, 1])
    assert not torch.allclose(native, weak, atol=1e-3)


def test_one_call_when_branches_share_a_size_two_when_they_differ(monkeypatch):
    m = random_flexidit()
    calls = []
    orig = m.forward
    monkeypatch.setattr(m, "forward", lambda x, t, y, p=None: calls.append((len(x), p)) or orig(x, t, y, p))
    s = Schedule(cond=(4, 2, 2), uncond=(4, 4, 2), guidance_scale=2.0, solver="euler", model="x")
    sample(m, s, [0, 1, 2], [0, 1, 2])
    assert calls == [(6, 4), (3, 2), (3, 4), (6, 2)]
    calls.clear()
    sample(m, s.replace(guidance_scale=1.0), [0, 1, 2], [0, 1, 2])  # no CFG: only the conditional branch runs
    assert calls == [(3, 4), (3, 2), (3, 2)]


def test_guidance_modes():
    m = random_flexidit()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor(500.0), torch.tensor([0, 1])
    s = Schedule(cond=(2,), uncond=(4,), guidance_scale=3.0, solver="euler", model="x")
    with torch.no_grad():
        c, c_weak = m(x, t.expand(2), y, 2), m(x, t.expand(2), y, 4)
        u_weak = m(x, t.expand(2), torch.full_like(y, m.null_class), 4)
        cfg = guided_output(m, x, t, y, 2, 4, s, False)
        weak_g = guided_output(m, x, t, y, 2, 4, s.replace(guidance_mode="weak_guidance"), False)
    assert torch.allclose(cfg, u_weak + 3.0 * (c - u_weak), atol=1e-5)
    s2 = 1 + (3.0 - 1) / 2.5  # the paper's ratio (1 - s1) / (1 - s2) = 2.5
    assert torch.allclose(weak_g, c_weak + s2 * (c - c_weak), atol=1e-5)


def test_learned_sigma_reaches_learned_range_scheduler():
    m = random_flexidit("epsilon", learn_sigma=True)
    sched = make_scheduler("ddpm", "epsilon", learn_sigma=True)
    assert sched.config.variance_type == "learned_range"
    s = Schedule.static(2, 1, guidance_scale=2.0, solver="ddpm", model="x")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor(999), torch.tensor([0, 1])
    with torch.no_grad():
        out = guided_output(m, x, t, y, 2, 2, s, True)
        c = m(x, t.expand(2), y, 2)
    assert out.shape[1] == 2 and torch.allclose(out[:, 1:], c[:, 1:], atol=1e-6)  # the conditional branch's variance


def test_prefix_cache_reuses_and_matches():
    m = random_flexidit()
    fp = m.fingerprint()
    cache = TrajectoryCache()
    a = Schedule.branch_split(3, 3, 6, 4, 2, guidance_scale=2.0, solver="dpm++", model=fp)
    b = Schedule.branch_split(3, 5, 6, 4, 2, guidance_scale=2.0, solver="dpm++", model=fp)
    seeds, labels = list(range(5)), [0, 1, 2, 0, 1]
    sample(m, a, labels, seeds, batch_size=2, cache=cache, cache_tag="s")
    run_before = cache.calls_run
    got = sample(m, b, labels, seeds, batch_size=2, cache=cache, cache_tag="s")
    assert torch.equal(got, sample(m, b, labels, seeds, batch_size=2))
    assert cache.calls_saved == 3 * 3  # 3 chunks x 3 shared steps, one batched call each
    assert cache.calls_run - run_before == 3 * (2 * 2 + 1)  # steps 3-4 differ (2 calls), step 5 shared size
    # other seeds never hit the cache
    sample(m, b, labels, [s + 10 for s in seeds], batch_size=2, cache=cache, cache_tag="s")
    assert cache.calls_saved == 9


def test_cache_evicts_to_stay_under_budget():
    m = random_flexidit()
    cache = TrajectoryCache(max_bytes=3 * 2 * 4 * 64 * 2)  # room for three 2-sample states
    s = Schedule.static(2, 6, guidance_scale=2.0, solver="euler", model="x")
    sample(m, s, [0, 1], [0, 1], cache=cache)
    assert len(cache._store) == 3 and cache._bytes <= cache.max_bytes
