"""FlexiDiTPipeline: same samples as the library sampler, save/load, scheduler swap, refusals,
schedule resampling, and conversion of a tiny diffusers DiTPipeline checked against the original."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import converted_tiny_dit, random_flexidit, tiny_dit_pipeline
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from flexisearch.cli import main
from flexisearch.errors import UserError
from flexisearch.sampling.follow import follow_schedule
from flexisearch.sampling.generate import make_scheduler, sample
from flexisearch.sampling.pipeline import FlexiDiTPipeline
from flexisearch.sampling.schedule import Schedule
from flexisearch.sampling.stock import convert_pipeline

LABELS, SEEDS = [0, 1, 2, 1, 3], [5, 6, 7, 8, 9]  # 3 = the null class of random_flexidit


def pixel_pipeline(prediction: str = "flow", learn_sigma: bool = False, solver: str = "euler") -> FlexiDiTPipeline:
    model = random_flexidit(prediction, learn_sigma)
    pipe = FlexiDiTPipeline(model, make_scheduler(solver, prediction, learn_sigma),
                            id2label={0: "zero, nil", 1: "one", 2: "two"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def schedule_for(pipe: FlexiDiTPipeline, solver: str, **kw) -> Schedule:
    kw = {"guidance_scale": 2.0, **kw}
    return Schedule.branch_split(2, 4, 6, 4, 2, solver=solver, model=pipe.model_fingerprint(), **kw)


def latents_of(pipe: FlexiDiTPipeline, schedule: Schedule, **kw) -> torch.Tensor:
    return pipe(LABELS, schedule, seeds=SEEDS, output_type="latent", **kw).images


# ---- the pipeline samples exactly as the library sampler ------------------------------------

@pytest.mark.parametrize("prediction,learn_sigma,solver,mode", [
    ("flow", False, "euler", "cfg"), ("flow", False, "dpm++", "weak_guidance"),
    ("epsilon", True, "ddpm", "cfg"), ("epsilon", False, "ddim", "weak_guidance"), ("epsilon", True, "dpm++", "cfg"),
    ("v_prediction", False, "ddpm", "weak_guidance"), ("v_prediction", False, "ddim", "cfg")])
def test_same_samples_as_library_sampler(prediction, learn_sigma, solver, mode):
    pipe = pixel_pipeline(prediction, learn_sigma, solver)
    s = schedule_for(pipe, solver, guidance_mode=mode)
    want = sample(pipe.transformer, s, LABELS, SEEDS, batch_size=len(SEEDS))
    assert torch.equal(latents_of(pipe, s), want)
    assert torch.equal(latents_of(pipe, s), want)  # the pipeline's scheduler carries no state between calls


def test_schedule_file_and_best_json(tmp_path):
    pipe = pixel_pipeline()
    s = schedule_for(pipe, "euler")
    s.save(tmp_path / "s.json")
    (tmp_path / "best.json").write_text(json.dumps({"schedule": s.to_dict(), "cost": {}}))
    want = latents_of(pipe, s)
    assert torch.equal(latents_of(pipe, tmp_path / "s.json"), want)
    assert torch.equal(latents_of(pipe, str(tmp_path / "best.json")), want)


# ---- save / load -------------------------------------------------------------------------------

def public(config: dict) -> dict:
    """A diffusers config without its bookkeeping entries (_diffusers_version, _use_default_values, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_save_load_round_trip(tmp_path):
    pipe = pixel_pipeline("epsilon", True, "ddpm")
    s = schedule_for(pipe, "ddpm")
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["transformer"] == ["flexidit", "FlexiDiT"] and index["vae"] == [None, None]
    assert index["_class_name"] == ["pipeline", "FlexiDiTPipeline"]
    back = FlexiDiTPipeline.from_pretrained(tmp_path / "p")
    back.set_progress_bar_config(disable=True)
    assert back.model_fingerprint() == pipe.model_fingerprint()
    assert type(back.scheduler) is type(pipe.scheduler) and public(back.scheduler.config) == public(pipe.scheduler.config)
    assert back.labels == pipe.labels and back.get_label_ids(["nil", "two"]) == [0, 2]
    assert torch.equal(latents_of(back, s), latents_of(pipe, s))


def test_stock_diffusers_loads_a_saved_pipeline_and_ours_runs_no_code_from_the_folder(tmp_path, converted):
    from diffusers import DiffusionPipeline

    pipe, _ = converted
    pipe.save_pretrained(tmp_path / "p")
    stock = DiffusionPipeline.from_pretrained(tmp_path / "p", trust_remote_code=True)
    assert isinstance(stock, FlexiDiTPipeline) and isinstance(stock.vae, AutoencoderKL)
    stock.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, seeds=[0, 1], output_type="np")
    np.testing.assert_array_equal(stock([1, 2], **kw).images, pipe([1, 2], **kw).images)
    marker = tmp_path / "code-was-run"
    for name in ("pipeline.py", "transformer/flexidit.py"):
        (tmp_path / "p" / name).write_text(f"open({str(marker)!r}, 'w').close()\n")
    ours = FlexiDiTPipeline.from_pretrained(tmp_path / "p")
    assert not marker.exists() and ours.model_fingerprint() == pipe.model_fingerprint()
    with pytest.raises(UserError, match="cannot be downloaded") as e:
        FlexiDiTPipeline.from_pretrained("no-such-user/no-such-pipeline")  # offline in the tests
    assert "\n" not in str(e.value)


