"""Static native's samples kept on disk (optimize.reference_samples): sampled once per model and sample set, read
back by later evaluators, resampled when what they depend on changes or the file is damaged; the embedded default
ships its own, and they are what its model samples."""

import dataclasses

import pytest
import torch
import yaml
from conftest import random_flexidit

from flexisearch.files import asset_path
from flexisearch.optimize.config import load_search_config, run_dir, space_path
from flexisearch.optimize.evaluate import Evaluator
from flexisearch.optimize.reference_samples import FOLDER
from flexisearch.sampling.generate import sample


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    random_flexidit(size=16).save_pretrained(tmp_path / "model")
    doc = {"study": "t", "model": str(tmp_path / "model"), "space": {"type": "threshold", "num_steps": 4},
           "metric": {"name": "fid_native", "max": 5.0}, "reference": {"num_steps": 4, "guidance_scale": 2.0},
           "search_samples": 12, "heldout_samples": 10, "bootstrap": 20, "batch_size": 8}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(doc))
    return load_search_config(tmp_path / "space.yaml")


def counting(monkeypatch, evaluator_cls=Evaluator) -> list:
    """Record every schedule Evaluator.samples is asked for."""
    asked, real = [], evaluator_cls.samples

    def samples(self, schedule, sample_set, progress=False):
        asked.append((schedule, sample_set.name, len(sample_set.seeds)))
        return real(self, schedule, sample_set, progress)
    monkeypatch.setattr(evaluator_cls, "samples", samples)
    return asked


def test_static_native_is_sampled_once_then_read_back_by_a_new_evaluator(cfg, monkeypatch):
    asked = counting(monkeypatch)
    first = Evaluator(cfg)
    search, heldout = first.native_samples(first.search_set), first.native_samples(first.heldout_set)
    assert asked == [(first.reference, "search", 12), (first.reference, "heldout", 10)]
    assert len(list((run_dir(cfg) / FOLDER).glob("*.safetensors"))) == 2
    # kept in float16 and used as kept: the samples just drawn are the values read back later
    assert search.dtype == torch.float32 and torch.equal(search, search.half().float())
    # a lower fidelity is the head of the whole set's samples: nothing sampled
    assert torch.equal(first.native_samples(first.search_set.head(5)), search[:5]) and len(asked) == 2

    second = Evaluator(cfg)
    assert torch.equal(second.native_samples(second.search_set), search)
    assert torch.equal(second.native_samples(second.heldout_set), heldout)
    assert second.quality(second.reference) == first.quality(first.reference)
    assert len(asked) == 2


def test_samples_are_sampled_again_when_what_they_depend_on_changes_or_the_file_is_damaged(cfg, monkeypatch):
    asked = counting(monkeypatch)
    Evaluator(cfg).native_samples(Evaluator(cfg).search_set)
    other = Evaluator(dataclasses.replace(cfg, reference={**cfg.reference, "guidance_scale": 3.0}))
    other.native_samples(other.search_set)  # another reference schedule: another key
    assert [a[0].guidance_scale for a in asked] == [2.0, 3.0]
    more = Evaluator(dataclasses.replace(cfg, search_samples=13))  # other seeds
    more.native_samples(more.search_set)
    assert len(asked) == 3

    files = sorted((run_dir(cfg) / FOLDER).glob("*.safetensors"))
    assert len(files) == 3
    for f in files:
        f.write_bytes(b"not a safetensors file")
    fresh = Evaluator(cfg)
    again = fresh.native_samples(fresh.search_set)  # damaged: sampled again and replaced
    assert len(asked) == 4
    assert torch.equal(Evaluator(cfg).native_samples(fresh.search_set), again) and len(asked) == 4


@pytest.mark.parametrize("which", ["search_set", "heldout_set"])
def test_the_shipped_reference_samples_are_what_the_default_model_samples(tmp_path, monkeypatch, which):
    """The embedded default's first search samples no static native, on its 256 search seeds or its 1,000
    held-out seeds (a third of the model calls of `flexisearch search`): those samples ship beside the model, and
    the first of them are what the model samples now, to float16 rounding (half a float16 step: < 5e-4 for |x| < 2)."""
    monkeypatch.chdir(tmp_path)
    asked = counting(monkeypatch)
    ev = Evaluator(load_search_config(space_path(None)))  # the default search: `flexisearch search`
    sample_set = getattr(ev, which)
    kept = ev.native_samples(sample_set)
    assert asked == [] and not (run_dir(ev.cfg) / FOLDER).exists()
    assert len(list((asset_path(ev.cfg.model) / FOLDER).glob("*.safetensors"))) == 2
    assert kept.shape == (len(sample_set.seeds), *ev.model.config.sample_shape)
    head = sample_set.head(16)
    now = sample(ev.model, ev.reference, list(head.labels), list(head.seeds), batch_size=ev.cfg.batch_size)
    torch.testing.assert_close(kept[:16], now, atol=1e-3, rtol=0)
