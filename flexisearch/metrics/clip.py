"""CLIP score of generated images against their prompts: the quality a text-to-image search constrains.

`load_clip_metric(cfg, model)` (called by registry.load_metric for metric name "clip") returns a
metric with the interface the Evaluator uses: name, higher_is_better, needs_native, score(images,
sample_set, target), score_with_ci(images, sample_set, target, n_boot, seed) and paired_interval.

Which prompt an image was generated for: a text model's sample labels are rows of its prompt table
(models.text_dit.FlexiTextDiT), and `model.captions[row]` is that row's caption text, so the metric maps
(sample set, label) -> caption by the label alone. Held-out prompts are distinct rows: the search
set cycles over the search rows and the held-out set over the held-out rows (search.sample_sets).

The CLIP model: `cfg.feature_net` if given (a directory saved by tiny_clip.save_clip, or a hub name
torchmetrics knows, e.g. openai/clip-vit-large-patch14, which needs network access), else the
embedded tiny digit CLIP (assets/text/clip). The score is torchmetrics' CLIPScore through its
callable route: max(mean over samples of 100 * cos(image, caption), 0). It scores pixels: the
search decodes a latent model's samples (PixArt) with its VAE first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import UserError
from .accuracy import mean_ci, paired_mean_ci
from .tiny_clip import ASSET as DEFAULT_CLIP
from .tiny_clip import load_clip, per_sample_scores, to_pixels

HUB_PREFIXES = ("openai/", "jinaai/", "zer0int/")


class CLIPMetric:
    """CLIP score (higher is better) of images against the captions of their prompt rows."""

    name = "clip"
    higher_is_better = True
    needs_native = False

    def __init__(self, captions: Sequence[str] | Any, clip: str | Path = DEFAULT_CLIP, batch_size: int = 256):
        # A text model (its prompt table is read at scoring time, so set_prompts after this is fine) or captions.
        self._source = captions if hasattr(captions, "captions") else list(captions)
        self.clip = str(clip)
        self.batch_size = batch_size
        if self.clip.startswith(HUB_PREFIXES):
            self._pair = None  # torchmetrics loads it by name (network or HF cache)
        else:
            self._pair = load_clip(self.clip)
        self._metric = None

    @property
    def captions(self) -> list[str]:
        return self._source.captions if hasattr(self._source, "captions") else self._source

    def _clip_score(self):
        from torchmetrics.multimodal.clip_score import CLIPScore

        if self._metric is None:
            pair = self._pair
            self._metric = CLIPScore(model_name_or_path=(lambda: pair) if pair is not None else self.clip)
        self._metric.reset()
        return self._metric

    def prompts(self, sample_set: Any) -> list[str]:
        labels = list(sample_set.labels)
        bad = [y for y in labels if not 0 <= y < len(self.captions) or self.captions[y] == ""]
        if bad:
            raise UserError(f"metric clip: label {bad[0]} is not a caption row of the model's prompt table "
                            f"({len(self.captions)} rows, the last is the empty caption)")
        return [self.captions[y] for y in labels]

    def score(self, images: torch.Tensor, sample_set: Any, target: torch.Tensor | None = None) -> float:
        """torchmetrics CLIPScore of the images against their prompts."""
        prompts = self.prompts(sample_set)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        metric = self._clip_score()
        pixels = to_pixels(images)
        for i in range(0, len(prompts), self.batch_size):
            metric.update(list(pixels[i:i + self.batch_size]), prompts[i:i + self.batch_size])
        return float(metric.compute())

    def per_sample(self, images: torch.Tensor, sample_set: Any) -> torch.Tensor:
        """100 * cos(image, prompt) for every sample (the mean of these, clamped at 0, is the score)."""
        if self._pair is None:
            raise UserError("metric clip: per-sample scores need a local CLIP directory (feature_net)")
        return per_sample_scores(*self._pair, images, self.prompts(sample_set), self.batch_size)

    def score_with_ci(self, images: torch.Tensor, sample_set: Any, target: torch.Tensor | None, n_boot: int,
                      seed: int = 0) -> tuple[float, float, float]:
        """(value, low, high): the CLIP score and a bootstrap 95% interval over the samples."""
        value = self.score(images, sample_set, target)
        if self._pair is None:
            return value, float("nan"), float("nan")
        low, high = mean_ci(self.per_sample(images, sample_set), n_boot, seed)
        return value, max(low, 0.0), max(high, 0.0)  # the score is clamped at 0

    def paired_interval(self, images: torch.Tensor, others: torch.Tensor, sample_set: Any, n_boot: int,
                        seed: int = 0) -> tuple[float, float, float] | None:
        """(score(images) - score(others), low, high) from per-sample differences (None without a local CLIP)."""
        if self._pair is None:
            return None
        return paired_mean_ci(self.per_sample(images, sample_set), self.per_sample(others, sample_set), n_boot, seed)


def load_clip_metric(cfg: Any, model: Any) -> CLIPMetric:
    """The CLIP metric for a search config and a text-conditioned model."""
    if not getattr(model, "is_text_model", False):
        raise UserError(f"metric clip needs a text-conditioned model; '{getattr(cfg, 'model', '?')}' is class-conditional "
                        "(use fid or fid_native)")
    clip = getattr(cfg, "feature_net", None) or DEFAULT_CLIP
    metric = CLIPMetric(model, clip)
    if metric._pair is not None and getattr(model, "decode_images", None) is None:
        vision = metric._pair[0].config.vision_config
        mc = model.config
        if vision.image_size != mc.input_size or vision.num_channels != mc.in_channels:
            raise UserError(f"CLIP model {clip} takes {vision.num_channels}x{vision.image_size}px images, the model "
                            f"makes {mc.in_channels}x{mc.input_size}px; give feature_net for this model")
    return metric


__all__ = ["CLIPMetric", "load_clip_metric"]