def test_latent_pipeline_round_trip(tmp_path, converted):
    pipe, _ = converted
    pipe.save_pretrained(tmp_path / "again")
    back = FlexiDiTPipeline.from_pretrained(tmp_path / "again")
    back.set_progress_bar_config(disable=True)
    assert isinstance(back.vae, AutoencoderKL) and public(back.vae.config) == public(pipe.vae.config)
    kw = dict(num_inference_steps=3, seeds=[0, 1], output_type="np")
    np.testing.assert_array_equal(back([1, 2], **kw).images, pipe([1, 2], **kw).images)


def test_cast_keeps_the_fingerprint():
    pipe = pixel_pipeline()
    s = schedule_for(pipe, "euler")
    pipe.transformer = random_flexidit(seed=0)  # a fresh object with equal weights: fingerprint recomputed, equal
    pipe.to(torch.float64)
    assert pipe.dtype == torch.float64 and pipe.model_fingerprint() == s.model
    assert latents_of(pipe, s).dtype == torch.float32  # the solver state stays float32
    with torch.no_grad():
        pipe.transformer.y_embedder.weight[0, 0] += 1  # an in-place edit is only seen on request
    assert pipe.model_fingerprint() == s.model != pipe.model_fingerprint(refresh=True)


# ---- scheduler swap and refusals ---------------------------------------------------------------

def test_scheduler_swap():
    pipe = pixel_pipeline("epsilon", False, "ddim")
    ddim = latents_of(pipe, schedule_for(pipe, "ddim"))
    dpm_schedule = schedule_for(pipe, "dpm++")
    with pytest.raises(UserError, match=r"solver 'dpm\+\+' \(DPMSolverMultistepScheduler\).*is a DDIMScheduler.*"
                                        r"pipe.use_solver\('dpm\+\+'\), or pass allow_solver_mismatch=True"):
        latents_of(pipe, dpm_schedule)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    dpm = latents_of(pipe, dpm_schedule)
    assert torch.isfinite(dpm).all() and not torch.allclose(dpm, ddim, atol=1e-3)
    want = sample(pipe.transformer, dpm_schedule, LABELS, SEEDS, scheduler=pipe.scheduler)
    assert torch.equal(dpm, want)
    # explicit opt-in: the ddim schedule's sizes under the DPM solver
    assert torch.isfinite(latents_of(pipe, schedule_for(pipe, "ddim"), allow_solver_mismatch=True)).all()


