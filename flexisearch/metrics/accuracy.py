"""Class accuracy of class-conditional samples: the fraction the feature net's classifier recognises as
the class they were generated for. FID can stay low while samples drift to other classes (a search
trades class fidelity for FID), so a search constrains both (config `constraints`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError


@torch.no_grad()
def correct(net: Any, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the net (a classifier: forward gives class logits) classifies image i as labels[i]."""
    net.eval()
    device = next(net.parameters()).device
    preds = torch.cat([net(chunk.to(device, torch.float32)).argmax(1).cpu() for chunk in images.split(net.feature_batch_size)])
    return preds == labels.cpu()


def classifier_accuracy(net: Any, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images the net classifies as their label."""
    return correct(net, images, labels).double().mean().item()


def mean_ci(values: torch.Tensor, n_boot: int, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) of the mean of per-sample values."""
    values = values.double()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(values), (max(1, n_boot), len(values)), generator=gen)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(values[idx].mean(1), q).tolist()
    return low, high


def paired_mean_ci(values: torch.Tensor, others: torch.Tensor, n_boot: int, seed: int = 0) -> tuple[float, float, float]:
    """(mean difference, low, high) of per-sample values of two sample sets on the same seeds: the interval of the
    per-sample differences, not of two independent means."""
    diff = values.double() - others.double()
    return (diff.mean().item(), *mean_ci(diff, n_boot, seed))


class ClassAccuracyMetric:
    """Class accuracy (higher is better) of samples of a class-conditional model under a classifier net."""

    name = "class_accuracy"
    higher_is_better = True
    needs_native = False

    def __init__(self, net: Any):
        self.net = net

    def score(self, images: torch.Tensor, sample_set: Any, target: torch.Tensor | None = None) -> float:
        return classifier_accuracy(self.net, images, torch.tensor(sample_set.labels))

    def score_with_ci(self, images: torch.Tensor, sample_set: Any, target: torch.Tensor | None, n_boot: int,
                      seed: int = 0) -> tuple[float, float, float]:
        """(value, low, high): the accuracy and a bootstrap 95% interval over the samples."""
        hits = correct(self.net, images, torch.tensor(sample_set.labels))
        return (hits.double().mean().item(), *mean_ci(hits, n_boot, seed))

    def paired_interval(self, images: torch.Tensor, others: torch.Tensor, sample_set: Any, n_boot: int,
                        seed: int = 0) -> tuple[float, float, float]:
        """(accuracy(images) - accuracy(others), low, high): the mean and interval of per-sample differences."""
        labels = torch.tensor(sample_set.labels)
        return paired_mean_ci(correct(self.net, images, labels), correct(self.net, others, labels), n_boot, seed)


def check_classifier(net: Any, model: Any, net_name: str) -> None:
    """A class accuracy needs a class-conditional model and a classifier over the same classes."""
    if getattr(model, "is_text_model", False):
        raise UserError("metric class_accuracy needs a class-conditional model; this one is text-conditioned "
                        "(use clip)")
    classes = getattr(net.config, "num_classes", None)
    if classes != model.config.num_classes:
        raise UserError(f"metric class_accuracy: feature network {net_name} classifies {classes} classes, the model "
                        f"generates {model.config.num_classes}")


__all__ = ["ClassAccuracyMetric", "check_classifier", "classifier_accuracy", "correct", "mean_ci", "paired_mean_ci"]
