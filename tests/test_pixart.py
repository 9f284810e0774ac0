"""The text-to-image real-model path on a tiny PixArtAlphaPipeline of the public classes (PixArtTransformer2DModel
with learned sigma, T5EncoderModel, AutoencoderKL, DPM-Solver++): conversion, the text-to-image pipeline and stock
diffusers reuse, captions and the prompt cache, and convert -> flexify (Ray Train) -> search -> export -> reuse."""

import dataclasses
import json

import pytest
import torch
from conftest import (
    converted_tiny_pixart,
    flexify_on_ray,
    tiny_pixart_pipeline,
    tiny_rgb_featnet,
)
from PIL import Image

from flexisearch.cli import main
from flexisearch.data.images import captioned_files
from flexisearch.data.prompts import PromptCache
from flexisearch.errors import UserError
from flexisearch.models.loading import load_model
from flexisearch.models.text_encoder import encode_with, set_model_prompts
from flexisearch.sampling.follow import follow_schedule
from flexisearch.sampling.generate import sample
from flexisearch.sampling.schedule import Schedule
from flexisearch.sampling.text_pipeline import FlexiTextDiTPipeline

PROMPTS = ["a red fox", "a blue cat in the snow", "a green dog"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """root/pixart (a saved PixArtAlphaPipeline), root/flexi (converted), root/images (captioned, any size)."""
    root = tmp_path_factory.mktemp("pixart")
    original = converted_tiny_pixart(root)
    images = root / "images"
    images.mkdir()
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i, (w, h) in enumerate([(20, 12), (8, 8), (33, 17), (9, 30)]):
        arr = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(images / f"img{i}.png")
        lines.append(json.dumps({"file_name": f"img{i}.png", "text": (PROMPTS + PROMPTS)[i]}))
    (images / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root, original


def _pipe(path) -> FlexiTextDiTPipeline:
    pipe = FlexiTextDiTPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock(pipe, prompts, steps, scale, seed, negative_prompt=""):
    """A stock PixArtAlphaPipeline call (sizes as configured; no caption cleaning: no bs4/ftfy offline)."""
    return pipe(prompts, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=scale,
                generator=torch.Generator().manual_seed(seed), output_type="latent", use_resolution_binning=False,
                clean_caption=False).images


def test_converted_pixart_pipeline_gives_the_stock_pipelines_images(dirs):
    from diffusers import DiffusionPipeline

    root, original = dirs
    pipe = _pipe(root / "flexi")
    for negative in ("", "a dog"):
        got = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, negative_prompt=negative,
                   generator=torch.Generator().manual_seed(0), output_type="latent").images
        # the stock pipeline encodes prompts and negative prompts in two T5 calls, ours in one: float rounding only
        assert torch.allclose(got, _stock(original, PROMPTS, 4, 3.0, 0, negative), rtol=1e-5, atol=1e-4)
    stock = DiffusionPipeline.from_pretrained(root / "flexi", trust_remote_code=True)  # model_index.json names the class
    assert type(stock) is FlexiTextDiTPipeline and type(stock.text_encoder).__name__ == "T5EncoderModel"
    stock.set_progress_bar_config(disable=True)
    seeds = [3, 4, 5]
    assert torch.equal(stock(PROMPTS, num_inference_steps=4, seeds=seeds, output_type="latent").images,
                       pipe(PROMPTS, num_inference_steps=4, seeds=seeds, output_type="latent").images)
    images = pipe(PROMPTS[0], num_inference_steps=2).images
    assert len(images) == 1 and images[0].size == (8, 8)
    with pytest.raises(ValueError, match="negative_prompt"):
        pipe(PROMPTS, negative_prompt=["x", "y", "z"])
    given = FlexiTextDiTPipeline.from_pretrained(root / "flexi", text_encoder=original.text_encoder)  # one replaced
    assert given.text_encoder is original.text_encoder and given.tokenizer is not None
    with pytest.raises(UserError, match="cannot be downloaded"):
        FlexiTextDiTPipeline.from_pretrained("no-such-user/no-such-pixart")  # offline in the tests


def test_the_pipeline_call_leaves_the_models_prompt_table(dirs):
    root, _ = dirs
    pipe = _pipe(root / "flexi")
    model = pipe.transformer
    embeds, mask = pipe.encode_prompt(["a red cat", "a blue sky", ""])
    model.set_prompts(embeds[:2], mask[:2], ["a red cat", "a blue sky"], embeds[2], mask[2])
    before = (model.prompt_embeds.clone(), model.captions, model.config)
    pipe(PROMPTS, num_inference_steps=2, output_type="latent")
    assert torch.equal(model.prompt_embeds, before[0]) and model.captions == before[1] and model.config == before[2]


def test_pipeline_with_seeds_equals_the_library_sampler_and_a_stock_pixart_pipeline_follows_the_schedule(dirs):
    root, _ = dirs
    pipe = _pipe(root / "flexi")
    model = load_model(str(root / "flexi"))  # the search's loader: the folder's T5 as encode_prompts
    set_model_prompts(model, PROMPTS)
    s = Schedule(cond=(4, 4, 2, 2), uncond=(4, 4, 4, 2), guidance_scale=3.0, solver="dpm++",
                 model=model.fingerprint())
    seeds = [5, 6, 7]
    got = pipe(PROMPTS, schedule=s, seeds=seeds, output_type="latent").images
    assert torch.equal(got, sample(model, s, [0, 1, 2], seeds))
    want = pipe(PROMPTS, schedule=s, generator=torch.Generator().manual_seed(1), output_type="latent").images
    stock = follow_schedule(tiny_pixart_pipeline(), pipe.transformer, s)  # its T5 encodes prompts one call per branch
    assert torch.allclose(_stock(stock, PROMPTS, 4, 3.0, 1), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="plain CFG"):
        follow_schedule(tiny_pixart_pipeline(), pipe.transformer, dataclasses.replace(s, guidance_mode="weak_guidance"))
    with pytest.raises(UserError, match="PixArtAlphaPipeline with a FlexiTextDiT"):
        follow_schedule(tiny_pixart_pipeline(), torch.nn.Linear(1, 1), s)


def test_captions_jsonl_pairs_images_with_caption_rows_and_names_bad_lines(dirs, tmp_path):
    root, _ = dirs
    files, captions = captioned_files(root / "images")
    assert captions == sorted(set(PROMPTS))
    assert [(f.name, captions[row]) for f, row in files] == [(f"img{i}.png", (PROMPTS + PROMPTS)[i]) for i in range(4)]
    for text, field in (('{"file_name": "x.png"}', "'text'"), ("not json", "'text'"),
                        ('{"file_name": "missing.png", "text": "a"}', "not found")):
        (tmp_path / "captions.jsonl").write_text('\n' + text + '\n')
        with pytest.raises(UserError, match=f"line 2: .*{field}"):
            captioned_files(tmp_path)


def test_prompt_cache_holds_each_captions_real_tokens_and_is_built_once(dirs, tmp_path):
    root, original = dirs
    calls = []

    def encode(captions):
        calls.append(list(captions))
        return encode_with(original.tokenizer, original.text_encoder, captions, 10)

    cache = PromptCache.build(PROMPTS, encode, 10, "t5-tiny", tmp_path, batch_size=2)
    again = PromptCache.build(PROMPTS, encode, 10, "t5-tiny", tmp_path)
    assert calls == [PROMPTS[:2], [PROMPTS[2], ""]] and again.path == cache.path  # encoded once, in batches
    assert len(cache) == 4 and cache.null_row == 3
    embeds, mask = cache.rows(torch.tensor([2, 3, 0]))
    want, want_mask = encode_with(original.tokenizer, original.text_encoder, [PROMPTS[2], "", PROMPTS[0]], 10)
    assert torch.equal(mask, want_mask) and mask[1].sum() == 1  # the empty caption: its end-of-sequence token
    assert torch.allclose(embeds * mask[..., None], (want * want_mask[..., None]).half().float())
    other = PromptCache.build(PROMPTS, encode, 10, "another encoder", tmp_path)
    assert other.path != cache.path and calls[2:] == [[*PROMPTS, ""]]  # another encoder: encoded again


def test_convert_flexify_with_ray_train_search_export_and_reuse_in_stock_diffusers(dirs, tmp_path, monkeypatch):
    """convert -> flexify (LoRA with Ray Train on 2 CPU workers; shared in one process) -> search 3 trials ->
    export -> DiffusionPipeline.from_pretrained(folder) with the exported schedule gives sample()'s latents."""
    from diffusers import DiffusionPipeline

    root, _ = dirs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"batch_size": 4, "lora_rank": 2, "cache_dir": "cache",
                                                   "ckpt_every": 2}))
    common = ["--base", str(root / "flexi"), "--data", str(root / "images"), "--steps", "3", "--config", "cfg.json"]
    flexify_on_ray([*common, "--mode", "lora", "--out", "lora"], tmp_path)
    assert main(["train", "flexify", *common, "--mode", "shared", "--out", "shared"]) == 0
    base = load_model(str(root / "flexi"))
    x, t, rows = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.tensor([0, 1])
    for mode in ("lora", "shared"):
        model = load_model(f"{mode}/model")
        assert (tmp_path / mode / "model" / "transformer" / "adapter.json").is_file() == (mode == "lora")
        for m in (model, base):
            set_model_prompts(m, PROMPTS[:2])
        with torch.no_grad():
            assert torch.equal(model(x, t, rows, 2), base(x, t, rows, 2)) == (mode == "lora")  # LoRA: native unchanged
            assert not torch.equal(model(x, t, rows, 4), base(x, t, rows, 4))
    assert len(list((tmp_path / "cache").glob("prompts-*.safetensors"))) == 1  # both runs: one prompt cache

    tiny_rgb_featnet().save_pretrained(tmp_path / "net")
    (tmp_path / "prompts.txt").write_text("a red fox\na blue cat\na green dog in the snow\na red cat in the grass\n")
    (tmp_path / "space.yaml").write_text(json.dumps({
        "study": "e2e", "model": "lora/model", "feature_net": "net", "prompts": "prompts.txt",
        "metric": {"name": "fid_native", "max": 1e6}, "space": {"type": "branch_threshold", "num_steps": 4,
                                                                "solver": "dpm++"},
        "reference": {"num_steps": 4, "guidance_scale": 2.0, "solver": "dpm++"}, "search_samples": 8,
        "heldout_samples": 8, "bootstrap": 5, "n_trials": 3, "cost": {"repeats": 1}}))
    assert main(["search", "--space", "space.yaml", "--quiet"]) == 0
    best = tmp_path / "runs" / "e2e" / "best.json"
    schedule = Schedule.load(best)
    assert 4 in schedule.cond + schedule.uncond  # the exported schedule runs the flexified (weak) path
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "lora" / "model", trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["a blue cat", "a red cat in the grass"], [5, 6]
    got = pipe(prompts, schedule=best, seeds=seeds, output_type="latent").images
    model = load_model(str(tmp_path / "lora" / "model"))
    set_model_prompts(model, prompts)
    assert torch.equal(got, sample(model, schedule, [0, 1], seeds))
