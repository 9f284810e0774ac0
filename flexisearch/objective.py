"""The search objective: a schedule's exact cost and its measured quality on fixed seeds.

An Objective loads the model and the quality metric once and evaluates schedules on one fixed
set of seeds and labels shared by all trials (common random numbers), reusing trajectories that
share a prefix. Held-out confirmation re-scores schedules on seeds the search never used, with
more samples and a bootstrap confidence interval.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import flops
from .errors import UserError
from .model import FlexiDiT
from .sampler import TrajectoryCache, sample
from .schedule import Schedule
from .space import SearchConfig, reference_schedule

ASSETS = Path(__file__).parent / "assets"
HELDOUT_SEED_BASE = 1_000_000  # search seeds are 0..n-1; held-out seeds start here


@dataclass(frozen=True)
class SampleSet:
    """Fixed labels and per-sample seeds (balanced over classes)."""

    name: str
    labels: tuple[int, ...]
    seeds: tuple[int, ...]

    @classmethod
    def balanced(cls, name: str, n: int, num_classes: int, seed_base: int) -> SampleSet:
        return cls(name, tuple(i % num_classes for i in range(n)), tuple(seed_base + i for i in range(n)))


def resolve_model(spec: str, device: str | torch.device = "cpu") -> FlexiDiT:
    """A FlexiDiT from 'embedded:<name>' (shipped assets), 'dit:<hub id or DiTPipeline dir>' (latent,
    with its VAE), or a directory written by save_pretrained or by `flexisearch convert`;
    text-to-image models (FlexiTextDiT) resolve through text_model."""
    from .latent import load_dit, load_pipeline_transformer
    from .text_model import resolve_text_model

    text_model = resolve_text_model(spec, device)
    if text_model is not None:
        return text_model
    if spec.startswith("dit:"):
        return load_dit(spec.split(":", 1)[1], device)
    if spec.startswith("embedded:"):
        name = spec.split(":", 1)[1]
        path = ASSETS / name
        if not path.is_dir():
            known = sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file() and p.name.startswith("flexidit"))
            raise UserError(f"model '{spec}': no embedded model '{name}' (known: {', '.join(known) or 'none'})")
        return FlexiDiT.from_pretrained(path, device)
    path = Path(spec)
    if (path / "config.json").is_file():
        return FlexiDiT.from_pretrained(path, device)
    if (path / "transformer").is_dir():
        return load_pipeline_transformer(path, device)
    raise UserError(f"model '{spec}': not an embedded name (embedded:<name>), dit:<hub id> or a FlexiDiT directory")


class Objective:
    """Evaluates schedules for one search config: cost relative to static native, and quality."""

    def __init__(self, cfg: SearchConfig, device: str | torch.device = "cpu", model: FlexiDiT | None = None):
        from .quality import load_metric

        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model if model is not None else resolve_model(cfg.model, self.device)
        mc = self.model.config
        self.fingerprint = self.model.fingerprint()
        self.decode = getattr(self.model, "decode_images", None)  # latent models: VAE decode before any metric
        self.native = mc.patch_size
        if not mc.extra_patch_sizes:
            raise UserError(f"model '{cfg.model}' has no weak patch size: flexify it first (flexisearch train flexify)")
        self.weak = cfg.space.weak_patch_size or max(mc.extra_patch_sizes)
        if self.weak not in mc.extra_patch_sizes:
            raise UserError(f"space.weak_patch_size is {self.weak}, the model has {list(mc.extra_patch_sizes)}")
        self.reference = reference_schedule(cfg, self.native, self.fingerprint)
        self.reference.check_model(mc, self.fingerprint, "reference")
        self.reference_macs = flops.schedule_macs(mc, self.reference)
        self.metric = load_metric(cfg, self.model)
        if getattr(self.model, "is_text_model", False):
            from .text_model import search_sample_sets  # distinct prompt rows for search and held-out

            self.search_set, self.heldout_set = search_sample_sets(self.model, cfg, HELDOUT_SEED_BASE)
        else:
            self.search_set = SampleSet.balanced("search", cfg.search_samples, mc.num_classes, 0)
            self.heldout_set = SampleSet.balanced("heldout", cfg.heldout_samples, mc.num_classes, HELDOUT_SEED_BASE)
        self.cache = TrajectoryCache()
        self._memo: dict[str, float] = {}
        self._native_samples: dict[str, torch.Tensor] = {}

    def samples(self, schedule: Schedule, sample_set: SampleSet, progress: bool = False) -> torch.Tensor:
        """Images of a schedule on a sample set: a latent model's samples are decoded by its VAE."""
        out = sample(self.model, schedule, list(sample_set.labels), list(sample_set.seeds),
                     batch_size=self.cfg.batch_size, cache=self.cache if sample_set.name == "search" else None,
                     cache_tag=f"{sample_set.name}|{self.fingerprint}", progress=progress)
        return self.decode(out) if self.decode is not None else out

    def cost(self, schedule: Schedule) -> dict[str, float]:
        macs = flops.schedule_macs(self.model.config, schedule)
        return {"macs": macs, "flops": 2 * macs, "fraction": macs / self.reference_macs}

    def native_samples(self, sample_set: SampleSet) -> torch.Tensor:
        """Samples of the static native reference on a sample set (the fid_native target)."""
        if sample_set.name not in self._native_samples:
            self._native_samples[sample_set.name] = self.samples(self.reference, sample_set)
        return self._native_samples[sample_set.name]

    def quality(self, schedule: Schedule, sample_set: SampleSet | None = None) -> float:
        """The metric on the search set (memoised per schedule), or on another sample set."""
        sample_set = sample_set or self.search_set
        key = f"{sample_set.name}|{json.dumps(schedule.to_dict(), sort_keys=True)}"
        if key not in self._memo:
            images = self.samples(schedule, sample_set)
            target = self.native_samples(sample_set) if self.metric.needs_native else None
            self._memo[key] = self.metric.score(images, sample_set, target)
        return self._memo[key]

    def confirm(self, schedule: Schedule, progress: bool = False) -> dict[str, Any]:
        """Held-out quality with a bootstrap 95% interval, on seeds never used during the search."""
        images = self.samples(schedule, self.heldout_set, progress=progress)
        target = self.native_samples(self.heldout_set) if self.metric.needs_native else None
        value, low, high = self.metric.score_with_ci(images, self.heldout_set, target, self.cfg.bootstrap, seed=0)
        return {"value": value, "ci95": [low, high], "n": len(self.heldout_set.seeds),
                "seeds": [self.heldout_set.seeds[0], self.heldout_set.seeds[-1]]}

    def threshold(self, reference_quality: float) -> float:
        """The quality bound: absolute, or relative to the static native schedule measured in this run."""
        m = self.cfg.metric
        if m.max is not None:
            return m.max
        if m.min is not None:
            return m.min
        return reference_quality * (1 - m.relative) if self.metric.higher_is_better else reference_quality * (1 + m.relative)

    def violation(self, quality: float, bound: float) -> float:
        """Optuna constraint value: <= 0 when the bound is met."""
        return bound - quality if self.metric.higher_is_better else quality - bound
