"""The fixed sample sets of a search: labels (classes or prompt rows) and one seed per sample.

Every trial samples the same search set (common random numbers: seeds 0..n-1); the held-out set
(seeds from HELDOUT_SEED_BASE) is used only to confirm results. A class-conditional model's sets
are balanced over classes; a text model's search set cycles over its search prompt rows and its
held-out set over the held-out rows, so held-out prompts are never seen during the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..models.flexible import FlexibleDiT
from ..models.text_dit import FlexiTextDiT
from ..models.text_encoder import read_prompt_file, set_model_prompts

HELDOUT_SEED_BASE = 1_000_000  # search seeds are 0..n-1; held-out seeds start here


@dataclass(frozen=True)
class SampleSet:
    """Fixed labels and per-sample seeds."""

    name: str
    labels: tuple[int, ...]
    seeds: tuple[int, ...]

    def head(self, n: int) -> SampleSet:
        """The first n samples: a lower fidelity of the same set (each sample depends on its seed and label only)."""
        return SampleSet(self.name, self.labels[:n], self.seeds[:n])

    @classmethod
    def balanced(cls, name: str, n: int, num_classes: int, seed_base: int) -> SampleSet:
        return cls(name, tuple(i % num_classes for i in range(n)), tuple(seed_base + i for i in range(n)))


def text_sample_sets(model: FlexiTextDiT, n_search: int, n_heldout: int) -> tuple[SampleSet, SampleSet]:
    """(search, heldout) over the search and the held-out prompt rows. Rows are ordered so that
    consecutive rows cycle through the digits, so any prefix is balanced over classes."""
    s, h = model.prompt_rows("search"), model.prompt_rows("heldout")
    return (SampleSet("search", tuple(s[i % len(s)] for i in range(n_search)), tuple(range(n_search))),
            SampleSet("heldout", tuple(h[i % len(h)] for i in range(n_heldout)),
                      tuple(HELDOUT_SEED_BASE + i for i in range(n_heldout))))


def search_sample_sets(model: FlexibleDiT, cfg: Any) -> tuple[SampleSet, SampleSet]:
    """(search, heldout) sample sets of a search config; a text model first gets cfg.prompts (a prompt
    file, text_encoder.read_prompt_file) as its prompt table, if given."""
    if not model.is_text_model:
        return (SampleSet.balanced("search", cfg.search_samples, model.config.num_classes, 0),
                SampleSet.balanced("heldout", cfg.heldout_samples, model.config.num_classes, HELDOUT_SEED_BASE))
    if cfg.prompts:
        captions, num_search = read_prompt_file(cfg.prompts)
        set_model_prompts(model, captions, num_search)
    if model.config.num_classes < 1:
        raise UserError(f"model '{cfg.model}' has an empty prompt table: give a prompt file (key 'prompts')")
    return text_sample_sets(model, cfg.search_samples, cfg.heldout_samples)
