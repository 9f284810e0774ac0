"""Test environment: offline, no Ray telemetry, temp dirs under the work tree; tiny shared models."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TMPDIR", str(Path(__file__).resolve().parent.parent / ".work" / "ray"))
torch.set_num_threads(min(2, torch.get_num_threads()))


def random_flexidit(prediction: str = "flow", learn_sigma: bool = False, size: int = 8, extra: tuple = (4,),
                    lora_rank: int = 0, seed: int = 0):
    """A tiny FlexiDiT with all weights random (nothing zero-initialised), with weak sizes added."""
    from flexisearch.model import FlexiDiT, FlexiDiTConfig

    torch.manual_seed(seed)
    m = FlexiDiT(FlexiDiTConfig(input_size=size, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3,
                                learn_sigma=learn_sigma, prediction=prediction))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.with_patch_sizes(extra, init_std=0.05, lora_rank=lora_rank, lora_alpha=float(lora_rank)).eval()


@pytest.fixture
def tiny_model():
    return random_flexidit()
