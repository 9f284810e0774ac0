import re

import numpy as np
import pytest
import torch
from conftest import random_flexidit
from diffusers import DDIMScheduler

from flexisearch.errors import UserError
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
    assert cache.calls_saved == 5 * 3  # 5 samples (chunks of 2, 2, 1) x 3 shared steps, one call per sample each
    assert cache.calls_run - run_before == 5 * (2 * 2 + 1)  # steps 3-4 differ (2 calls), step 5 shared size
    # other seeds never hit the cache
    sample(m, b, labels, [s + 10 for s in seeds], batch_size=2, cache=cache, cache_tag="s")
    assert cache.calls_saved == 15


def test_cache_evicts_to_stay_under_budget():
    m = random_flexidit()
    cache = TrajectoryCache(max_bytes=3 * 2 * 4 * 64 * 2)  # room for three 2-sample states
    s = Schedule.static(2, 6, guidance_scale=2.0, solver="euler", model="x")
    sample(m, s, [0, 1], [0, 1], cache=cache)
    assert len(cache._store) == 3 and cache._bytes <= cache.max_bytes


# ---- schedulers built from a solver name --------------------------------------------------------
def test_ddpm_variance_follows_learn_sigma_and_defaults_to_fixed_small():
    assert make_scheduler("ddpm", "epsilon").config.variance_type == "fixed_small"  # default: no learned sigma
    assert make_scheduler("ddpm", "epsilon", learn_sigma=False).config.variance_type == "fixed_small"
    assert make_scheduler("ddpm", "epsilon", True).config.variance_type == "learned_range"


def test_flow_euler_timesteps_are_uniform_over_1000_training_steps_without_shift():
    sched = make_scheduler("euler", "flow")
    sched.set_timesteps(4)
    # rectified flow, 1000 training steps, shift 1: t runs uniformly from 1000 down to 1, sigma = t / 1000
    assert sched.timesteps.tolist() == pytest.approx([1000.0, 667.0, 334.0, 1.0])
    assert sched.sigmas.tolist() == pytest.approx([1.0, 0.667, 0.334, 0.001, 0.0], abs=1e-6)


def test_flow_dpm_solver_uses_unshifted_flow_sigmas_and_velocity_prediction():
    sched = make_scheduler("dpm++", "flow")
    assert sched.config.prediction_type == "flow_prediction"
    sched.set_timesteps(4)
    # flow sigmas, no shift: sigma_i = (1 - 1/1000) (1 - i/4), then 0; timesteps = floor(1000 sigma_i)
    assert sched.sigmas.tolist() == pytest.approx([0.999, 0.74925, 0.4995, 0.24975, 0.0], abs=1e-6)
    assert sched.timesteps.tolist() == [999, 749, 499, 249]


def test_unknown_solver_error_names_solver_and_objective():
    with pytest.raises(ValueError, match=r"^solver 'euler' is not available for epsilon models$"):
        make_scheduler("euler", "epsilon")
    with pytest.raises(ValueError, match=r"^solver 'ddim' is not available for flow models$"):
        make_scheduler("ddim", "flow")


def test_learned_variance_type_scheduler_gets_the_variance_channels():
    from diffusers import DDPMScheduler

    seen = []

    class Spy(DDPMScheduler):
        def step(self, model_output, timestep, sample, generator=None, return_dict=True):
            seen.append(model_output.shape[1])
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)

    m = random_flexidit("epsilon", learn_sigma=True)  # 1 latent channel + 1 variance channel
    s = Schedule.static(2, 2, guidance_scale=2.0, solver="ddpm", model="x")
    sample(m, s, [0], [0], scheduler=Spy(variance_type="learned"))
    assert seen == [2, 2]
    seen.clear()
    sample(m, s, [0], [0], scheduler=Spy(variance_type="fixed_small"))  # a fixed variance: only the mean
    assert seen == [1, 1]