def test_a_flow_models_solver_swap_runs_what_the_search_ran():
    """A DPM-Solver made with from_config from a flow model's scheduler predicts epsilon (its samples are noise):
    it is refused for a dpm++ schedule; use_solver builds the search's, and gives flexisearch.sample's images."""
    pipe = pixel_pipeline("flow", False, "euler")
    schedule = schedule_for(pipe, "dpm++")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    with pytest.raises(UserError, match=r"pipe.use_solver\('dpm\+\+'\)"):
        latents_of(pipe, schedule)
    pipe.use_solver("dpm++")
    assert torch.equal(latents_of(pipe, schedule), sample(pipe.transformer, schedule, LABELS, SEEDS))
    with pytest.raises(UserError, match="a flow model runs euler, dpm"):
        pipe.use_solver("ddim")


def test_a_schedules_timestep_spacing_is_the_pipelines_to_run():
    """A schedule with a timestep spacing needs a scheduler with that spacing (use_solver makes one); a schedule
    without one runs under the pipeline's scheduler, whatever its spacing (the user's choice)."""
    pipe = pixel_pipeline("epsilon", True, "ddpm")
    spaced = schedule_for(pipe, "ddpm", timestep_spacing="linspace")
    with pytest.raises(UserError, match=r"searched with solver 'ddpm' \(DDPMScheduler, timestep_spacing='linspace'\), "
                                        r"but .*pipe.use_solver\('ddpm', timestep_spacing='linspace'\)"):
        latents_of(pipe, spaced)
    pipe.use_solver("ddpm", timestep_spacing="linspace")
    assert pipe.scheduler.config.timestep_spacing == "linspace"
    assert torch.equal(latents_of(pipe, spaced), sample(pipe.transformer, spaced, LABELS, SEEDS))
    plain = schedule_for(pipe, "ddpm")
    ours = latents_of(pipe, plain)
    assert torch.equal(ours, sample(pipe.transformer, plain, LABELS, SEEDS, scheduler=pipe.scheduler))
    assert not torch.allclose(ours, sample(pipe.transformer, plain, LABELS, SEEDS), atol=1e-3)
    for solver, spacing, expect in [("ddim", "linspace", r"expected one of \['leading'\] for solver 'ddim'"),
                                    ("ddpm", "every", "expected one of .* for solver 'ddpm'")]:
        with pytest.raises(UserError, match=f"^timestep_spacing '{spacing}': {expect}"):
            pipe.use_solver(solver, timestep_spacing=spacing)


def test_refusals_and_opt_ins():
    pipe = pixel_pipeline()
    s = schedule_for(pipe, "euler")
    with pytest.raises(UserError, match="made for another model"):
        latents_of(pipe, s.replace(model="0123456789abcdef"))
    assert torch.equal(latents_of(pipe, s.replace(model="0123456789abcdef"), allow_model_mismatch=True), latents_of(pipe, s))
    with pytest.raises(UserError, match="6 steps, num_inference_steps is 10.*adapt_steps=True"):
        latents_of(pipe, s, num_inference_steps=10)
    assert torch.equal(latents_of(pipe, s, num_inference_steps=10, adapt_steps=True), latents_of(pipe, s.resample(10)))
    assert torch.equal(latents_of(pipe, s, num_inference_steps=6), latents_of(pipe, s))  # agreeing values are fine
    with pytest.raises(UserError, match="guidance_scale 2.0, guidance_scale is 3.0.*adapt_guidance=True"):
        latents_of(pipe, s, guidance_scale=3.0)
    assert torch.equal(latents_of(pipe, s, guidance_scale=3.0, adapt_guidance=True),
                       latents_of(pipe, s.replace(guidance_scale=3.0)))
    with pytest.raises(UserError, match="patch size 8"):
        latents_of(pipe, Schedule.static(8, 3, guidance_scale=2.0, solver="euler", model=s.model))


