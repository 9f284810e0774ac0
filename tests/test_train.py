import json

import pytest
import torch

from flexisearch.cli import main
from flexisearch.errors import UserError
from flexisearch.models.dit import FlexiDiT
from flexisearch.training.dit import (
    BaseTrainConfig,
    FlexifyConfig,
    train_base,
    train_flexify,
)
from flexisearch.training.loop import read_config

TINY = dict(data="digits8", image_size=8, hidden_size=32, depth=2, num_heads=2, batch_size=32, ckpt_every=10, lr=2e-3)


def _losses(path):
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    train_base(BaseTrainConfig(steps=60, warmup=5, **TINY), out)
    return out


def test_pretraining_lowers_loss_and_saves(base_dir):
    losses = _losses(base_dir / "loss.jsonl")
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    model = FlexiDiT.from_pretrained(base_dir / "model")
    assert model.config.input_size == 8 and model.config.num_classes == 10 and model.config.extra_patch_sizes == ()


def test_resume_continues_where_it_stopped(tmp_path):
    cfg = BaseTrainConfig(steps=20, warmup=5, **TINY)
    train_base(cfg, tmp_path / "a")
    # a run stopped after 10 steps, then resumed, ends with the same weights as the uninterrupted run
    import flexisearch.training.loop as tr

    class Stop(Exception):
        pass

    orig = tr.Checkpoint.save

    def save_then_stop(self, step, *a, **k):
        orig(self, step, *a, **k)
        if step == 10:
            raise Stop

    tr.Checkpoint.save = save_then_stop
    try:
        with pytest.raises(Stop):
            train_base(cfg, tmp_path / "b")
    finally:
        tr.Checkpoint.save = orig
    train_base(cfg, tmp_path / "b")
    a, b = FlexiDiT.from_pretrained(tmp_path / "a" / "raw"), FlexiDiT.from_pretrained(tmp_path / "b" / "raw")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert len(_losses(tmp_path / "b" / "loss.jsonl")) == 20


@pytest.mark.parametrize("mode", ["shared", "lora"])
def test_flexify_lowers_weak_loss(base_dir, tmp_path, mode):
    cfg = FlexifyConfig(base=str(base_dir / "model"), data="digits8", mode=mode, steps=40, batch_size=32,
                        lora_rank=4, ckpt_every=20)
    model = train_flexify(cfg, tmp_path)
    losses = _losses(tmp_path / "loss.jsonl")
    assert sum(losses[-10:]) < sum(losses[:10])
    assert model.config.extra_patch_sizes == (4,)
    base = FlexiDiT.from_pretrained(base_dir / "model")
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4) * 1000, torch.tensor([0, 1, 2, 10])
    with torch.no_grad():
        same = torch.equal(base(x, t, y), model(x, t, y))
    assert same == (mode == "lora")  # distillation leaves the native path bit-identical; shared weights move it
    saved = FlexiDiT.from_pretrained(tmp_path / "model")
    assert saved.fingerprint() == model.fingerprint()
    assert (tmp_path / "model" / "adapter.json").is_file() == (mode == "lora")  # LoRA: an adapter on the base


