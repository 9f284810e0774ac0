"""Text-to-image: PixArt conversion, FLOPs with cross-attention, captions, the tiny CLIP through
torchmetrics, LoRA flexify that leaves the native path and cross-attention alone, and a short
CLIP-constrained search on the shipped assets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flexisearch.data.captions import (
    DIGITS,
    caption_text,
    captions_for,
    digit_of,
    fit_thresholds,
    measure,
    prompt_table,
    shipped_thresholds,
)
from flexisearch.errors import UserError
from flexisearch.models.flops import breakdown_macs, forward_flops
from flexisearch.models.loading import load_model_dir
from flexisearch.models.text_dit import FlexiTextDiT, FlexiTextDiTConfig
from flexisearch.optimize.sample_sets import text_sample_sets

ASSETS = Path(__file__).resolve().parent.parent / "flexisearch" / "assets"
EMBEDDED = ASSETS / "text" / "flexidit-mnist16"
CLIP_ASSET = ASSETS / "text" / "clip"


def tiny_text_model(lora_rank: int = 0, extra: tuple = (4,), seed: int = 0, rows: int = 5) -> FlexiTextDiT:
    torch.manual_seed(seed)
    cfg = FlexiTextDiTConfig(input_size=16, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=rows,
                             num_search_prompts=3, learn_sigma=False, prediction="flow", caption_channels=24,
                             text_len=7, text_encoder="test")
    m = FlexiTextDiT(cfg, [f"caption {i}" for i in range(rows)] + [""])
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
        m.prompt_embeds.normal_()
        m.prompt_mask.copy_((torch.arange(7)[None] < torch.randint(1, 8, (rows + 1, 1))).float())
    return m.with_patch_sizes(extra, init_std=0.05, lora_rank=lora_rank, lora_alpha=float(lora_rank)).eval() if extra else m.eval()


# ---- PixArt conversion -------------------------------------------------------------------------

def tiny_pixart(interpolation_scale, learned_sigma: bool = True, seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=8 if learned_sigma else 4, num_layers=2, sample_size=8, patch_size=2,
                                 cross_attention_dim=16, caption_channels=12, norm_num_groups=1,
                                 interpolation_scale=interpolation_scale, use_additional_conditions=False).eval()
    with torch.no_grad():  # nothing zero-initialised, so every weight matters
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("interpolation_scale", [None, 0.5, 2])
@pytest.mark.parametrize("learned_sigma", [True, False])
def test_pixart_conversion_is_exact_at_native(interpolation_scale, learned_sigma):
    from flexisearch.models.convert import from_diffusers_pixart

    ref = tiny_pixart(interpolation_scale, learned_sigma)
    flexi = from_diffusers_pixart(ref, text_len=5)
    assert flexi.config.interpolation_scale == (interpolation_scale or 1)
    assert flexi.config.learn_sigma == learned_sigma
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 421.0, 999.0])
    text = torch.randn(3, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask).sample
        got = flexi.forward_text(x, t, text, mask)
        # Through the prompt table: rows are the three captions, then the null row.
        flexi.set_prompts(text, mask, ["a", "b", "c"], torch.zeros(1, 12), torch.ones(1))
        via_table = flexi(x, t, torch.tensor([0, 1, 2]))
    assert (got - want).abs().max().item() <= 1e-5
    assert (via_table - want).abs().max().item() <= 1e-5
    weak = flexi.with_patch_sizes((4,))  # PI-resize at init: runs, with 4x fewer tokens
    assert weak(x, t, torch.tensor([0, 1, 3]), 4).shape == want.shape


def test_pixart_conversion_refuses_additional_conditions():
    from diffusers import PixArtTransformer2DModel

    from flexisearch.models.convert import from_diffusers_pixart

    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=1, sample_size=8, cross_attention_dim=16, caption_channels=12,
                                 norm_num_groups=1, use_additional_conditions=True)
    with pytest.raises(UserError, match="use_additional_conditions"):
        from_diffusers_pixart(m)


# ---- FLOPs ---------------------------------------------------------------------------------------

def counted_flops(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("lora_rank", [0, 4])
@pytest.mark.parametrize("p", [2, 4])
def test_text_flops_match_flop_counter(lora_rank, p):
    m = tiny_text_model(lora_rank)
    x, t, y = torch.randn(1, 1, 16, 16), torch.tensor([10.0]), torch.tensor([1])
    first = counted_flops(lambda: m(x, t, y, p))  # a weak size's first forward also forms its kernels
    assert counted_flops(lambda: m(x, t, y, p)) == forward_flops(m.config, p) and (first > forward_flops(m.config, p)) == (p != 2)
    macs = breakdown_macs(m.config, p)
    n, d, length = (16 // p) ** 2, 32, 7
    assert macs["cross_kv"] == 2 * length * 2 * d * d and macs["cross_scores"] == 2 * n * length * d
    assert macs["adaln"] == 0 and macs["adaln_single"] == 6 * d * d and macs["final_adaln"] == 0


# ---- captions ------------------------------------------------------------------------------------

def stroke(width: int, slant: float = 0.0, length: int = 10) -> torch.Tensor:
    """A vertical bar (x = 8 + slant * (centre - y)) of the given width on a 16x16 canvas, in [-1, 1]."""
    img = -torch.ones(1, 1, 16, 16)
    for y in range(3, 3 + length):
        x = round(7 + slant * (3 + length / 2 - y))
        img[0, 0, y, x:x + width] = 1.0
    return img


def test_measurements_follow_the_pixels():
    # Monotone in the stroke width (about w from 2 px up; a 1-px stroke reads ~1.7 because central
    # differences spread each edge over two pixels; the captions only use the ranking, by tertiles).
    widths = [float(measure(stroke(w))["thickness"]) for w in (1, 2, 3, 4)]
    assert widths == sorted(widths) and widths[3] == pytest.approx(3.0, abs=0.1)
    right, left, upright = measure(stroke(2, 0.4)), measure(stroke(2, -0.4)), measure(stroke(2))
    assert right["slant"] > 0.25 > abs(upright["slant"]) and left["slant"] < -0.25
    assert measure(stroke(2, length=12))["size"] > measure(stroke(2, length=6))["size"]


def test_captions_are_deterministic_and_match_shipped_thresholds():
    from flexisearch.data.images import load_mnist

    images, labels = load_mnist(16, "train")
    th = fit_thresholds(images, labels)
    assert th == shipped_thresholds()
    caps = captions_for(images[:50], labels[:50])
    assert caps == captions_for(images[:50], labels[:50])
    assert all(digit_of(c) == int(y) for c, y in zip(caps, labels[:50]))
    assert caps[0].startswith("a ") and caps[0].count(",") == 2
    assert caption_text({"digit": "seven", "thickness": "thick", "slant": "right-slanted", "size": "large"}) == \
        "a thick, right-slanted, large seven"
    # Per-digit tertiles: every digit's captions use all three thickness words, about a third each.
    all_caps = captions_for(images, labels)
    for d in range(10):
        words = [c.split(",")[0][2:] for c, y in zip(all_caps, labels) if y == d]
        assert {w: words.count(w) for w in set(words)}.keys() == {"thin", "regular", "thick"}
        assert min(words.count(w) for w in set(words)) > 100
    with pytest.raises(UserError, match="fitted on 16px"):
        captions_for(torch.zeros(1, 1, 8, 8), torch.tensor([0]))


def test_prompt_table_is_balanced_and_held_out_rows_are_new():
    train = [caption_text({"digit": DIGITS[i % 10], "thickness": w, "slant": "upright", "size": "small"})
             for i in range(60) for w in ("thin", "thick", "regular")[: 3 if i < 10 else 2]]  # "regular" is rarer
    held = [caption_text({"digit": DIGITS[i % 10], "thickness": w, "slant": "upright", "size": "small"})
            for i in range(30) for w in ("thin", "regular")]
    table, n = prompt_table(train, held, per_digit=2)
    assert n == 20 and [digit_of(c) for c in table[:10]] == list(range(10))
    assert not any("regular" in c for c in table[:n])  # the most frequent captions per digit are the search rows
    # Held-out rows: only captions that are not search rows ("regular" ones), again cycling over digits.
    assert not set(table[n:]) & set(table[:n]) and [digit_of(c) for c in table[n:]] == list(range(10))


# ---- the model: prompt table, save/load, LoRA flexify -----------------------------------------------

def test_prompt_table_interface_and_roundtrip(tmp_path):
    m = tiny_text_model(lora_rank=4)
    assert m.null_class == m.config.num_classes == 5
    assert m.prompt_rows("search") == [0, 1, 2] and m.prompt_rows("heldout") == [3, 4]
    search, held = text_sample_sets(m, 7, 4)
    assert search.labels == (0, 1, 2, 0, 1, 2, 0) and held.labels == (3, 4, 3, 4) and held.seeds[0] == 1_000_000
    m.save_pretrained(tmp_path / "m")
    back = load_model_dir(tmp_path / "m")
    assert isinstance(back, FlexiTextDiT) and back.captions == m.captions and back.fingerprint() == m.fingerprint()
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([5.0, 600.0]), torch.tensor([1, 5])
    for p in (2, 4):
        assert torch.equal(back(x, t, y, p), m(x, t, y, p))
    # A new prompt table changes what the model is conditioned on, not the network's fingerprint.
    fp = m.fingerprint()
    m.set_prompts(torch.randn(3, 4, 24), torch.ones(3, 4), ["u", "v", "w"], torch.randn(2, 24), torch.ones(2), 2)
    assert m.fingerprint() == fp and m.config.num_classes == 3 and m.null_class == 3 and m.captions[-1] == ""
    with pytest.raises(UserError, match="prompt table"):
        m.set_prompts(torch.randn(3, 9, 24), torch.ones(3, 9), ["u", "v", "w"], torch.randn(2, 24), torch.ones(2))


def test_lora_flexify_keeps_native_bit_identical_and_cross_attention_frozen():
    from flexisearch.training.objectives import FlowObjective

    base = tiny_text_model(extra=())
    model = base.with_patch_sizes((4,), init_std=0.02, lora_rank=4, lora_alpha=4.0)
    for block in model.blocks:  # LoRA on self-attention and MLP only; cross-attention cannot carry adapters
        assert all(len(lin.lora_a) == 1 for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2))
        assert not any("lora" in n for n, _ in block.cross_attn.named_parameters())
    new = [p for n, p in model.named_parameters() if "residual" in n or "patch_size_embed" in n or "lora_" in n]
    ids = {id(p) for p in new}
    for p in model.parameters():
        if id(p) not in ids:
            p.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in ids}
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([10.0, 300.0, 700.0, 990.0]), torch.tensor([0, 2, 4, 5])
    with torch.no_grad():
        native_before, weak_before = model(x, t, y, 2), model(x, t, y, 4)
    opt = torch.optim.AdamW(new, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # the distillation step of training.text_dit.train_text_flexify
        noised = FlowObjective(1, False).noised(torch.randn(8, 1, 16, 16), gen)
        xt, tt = noised.xt, noised.t
        yy = torch.randint(0, 6, (8,), generator=gen)
        with torch.no_grad():
            teacher = model(xt, tt, yy, 2)
        loss = ((model(xt, tt, yy, 4) - teacher) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert torch.equal(model(x, t, y, 2), native_before)
        assert torch.equal(base(x, t, y, 2), native_before)
        assert not torch.equal(model(x, t, y, 4), weak_before)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(".cross_attn." in n for n in frozen)


# ---- the tiny CLIP through torchmetrics ------------------------------------------------------------

def test_random_clip_loads_through_torchmetrics_callable(tmp_path):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel

    from flexisearch.metrics.tiny_clip import (
        build_tokenizer,
        load_clip,
        per_sample_scores,
        save_clip,
        tiny_clip_config,
    )

    torch.manual_seed(0)
    save_clip(CLIPModel(tiny_clip_config(len(build_tokenizer()), hidden=32, layers=1, heads=2, projection_dim=16)),
              tmp_path / "clip")
    metric = CLIPScore(model_name_or_path=lambda: load_clip(tmp_path / "clip"))
    images = torch.rand(6, 1, 16, 16) * 2 - 1
    caps = ["a thick, upright, small seven", "a one", "a thin two", "a regular three", "a large four", "a five"]
    metric.update(list((images + 1) * 127.5), caps)
    value = float(metric.compute())
    model, processor = load_clip(tmp_path / "clip")
    scores = per_sample_scores(model, processor, images, caps)
    assert value == pytest.approx(max(scores.mean().item(), 0.0), abs=1e-4)
    assert model.get_text_features(torch.tensor([[2, 4, 3]])).shape == (1, 16)  # tensors, not output objects


def test_shipped_clip_model_card():
    card = json.loads((CLIP_ASSET / "model_card.json").read_text())
    assert card["zero_shot_digit_accuracy"] >= 0.9
    assert card["clip_score"]["real"] > card["clip_score"]["shuffled"]


# ---- a short text search on the shipped assets ------------------------------------------------------

def _search_cfg(tmp_path, **over):
    import yaml

    from flexisearch.optimize.config import load_search_config

    doc = {"study": "text-t", "model": "embedded:text/flexidit-mnist16",
           "space": {"type": "threshold", "num_steps": 6, "guidance_scale": 2.0},
           "metric": {"name": "clip", "relative": 0.1}, "reference": {"num_steps": 6, "guidance_scale": 2.0},
           "search_samples": 30, "heldout_samples": 40, "bootstrap": 20, "n_trials": 5, "batch_size": 64,
           "storage": f"sqlite:///{tmp_path / 'study.db'}", "cost": {"repeats": 1}, **over}
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p, load_search_config(p)


def test_short_text_search_on_shipped_assets(tmp_path, monkeypatch):
    """The shipped text model searched through the CLI: disjoint search and held-out prompts, a CLIP bound."""
    from flexisearch.cli import main
    from flexisearch.models.text_dit import FlexiTextDiT
    from flexisearch.optimize.evaluate import Evaluator

    monkeypatch.chdir(tmp_path)
    path, cfg = _search_cfg(tmp_path)
    evaluator = Evaluator(cfg)  # the search config names the shipped text model
    assert isinstance(evaluator.model, FlexiTextDiT)
    # Search and held-out prompts are distinct rows of the table, with distinct captions.
    search_rows, held_rows = set(evaluator.search_set.labels), set(evaluator.heldout_set.labels)
    assert search_rows and held_rows and not search_rows & held_rows
    caps = evaluator.model.captions
    assert not {caps[y] for y in search_rows} & {caps[y] for y in held_rows}
    assert evaluator.metric.name == "clip" and evaluator.metric.higher_is_better
    assert main(["search", "--space", str(path), "--quiet"]) == 0
    best = json.loads((tmp_path / "runs" / "text-t" / "best.json").read_text())
    value, (low, high) = best["quality"]["heldout"]["value"], best["quality"]["heldout"]["ci95"]
    assert best["quality"]["metric"] == "clip" and low <= value <= high
    assert best["cost"]["fraction_of_static_native"] <= 1.0
    assert best["quality"]["search"] >= best["constraint"]["bound"]  # CLIP: higher is better, bounded below


def test_clip_metric_refuses_class_models():
    from conftest import random_flexidit

    from flexisearch.metrics.clip import load_clip_metric
    from flexisearch.optimize.config import load_search_config

    cfg = load_search_config(None, {"metric": {"name": "clip", "relative": 0.05}})
    with pytest.raises(UserError, match="text-conditioned"):
        load_clip_metric(cfg, random_flexidit(size=16))


def test_shipped_text_spaces_validate():
    from flexisearch.optimize.config import load_search_config

    root = Path(__file__).resolve().parent.parent / "search_spaces"
    for name in ("text-default.yaml", "pixart-alpha-256.yaml"):
        cfg = load_search_config(root / name)
        assert cfg.metric.name == "clip"
    assert dataclasses.is_dataclass(cfg)