def test_without_guidance_variance_channels_only_when_the_scheduler_learns_them():
    m = random_flexidit("epsilon", learn_sigma=True)
    s = Schedule.static(2, 1, guidance_scale=1.0, solver="ddpm", model="x")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor(500), torch.tensor([0, 1])
    with torch.no_grad():
        full = m(x, torch.tensor([500, 500]), y, 2)
        learned = guided_output(m, x, t, y, 2, 2, s, True)
        fixed = guided_output(m, x, t, y, 2, 2, s, False)
    assert full.shape[1] == 2
    assert learned.shape == (2, 2, 8, 8) and torch.allclose(learned, full, atol=1e-6)
    assert fixed.shape == (2, 1, 8, 8) and torch.allclose(fixed, full[:, :1], atol=1e-6)


# ---- the trajectory cache: counters, prefixes, budget ---------------------------------------------
STATE_BYTES = 2 * (1 * 8 * 8) * 4 * 2  # 2 samples x 1x8x8 float32 latents, x2 for the solver history


def test_fresh_cache_counts_exactly_the_calls_it_ran():
    m = random_flexidit()
    cache = TrajectoryCache()
    assert (cache.calls_run, cache.calls_saved) == (0, 0)
    s = Schedule(cond=(4, 2, 2), uncond=(4, 4, 2), guidance_scale=2.0, solver="euler", model="x")
    sample(m, s, [0, 1], [0, 1], cache=cache)
    assert (cache.calls_run, cache.calls_saved) == (2 * (1 + 2 + 1), 0)  # 2 samples; shared size: one call


def test_schedules_sharing_only_their_first_step_reuse_it():
    m = random_flexidit()
    cache = TrajectoryCache()
    a = Schedule.static(4, 3, guidance_scale=2.0, solver="euler", model="x")
    b = Schedule.weak_first(1, 3, 4, 2, guidance_scale=2.0, solver="euler", model="x")
    sample(m, a, [0, 1], [0, 1], cache=cache)
    got = sample(m, b, [0, 1], [0, 1], cache=cache)
    assert cache.calls_saved == 2 * 1 and cache.calls_run == 2 * (3 + 2)  # per sample
    assert torch.equal(got, sample(m, b, [0, 1], [0, 1]))


def test_cache_evicts_least_recently_used_state():
    m = random_flexidit()
    cache = TrajectoryCache(max_bytes=2 * STATE_BYTES)  # room for two states
    s = Schedule.static(2, 3, guidance_scale=2.0, solver="euler", model="x")
    first = sample(m, s, [0, 1], [0, 1], cache=cache)  # states after steps 1, 2, 3; the oldest goes
    again = sample(m, s, [0, 1], [0, 1], cache=cache)
    assert cache.calls_saved == 2 * 3 and cache.calls_run == 2 * 3  # the final state was kept: nothing reruns
    assert torch.equal(first, again)


def test_a_state_of_exactly_the_budget_is_cached():
    m = random_flexidit()
    cache = TrajectoryCache(max_bytes=STATE_BYTES)
    s = Schedule.static(2, 2, guidance_scale=2.0, solver="euler", model="x")
    sample(m, s, [0, 1], [0, 1], cache=cache)
    sample(m, s, [0, 1], [0, 1], cache=cache)
    assert cache.calls_saved == 2 * 2 and cache.calls_run == 2 * 2