def test_lora_adapter_names_its_base_by_place_and_fingerprint(base_dir, tmp_path):
    import shutil

    base = FlexiDiT.from_pretrained(base_dir / "model")
    shutil.copytree(base_dir / "model", tmp_path / "base")
    model = base.with_patch_sizes((4,), init_std=0.05, lora_rank=4, lora_alpha=4.0)
    model.save_adapter(tmp_path / "adapter", base, str(tmp_path / "base"))
    weights = (tmp_path / "adapter" / "adapter.safetensors").stat().st_size
    assert weights < (tmp_path / "base" / "model.safetensors").stat().st_size / 2
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    assert json.loads((tmp_path / "adapter" / "adapter.json").read_text())["base"] == "../base"  # relative: movable
    (tmp_path / "sub").mkdir()
    shutil.move(tmp_path / "adapter", tmp_path / "sub" / "adapter")  # its base is no longer at ../base
    with pytest.raises(UserError, match="model directory not found"):
        FlexiDiT.from_pretrained(tmp_path / "sub" / "adapter")
    shutil.move(tmp_path / "sub" / "adapter", tmp_path / "adapter")
    back = FlexiDiT.from_pretrained(tmp_path / "adapter")
    assert back.fingerprint() == model.fingerprint()
    other = FlexiDiT.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    other.save_pretrained(tmp_path / "base")  # the base changed since: the adapter is refused
    with pytest.raises(UserError, match="the adapter was made for") as e:
        FlexiDiT.from_pretrained(tmp_path / "adapter")
    assert "\n" not in str(e.value)


def test_bad_inputs_are_one_line_errors(base_dir, tmp_path, capsys):
    cases = [
        (["train", "base", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "nope")], "data folder not found"),
        (["train", "flexify", "--out", str(tmp_path / "y"), "--base", str(tmp_path / "nope")], "not an embedded name"),
    ]
    from PIL import Image

    for c in range(11):  # 11 classes for a 10-class model
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "imgs" / f"c{c}" / "a.png")
    cases.append((["train", "flexify", "--out", str(tmp_path / "y"), "--base", str(base_dir / "model"), "--data",
                   str(tmp_path / "imgs")], "does not fit data"))
    import shutil

    shutil.copytree(base_dir / "model", tmp_path / "other")
    cfg = json.loads((tmp_path / "other" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 16}))
    cases.append((["train", "flexify", "--out", str(tmp_path / "y"), "--base", str(tmp_path / "other")],
                  "config expects"))
    bad_cfg = tmp_path / "bad.json"
    bad_cfg.write_text(json.dumps({"stepz": 3}))
    cases.append((["train", "base", "--out", str(tmp_path / "z"), "--config", str(bad_cfg)], "unknown key 'stepz'"))
    bad_cfg2 = tmp_path / "bad2.json"
    bad_cfg2.write_text(json.dumps({"steps": "many"}))
    cases.append((["train", "base", "--out", str(tmp_path / "z"), "--config", str(bad_cfg2)], "key 'steps'"))
    for argv, expect in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert expect in err and "\n" not in err and "Traceback" not in err


def test_resume_with_another_config_is_refused(base_dir, tmp_path):
    train_base(BaseTrainConfig(steps=10, warmup=5, **TINY), tmp_path)
    with pytest.raises(UserError, match="another config"):
        train_base(BaseTrainConfig(steps=10, warmup=5, **{**TINY, "hidden_size": 16}), tmp_path)


def test_config_from_json_types(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"steps": 5, "lr": 1}))
    cfg = read_config(BaseTrainConfig, p, {"seed": 3})
    assert cfg.steps == 5 and cfg.lr == 1.0 and cfg.seed == 3
    with pytest.raises(UserError, match="not found"):
        read_config(BaseTrainConfig, tmp_path / "missing.json", {})


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less(base_dir):
    model = FlexiDiT.from_pretrained(base_dir / "model").with_patch_sizes((4,), init_std=0.05).train()
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4) * 1000, torch.tensor([0, 1, 2, 10])

    def step(checkpointing: bool) -> tuple[float, list, int]:
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        kept = []  # elements autograd keeps for the backward pass
        with torch.autograd.graph.saved_tensors_hooks(lambda a: kept.append(a.numel()) or a, lambda a: a):
            loss = (model(x, t, y, 4) ** 2).mean()
        loss.backward()
        return loss.item(), [p.grad for p in model.parameters()], sum(kept)

    loss, grads, kept = step(False)
    loss_ckpt, grads_ckpt, kept_ckpt = step(True)
    assert loss_ckpt == loss and kept_ckpt < kept / 2
    for a, b in zip(grads, grads_ckpt):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)