def test_argument_errors():
    pipe = pixel_pipeline()
    with pytest.raises(ValueError, match="not both"):
        pipe([0], seeds=[0], generator=torch.Generator())
    with pytest.raises(ValueError, match="2 seeds for 1"):
        pipe([0], seeds=[0, 1])
    with pytest.raises(ValueError, match=r"ids must be in 0\.\.3"):
        pipe([4])
    with pytest.raises(ValueError, match="output_type"):
        pipe([0], output_type="jpeg")
    with pytest.raises(ValueError, match="does not exist"):
        pipe.get_label_ids("three")
    assert pipe.get_label_ids("zero") == [0]


def test_default_is_static_native_and_generator_is_reproducible():
    pipe = pixel_pipeline()
    native = Schedule.static(2, 7, guidance_scale=4.0, solver="euler", model=pipe.model_fingerprint())
    a = pipe(LABELS, num_inference_steps=7, generator=torch.Generator().manual_seed(3), output_type="latent").images
    noise = randn_tensor((5, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, pipe(LABELS, native, latents=noise, output_type="latent").images)


# ---- callback and outputs ----------------------------------------------------------------------

def test_callback_on_step_end_sees_and_replaces_latents():
    pipe = pixel_pipeline()
    s = schedule_for(pipe, "euler")
    seen = []

    def record(p, i, t, kw):
        seen.append((i, int(t), kw["latents"].clone()))
        return kw

    out = latents_of(pipe, s, callback_on_step_end=record)
    assert [i for i, _, _ in seen] == list(range(6)) and torch.equal(seen[-1][2], out)
    assert [t for _, t, _ in seen] == [int(t) for t in pipe.scheduler.timesteps]
    def halve_at_step_2(p, i, t, kw):
        return {"latents": kw["latents"] / 2 if i == 2 else kw["latents"]}

    halved = latents_of(pipe, s, callback_on_step_end=halve_at_step_2)
    assert not torch.allclose(halved, out, atol=1e-3)
    assert torch.equal(latents_of(pipe, s, callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] * 0}), 0 * out)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        latents_of(pipe, s, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise_pred"])


def test_output_types():
    pipe = pixel_pipeline()
    s = schedule_for(pipe, "euler")
    raw = latents_of(pipe, s)
    pt = pipe(LABELS, s, seeds=SEEDS, output_type="pt").images
    assert torch.equal(pt, (raw / 2 + 0.5).clamp(0, 1))
    arr = pipe(LABELS, s, seeds=SEEDS, output_type="np").images
    assert arr.shape == (5, 8, 8, 1) and np.array_equal(arr, pt.permute(0, 2, 3, 1).numpy())
    (images,) = pipe(LABELS, s, seeds=SEEDS, return_dict=False)
    assert len(images) == 5 and images[0].size == (8, 8) and images[0].mode == "L"
    assert np.array_equal(np.asarray(images[0]), (arr[0, ..., 0] * 255).round().astype(np.uint8))


# ---- resampling a schedule to another step count -----------------------------------------------

KW = dict(guidance_scale=2.0, solver="euler", model="abc")


def weak_share(sizes: tuple[int, ...], lo: float, hi: float) -> float:
    """Steps-worth of the weak size (4) that a branch spends in the phase [lo, hi) of the trajectory."""
    n = len(sizes)
    return sum(max(0.0, min(hi, (i + 1) / n) - max(lo, i / n)) * n for i, p in enumerate(sizes) if p == 4)


def test_resample_keeps_weak_share_per_phase():
    rng = random.Random(0)
    for _ in range(40):
        n, m = rng.randint(1, 40), rng.randint(1, 40)
        s = Schedule(cond=[rng.choice((2, 4)) for _ in range(n)], uncond=[rng.choice((2, 4)) for _ in range(n)], **KW)
        r = s.resample(m)
        assert r.num_steps == m and (r.guidance_scale, r.solver, r.model) == (s.guidance_scale, s.solver, s.model)
        for old, new in ((s.cond, r.cond), (s.uncond, r.uncond)):
            # every prefix [0, k/m) holds the old weak share rounded to whole steps, so any phase is within one step
            for k in range(1, m + 1):
                assert abs(new[:k].count(4) - weak_share(old, 0, k / m) * m / n) <= 0.5 + 1e-9
        assert s.resample(n) == s


def test_resample_examples():
    s = Schedule.branch_split(6, 10, 20, 4, 2, **KW)
    assert s.resample(10) == Schedule.branch_split(3, 5, 10, 4, 2, **KW)
    assert s.resample(50) == Schedule.branch_split(15, 25, 50, 4, 2, **KW)
    assert Schedule(cond=(4, 2) * 10, uncond=(4, 2) * 10, **KW).resample(10).cond.count(4) == 5  # no aliasing
    three = Schedule(cond=(8, 8, 4, 4, 4, 2, 2, 2, 2, 2), uncond=(8,) * 10, **KW).resample(5)
    assert three.cond == (8, 4, 2, 2, 2) and three.uncond == (8,) * 5
    with pytest.raises(UserError, match="cannot resample to 0 steps"):
        s.resample(0)


# ---- conversion of a diffusers DiTPipeline -----------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    original = converted_tiny_dit(root)
    pipe = FlexiDiTPipeline.from_pretrained(root / "flexi")
    pipe.set_progress_bar_config(disable=True)
    return pipe, original


def test_converted_dit_pipeline_gives_the_original_images(converted):
    pipe, original = converted
    assert pipe.transformer.config.patch_sizes == (2, 4) and pipe.get_label_ids(["goldfish", "white shark"]) == [1, 2]
    labels = [0, 2, 1]
    want = original(labels, guidance_scale=4.0, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                    output_type="np").images
    noise = randn_tensor((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))  # DiTPipeline's draw
    got = pipe(labels, guidance_scale=4.0, num_inference_steps=5, latents=noise, output_type="np").images
    assert got.shape == want.shape == (3, 8, 8, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(want - want[:1]).max() > 1e-3  # the labels matter: not a trivially constant image
    weak = pipe(labels, Schedule.static(4, 5, guidance_scale=4.0, solver="ddim", model=pipe.model_fingerprint()),
                latents=noise, output_type="np").images
    assert weak.shape == want.shape and np.isfinite(weak).all()


def test_a_stock_dit_pipeline_follows_a_schedule_as_the_flexidit_pipeline(converted):
    import dataclasses

    pipe, _ = converted
    s = Schedule(cond=(4, 4, 2, 2, 2), uncond=(4, 4, 4, 2, 2), guidance_scale=4.0, solver="ddim",
                 model=pipe.model_fingerprint())
    stock = follow_schedule(tiny_dit_pipeline(), pipe.transformer, s)  # a stock DiTPipeline, its transformer replaced
    labels = [0, 2, 1]
    want = stock(labels, guidance_scale=4.0, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    noise = randn_tensor((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))  # DiTPipeline's draw
    got = pipe(labels, s, latents=noise, output_type="np").images
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    native = pipe(labels, guidance_scale=4.0, num_inference_steps=5, latents=noise, output_type="np").images
    assert np.abs(want - native).max() > 1e-3  # the weak steps were taken
    with pytest.raises(ValueError, match="num_inference_steps=5"):
        stock(labels, guidance_scale=4.0, num_inference_steps=4)
    with pytest.raises(UserError, match="plain CFG"):
        follow_schedule(tiny_dit_pipeline(), pipe.transformer, dataclasses.replace(s, guidance_mode="weak_guidance"))
    with pytest.raises(UserError, match="on some channels needs the FlexiDiT pipelines"):
        follow_schedule(tiny_dit_pipeline(), pipe.transformer, dataclasses.replace(s, guided_channels=3))


def test_convert_refusals(tmp_path, converted):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(UserError, match="expected one of DiTPipeline, PixArtAlphaPipeline"):
        convert_pipeline(tmp_path, tmp_path / "out")
    with pytest.raises(UserError, match="not found"):
        convert_pipeline(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    assert main(["convert", str(tmp_path), str(tmp_path / "busy")]) == 2
