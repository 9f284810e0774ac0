"""Flexify on the real-model path: a converted DiTPipeline (epsilon, learned sigma, VAE) trains from an image folder
of any resolution through a reusable VAE latent cache, and writes a pipeline directory the search loads."""

import functools
import json
import math
import threading

import numpy as np
import pytest
import torch
from conftest import converted_tiny_dit, flexify_on_ray, tiny_rgb_featnet
from PIL import Image

from flexisearch.cli import main
from flexisearch.data.images import center_crop, read_image
from flexisearch.data.latents import LatentCache
from flexisearch.files import load_weights
from flexisearch.models.loading import load_model


def _folder(root, sizes=((20, 12), (8, 8), (33, 17), (9, 30), (16, 16))):
    """Two classes of RGB images of assorted sizes."""
    gen = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate(sizes):
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        arr = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(d / f"img{i}.png")
    return root


def test_center_crop_keeps_the_centre_square():
    wide = Image.new("RGB", (120, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (40, 0, 80, 20))  # red sides, blue centre
    out = np.asarray(center_crop(wide, 8))
    assert out.shape == (8, 8, 3) and (out == [0, 0, 255]).all()
    tall = Image.new("L", (5, 50), 10)
    assert center_crop(tall, 8).size == (8, 8)  # upsampled when smaller than the size


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flexify")
    original = converted_tiny_dit(root)
    _folder(root / "images")
    return root, original


def test_latent_cache_holds_the_vae_posterior_of_each_image_and_its_flip(dirs, tmp_path):
    root, original = dirs
    vae = original.vae
    calls = []
    encode = vae.encode
    vae.encode = lambda x: calls.append(len(x)) or encode(x)
    try:
        cache = LatentCache.build(root / "images", vae, 8, tmp_path, batch_size=2, shard_size=4)
        again = LatentCache.build(root / "images", vae, 8, tmp_path)
    finally:
        vae.encode = encode
    assert sum(calls) == 10 and again.directory == cache.directory  # 5 images + flips, encoded once
    assert len(cache) == 10 and len(cache.index["shards"]) == 3 and cache.labels.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    files = sorted((root / "images").glob("*/*.png"))
    x = torch.stack([read_image(p, 8) for p in files])
    with torch.no_grad():
        want = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    for i in range(5):
        for flip in (0, 1):
            row = cache._shards[(2 * i + flip) // 4].get_slice("posterior")[(2 * i + flip) % 4:(2 * i + flip) % 4 + 1]
            torch.testing.assert_close(row[0, :4].float(), want.mean[i + 5 * flip], atol=2e-3, rtol=1e-3)  # fp16
    z, y = cache.batch(torch.tensor([0, 3]), torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8) and y.tolist() == [0, 0]
    (root / "images" / "class1" / "img1.png").write_bytes((root / "images" / "class0" / "img0.png").read_bytes())  # size
    try:
        assert LatentCache.build(root / "images", vae, 8, tmp_path).directory != cache.directory  # data changed
    finally:
        _folder(root / "images")


def test_workers_share_the_cache_build_and_an_interrupted_build_resumes(dirs, tmp_path):
    root, original = dirs
    vae, calls = original.vae, []
    encode = vae.encode
    vae.encode = lambda x: calls.append(len(x)) or encode(x)
    try:
        build = functools.partial(LatentCache.build, root / "images", vae, 8, shard_size=4, poll_s=0.01)
        other = threading.Thread(target=build, args=(tmp_path / "shared",), kwargs={"rank": 1, "world": 2})
        other.start()
        shared = build(tmp_path / "shared", rank=0, world=2)
        other.join()
        assert sum(calls) == 10  # each shard encoded once, by one of the two workers
        single = build(tmp_path / "single")
        want = {name: load_weights(single.directory / name)["posterior"] for name in single.index["shards"]}
        (tmp_path / "single" / single.directory.name).rename(tmp_path / "single" / f".{single.directory.name}.partial")
        (tmp_path / "single" / f".{single.directory.name}.partial" / "shard-00001.safetensors").unlink()
        calls.clear()
        resumed = build(tmp_path / "single")
    finally:
        vae.encode = encode
    assert calls == [4]  # only the missing shard (2 images and their flips) was encoded again
    for cache in (shared, resumed):
        assert cache.index == single.index
        for name, rows in want.items():
            assert torch.equal(load_weights(cache.directory / name)["posterior"], rows)


@pytest.mark.parametrize("mode", ["lora", "shared"])
def test_flexify_a_converted_dit_pipeline_from_an_image_folder(dirs, tmp_path, mode):
    root, _ = dirs
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"batch_size": 4, "lora_rank": 2, "ckpt_every": 2, "cache_dir": str(tmp_path / "cache")}))
    out = tmp_path / "run"
    assert main(["train", "flexify", "--base", str(root / "flexi"), "--data", str(root / "images"), "--mode", mode,
                 "--steps", "3", "--config", str(cfg), "--device", "cpu", "--out", str(out)]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert (out / "model" / "model_index.json").is_file() and (out / "model" / "vae").is_dir()
    assert (out / "model" / "transformer" / "adapter.json").is_file() == (mode == "lora")  # on the base's transformer/
    base, model = load_model(str(root / "flexi")), load_model(str(out / "model"))
    assert model.config.learn_sigma and model.config.lora_rank == (2 if mode == "lora" else 0)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.tensor([0, 1])
    with torch.no_grad():
        same_native = torch.equal(model(x, t, y, 2), base(x, t, y, 2))
        assert not torch.equal(model(x, t, y, 4), base(x, t, y, 4))
    assert same_native == (mode == "lora")  # LoRA leaves the native path bit-identical
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_a_flexified_pipeline_is_searched_exported_and_reused_in_stock_diffusers(dirs, tmp_path, monkeypatch):
    """convert -> flexify (LoRA, Ray Train on 2 CPU workers) -> search 3 trials -> export ->
    DiffusionPipeline.from_pretrained(folder) with the exported schedule gives the latents of flexisearch's sample()
    for the same seeds."""
    from diffusers import DiffusionPipeline

    from flexisearch.sampling.generate import sample
    from flexisearch.sampling.schedule import Schedule

    root, _ = dirs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"batch_size": 4, "lora_rank": 2, "cache_dir": "cache"}))
    flexify_on_ray(["--base", str(root / "flexi"), "--data", str(root / "images"), "--mode", "lora", "--steps", "3",
                    "--config", "cfg.json", "--out", "run"], tmp_path)
    tiny_rgb_featnet().save_pretrained(tmp_path / "net")
    (tmp_path / "space.yaml").write_text(json.dumps({
        "study": "e2e", "model": "run/model", "feature_net": "net", "metric": {"name": "fid_native", "max": 1e6},
        "space": {"type": "branch_threshold", "num_steps": 4, "solver": "ddim"},
        "reference": {"num_steps": 4, "guidance_scale": 2.0, "solver": "ddim"}, "search_samples": 8,
        "heldout_samples": 8, "bootstrap": 5, "n_trials": 3, "cost": {"repeats": 1}}))
    assert main(["search", "--space", "space.yaml", "--quiet"]) == 0
    best = tmp_path / "runs" / "e2e" / "best.json"
    schedule = Schedule.load(best)
    assert 4 in schedule.cond + schedule.uncond  # the exported schedule runs the flexified (weak) path
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run" / "model", trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    labels, seeds = [0, 1, 2], [5, 6, 7]
    got = pipe(labels, schedule=best, seeds=seeds, output_type="latent").images
    assert torch.equal(got, sample(load_model(str(tmp_path / "run" / "model")), schedule, labels, seeds))
