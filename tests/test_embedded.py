"""The shipped embedded default: assets load, match their model cards, and keep their promises."""

import re
from pathlib import Path

import pytest
import torch

from flexisearch.models.dit import FlexiDiT
from flexisearch.models.loading import load_model

ASSETS = Path(__file__).resolve().parent.parent / "flexisearch" / "assets"
MODELS = ["dit-mnist16-base", "flexidit-mnist16-shared", "flexidit-mnist16-lora"]


@pytest.mark.parametrize("name", MODELS)
def test_asset_loads_and_matches_its_card(name):
    model = FlexiDiT.from_pretrained(ASSETS / name)
    card = (ASSETS / name / "MODEL_CARD.md").read_text()
    assert f"fingerprint `{model.fingerprint()}`" in card
    cfg = model.config
    assert (cfg.input_size, cfg.in_channels, cfg.num_classes, cfg.patch_size) == (16, 1, 10, 2)
    assert cfg.extra_patch_sizes == (() if name.endswith("base") else (4,))
    assert re.search(r"\d[\d,]* parameters", card) and f"{sum(p.numel() for p in model.parameters()):,}" in card


def test_assets_fit_the_size_budget():
    """Everything shipped for images and text in at most 25 MB (the LoRA model is an adapter on the base), and the
    video assets (model, FVD net, statistics, sample clips) in at most 8 MB more."""
    video = sum(f.stat().st_size for f in (ASSETS / "video").rglob("*") if f.is_file())
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total - video <= 25e6 and 1e6 < video <= 8e6
    assert (ASSETS / "flexidit-mnist16-lora" / "adapter.json").is_file()


def test_lora_flexify_kept_the_native_path_of_the_base():
    base = FlexiDiT.from_pretrained(ASSETS / "dit-mnist16-base")
    lora = load_model("embedded:flexidit-mnist16-lora")
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([999.0, 500.0, 10.0, 0.0]), torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        assert torch.equal(base(x, t, y), lora(x, t, y, 2))
        assert not torch.allclose(lora(x, t, y, 2), lora(x, t, y, 4), atol=1e-3)  # the weak path is its own


def test_unknown_embedded_name_is_a_clear_error():
    from flexisearch.errors import UserError

    with pytest.raises(UserError, match="no embedded model 'nope'.*flexidit-mnist16-lora"):
        load_model("embedded:nope")