def test_a_state_over_the_budget_is_skipped_and_evicts_nothing():
    m = random_flexidit()
    cache = TrajectoryCache(max_bytes=STATE_BYTES * 3 // 4)  # one 1-sample state fits, a 2-sample one does not
    s = Schedule.static(2, 1, guidance_scale=2.0, solver="euler", model="x")
    sample(m, s, [0], [0], cache=cache, cache_tag="one")
    sample(m, s, [0, 1], [0, 1], cache=cache, cache_tag="two")
    sample(m, s, [0], [0], cache=cache, cache_tag="one")
    assert cache.calls_saved == 1 and cache.calls_run == 1 + 2  # one sample, then two


def test_starting_latents_are_scaled_by_the_schedulers_initial_sigma():
    """A sigma-parametrised scheduler (Euler on DiT's betas) starts from noise * sqrt(sigma_max^2 + 1): computed here
    from the betas, not read from the scheduler."""
    import numpy as np
    from diffusers import EulerDiscreteScheduler

    from flexisearch.sampling.generate import prepare_scheduler

    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x = prepare_scheduler(sched, 5, noise, torch.device("cpu"))
    alpha_bar = np.cumprod(1 - np.linspace(0.0001, 0.02, 1000))[-1]  # the first of 5 linspace timesteps is t = 999
    expected = ((1 - alpha_bar) / alpha_bar + 1) ** 0.5
    assert len(sched.timesteps) == 5 and expected > 100
    torch.testing.assert_close(x, noise * expected, rtol=1e-4, atol=0)  # diffusers computes sigmas in float32


@pytest.mark.parametrize("solver", ["ddpm", "ddim"])
def test_epsilon_solvers_do_not_clip_the_predicted_sample(solver):
    """DiT and PixArt latents reach well beyond [-1, 1]: a step's x0 = (x - sqrt(1 - a) eps) / sqrt(a) unclipped."""
    sched = make_scheduler(solver, "epsilon")
    sched.set_timesteps(10)
    t = sched.timesteps[0]
    x, eps = torch.full((1, 4, 2, 2), 3.0), torch.full((1, 4, 2, 2), 0.5)
    a = sched.alphas_cumprod[t]
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    assert x0.min() > 1.5
    out = sched.step(eps, t, x, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.pred_original_sample, x0, rtol=1e-5)


# ---- DiT's own sampler (facebookresearch/DiT: create_diffusion(str(N))), written out here -------
def dit_timesteps(n: int) -> list[int]:
    """DiT's space_timesteps(1000, [n]): n of the 1000 steps at a fractional stride, rounded; descending."""
    stride, at, taken = 999 / (n - 1), 0.0, []
    for _ in range(n):
        taken.append(round(at))
        at += stride
    return sorted(set(taken), reverse=True)


def dit_respaced(timesteps: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """alphabar at the kept timesteps (descending) and after each step (1 after the last), in float64 as DiT."""
    alphabar = np.cumprod(1 - np.linspace(0.0001, 0.02, 1000, dtype=np.float64))[timesteps]
    return alphabar, np.append(alphabar[1:], 1.0)


def dit_noise(gens: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """Per-sample noise, each sample's from its own generator (as flexisearch draws it)."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


@torch.no_grad()
def dit_ddpm(model, labels: list[int], seeds: list[int], n: int) -> torch.Tensor:
    """DiT's p_sample_loop on the respaced process, learned-range variance, clip_denoised=False: the respaced betas
    1 - alphabar[t_i] / alphabar[t_i+1], the posterior mean of x0 from eps, log-variance frac * log(beta) +
    (1 - frac) * log(clipped posterior variance) with frac = (v + 1) / 2; no noise after the last step (t = 0)."""
    c, size = model.config.in_channels, model.config.input_size
    ts = dit_timesteps(n)
    alphabar, alphabar_prev = dit_respaced(ts)
    betas = 1 - alphabar / alphabar_prev
    posterior_var = betas * (1 - alphabar_prev) / (1 - alphabar)
    clipped = np.append(posterior_var[:-1], posterior_var[-2])  # variance 0 at t = 0: DiT logs that of t_1 there
    coef_x0 = betas * np.sqrt(alphabar_prev) / (1 - alphabar)
    coef_xt = (1 - alphabar_prev) * np.sqrt(1 - betas) / (1 - alphabar)
    # DiT's _extract_into_tensor: float64 tables, used in float32
    alphabar, betas, clipped, coef_x0, coef_xt = (torch.from_numpy(a).float()
                                                  for a in (alphabar, betas, clipped, coef_x0, coef_xt))
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x, y = dit_noise(gens, (c, size, size)), torch.tensor(labels)
    for i, t in enumerate(ts):
        out = model(x, torch.full((len(x),), t), y, model.config.patch_size)
        eps, v = out[:, :c], out[:, c:]
        x0 = (1 / alphabar[i]).sqrt() * x - (1 / alphabar[i] - 1).sqrt() * eps
        mean = coef_x0[i] * x0 + coef_xt[i] * x
        frac = (v + 1) / 2
        log_var = frac * betas[i].log() + (1 - frac) * clipped[i].log()
        x = mean + (0.5 * log_var).exp() * dit_noise(gens, (c, size, size)) if i < len(ts) - 1 else mean
    return x


@torch.no_grad()
def dit_ddim(model, labels: list[int], seeds: list[int], ts: list[int]) -> torch.Tensor:
    """DiT's ddim_sample_loop (eta 0, clip_denoised=False) on the process respaced to timesteps ts (descending)."""
    c, size = model.config.in_channels, model.config.input_size
    alphabar, alphabar_prev = (torch.from_numpy(a).float() for a in dit_respaced(ts))
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x, y = dit_noise(gens, (c, size, size)), torch.tensor(labels)
    for i, t in enumerate(ts):
        eps = model(x, torch.full((len(x),), t), y, model.config.patch_size)[:, :c]
        x0 = (1 / alphabar[i]).sqrt() * x - (1 / alphabar[i] - 1).sqrt() * eps
        eps = ((1 / alphabar[i]).sqrt() * x - x0) / (1 / alphabar[i] - 1).sqrt()  # DiT re-derives eps from x0
        x = alphabar_prev[i].sqrt() * x0 + (1 - alphabar_prev[i]).sqrt() * eps
    return x


DIT_LABELS, DIT_SEEDS = [0, 2, 1], [11, 12, 13]


@pytest.mark.parametrize("n", [10, 250])
def test_ddpm_with_linspace_spacing_is_dits_own_sampler(n):
    """static native, learned sigma, no guidance: flexisearch's ddpm with timestep_spacing linspace gives DiT's samples;
    diffusers' default spacing (leading: 900, 800, ... for 10 steps) does not."""
    m = random_flexidit("epsilon", learn_sigma=True)
    s = Schedule.static(2, n, guidance_scale=1.0, solver="ddpm", model="x", timestep_spacing="linspace")
    sched = make_scheduler("ddpm", "epsilon", True, "linspace")
    sched.set_timesteps(n)
    assert sched.timesteps.tolist() == dit_timesteps(n) and dit_timesteps(10) == [999 - 111 * i for i in range(10)]
    dit = dit_ddpm(m, DIT_LABELS, DIT_SEEDS, n)
    ours = sample(m, s, DIT_LABELS, DIT_SEEDS)
    scale = dit.abs().max()  # a random model's samples run to hundreds
    torch.testing.assert_close(ours, dit, rtol=0, atol=5e-5 * scale)  # float32 vs DiT's float64 tables: ~1e-6
    leading = sample(m, s.replace(timestep_spacing=None), DIT_LABELS, DIT_SEEDS)
    assert (leading - dit).abs().max() > 1e-2 * scale  # 250 steps: 996, ..., 0 against 999, ..., 0 moves it by 3%


def test_ddim_is_dits_ddim_on_its_leading_timesteps_and_takes_no_other_spacing():
    """flexisearch's ddim is DiT's DDIM on the timesteps it runs (leading: 900, 800, ..., 0). Under linspace diffusers'
    DDIMScheduler steps from t to t - 100, not to the next of 999, 888, ..., 0 (diffusers issue #12633): it is not
    DiT's DDIM there, so a schedule cannot ask for it. When diffusers fixes it, the last assertion fails: then let ddim
    take linspace (schedule.TIMESTEP_SPACINGS)."""
    m = random_flexidit("epsilon", learn_sigma=True)
    s = Schedule.static(2, 10, guidance_scale=1.0, solver="ddim", model="x")
    dit = dit_ddim(m, DIT_LABELS, DIT_SEEDS, [900 - 100 * i for i in range(10)])
    ours = sample(m, s, DIT_LABELS, DIT_SEEDS)
    torch.testing.assert_close(ours, dit, rtol=0, atol=5e-5 * dit.abs().max())
    assert torch.equal(sample(m, s.replace(timestep_spacing="leading"), DIT_LABELS, DIT_SEEDS), ours)  # the default
    with pytest.raises(UserError, match=r"field 'timestep_spacing' is 'linspace', expected one of \['leading'\] "
                                        r"for solver 'ddim' \(diffusers' DDIMScheduler steps by a fixed stride"):
        s.replace(timestep_spacing="linspace")
    stock = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                          clip_sample=False, timestep_spacing="linspace")
    dit_linspace = dit_ddim(m, DIT_LABELS, DIT_SEEDS, dit_timesteps(10))
    assert (sample(m, s, DIT_LABELS, DIT_SEEDS, scheduler=stock) - dit_linspace).abs().max() > 0.05 * dit.abs().max()


def test_spacing_reaches_the_scheduler_and_the_trajectory_cache():
    m = random_flexidit("epsilon", learn_sigma=True)
    cache = TrajectoryCache()
    s = Schedule.static(2, 4, guidance_scale=2.0, solver="ddpm", model="x")
    leading = sample(m, s, [0, 1], [0, 1], cache=cache)
    spaced = sample(m, s.replace(timestep_spacing="linspace"), [0, 1], [0, 1], cache=cache)
    assert cache.calls_saved == 0 and not torch.allclose(leading, spaced, atol=1e-3)
    assert make_scheduler("ddpm", "epsilon").config.timestep_spacing == "leading"  # None: diffusers' default
    for solver, prediction in (("euler", "flow"), ("dpm++", "epsilon"), ("ddim", "v_prediction")):
        with pytest.raises(ValueError, match=rf"^timestep_spacing 'linspace': expected .* '{re.escape(solver)}'"):
            make_scheduler(solver, prediction, timestep_spacing="linspace")


# ---- v-prediction ---------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpm++"])
def test_a_v_prediction_model_samples_as_its_epsilon_equivalent(solver, monkeypatch):
    """A v model's samples are those of the epsilon model eps = sqrt(abar) v + sqrt(1 - abar) x_t (guidance is affine
    with weights summing to 1, so it commutes with the conversion); read as epsilon, its v gives other samples."""
    m = random_flexidit("v_prediction")
    s = Schedule.branch_split(2, 4, 6, 4, 2, guidance_scale=2.0, solver=solver, model="x")
    assert make_scheduler(solver, "v_prediction").config.prediction_type == "v_prediction"
    ours = sample(m, s, [0, 1, 2], [0, 1, 2])
    misread = sample(m, s, [0, 1, 2], [0, 1, 2], scheduler=make_scheduler(solver, "epsilon"))
    alphabar, forward = make_scheduler(solver, "epsilon").alphas_cumprod, m.forward

    def as_epsilon(x, t, y, p=None):
        a = alphabar[t.long()].view(-1, 1, 1, 1)
        return a.sqrt() * forward(x, t, y, p) + (1 - a).sqrt() * x

    monkeypatch.setattr(m, "forward", as_epsilon)
    want = sample(m, s, [0, 1, 2], [0, 1, 2], scheduler=make_scheduler(solver, "epsilon"))
    scale = want.abs().max()
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-4 * scale)
    assert (misread - want).abs().max() > 0.05 * scale


def test_guided_channels_is_dits_forward_with_cfg(tmp_path):
    """DiT's sample.py guides with forward_with_cfg: eps, rest = out[:, :3], out[:, 3:]; the first 3 channels get
    uncond + s (cond - uncond), channel 3 and the variance channels stay the conditional output (written out here
    for a 4-channel learned-sigma model)."""
    from flexisearch.models.dit import FlexiDiT, FlexiDiTConfig

    torch.manual_seed(0)
    m = FlexiDiT(FlexiDiTConfig(input_size=8, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                                learn_sigma=True)).with_patch_sizes((4,)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor(500.0), torch.tensor([0, 1])
    s = Schedule(cond=(2,), uncond=(2,), guidance_scale=1.5, solver="ddpm", guided_channels=3, model="x")
    with torch.no_grad():
        out = m(torch.cat([x, x]), t.expand(4), torch.cat([y, torch.full_like(y, m.null_class)]), 2)
        eps, rest = out[:, :3], out[:, 3:]
        cond_eps, uncond_eps = eps.split(2)
        half = uncond_eps + 1.5 * (cond_eps - uncond_eps)
        want = torch.cat([half, rest[:2]], dim=1)  # the conditional rows, as DiT's sampler keeps
        got = guided_output(m, x, t, y, 2, 2, s, True)
        every = guided_output(m, x, t, y, 2, 2, s.replace(guided_channels=None), True)
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(every, want, atol=1e-4)
    s.save(tmp_path / "s.json")
    assert Schedule.load(tmp_path / "s.json") == s and s.to_dict()["version"] == 3
    with pytest.raises(UserError, match="field 'guided_channels' is 5"):
        s.replace(guided_channels=5).check_model(m.config, None)
