"""Captions for digit images, measured from the pixels: "a thick, right-slanted, large seven".

Three measurements of the ink (pixel intensity mapped from [-1, 1] to [0, 1]):
  thickness  2 x ink mass / boundary length, the boundary length being the total variation of the
             ink (sum of the gradient magnitude): a stroke of width w and length l >> w has mass
             w*l and boundary 2l, so this is w in pixels.
  slant      the shear of the ink's second moments, -mu11 / mu02 with y pointing down: 0 for an
             upright digit, > 0 when its top leans right (tan of the lean angle).
  size       the ink's radius of gyration, sqrt(var_x + var_y), in pixels: how far the ink spreads.
Each is cut into three words at the tertiles of the training split (MNIST-5k train, 16x16):
thickness and size per digit (a "large one" is large for a one; every digit's ones are narrow),
slant over all digits (left-slanted really leans left). The cut points are shipped in
assets/text/caption_thresholds.json, so captions are deterministic and need no data to compute;
`fit_thresholds` reproduces them.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..files import ASSETS

THRESHOLDS_PATH = ASSETS / "text" / "caption_thresholds.json"
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = {
    "thickness": ("thin", "regular", "thick"),
    "slant": ("left-slanted", "upright", "right-slanted"),
    "size": ("small", "mid-size", "large"),
}
PER_CLASS = {"thickness": True, "slant": False, "size": True}


def measure(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N, 1, S, S) images in [-1, 1] (or (N, S, S)) -> {'thickness', 'slant', 'size'}: (N,) float64 each."""
    x = images.double()
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"captions are measured on single-channel images, got {x.shape[1]} channels")
        x = x[:, 0]
    ink = ((x + 1) / 2).clamp(0, 1)
    n, h, w = ink.shape
    mass = ink.sum((1, 2)).clamp_min(1e-6)
    ys = torch.arange(h, dtype=torch.float64).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float64).view(1, 1, w)
    cx = (ink * xs).sum((1, 2)) / mass
    cy = (ink * ys).sum((1, 2)) / mass
    dx, dy = xs - cx.view(-1, 1, 1), ys - cy.view(-1, 1, 1)
    mu02 = (ink * dy * dy).sum((1, 2)) / mass
    mu20 = (ink * dx * dx).sum((1, 2)) / mass
    mu11 = (ink * dx * dy).sum((1, 2)) / mass
    padded = F.pad(ink, (1, 1, 1, 1))
    gx = (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]) / 2
    gy = (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]) / 2
    boundary = (gx * gx + gy * gy).sqrt().sum((1, 2)).clamp_min(1e-6)
    return {"thickness": 2 * mass / boundary, "slant": -mu11 / mu02.clamp_min(1e-6), "size": (mu20 + mu02).sqrt()}


def fit_thresholds(images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Tertile cut points of each measurement (per digit where PER_CLASS says so) on these images."""
    m = measure(images)
    q = torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    out: dict = {"image_size": int(images.shape[-1])}
    for name, values in m.items():
        if PER_CLASS[name]:
            out[name] = {str(c): [round(v, 6) for v in torch.quantile(values[labels == c], q).tolist()]
                         for c in range(len(DIGITS))}
        else:
            out[name] = [round(v, 6) for v in torch.quantile(values, q).tolist()]
    return out


@lru_cache(maxsize=1)
def shipped_thresholds() -> dict:
    return json.loads(THRESHOLDS_PATH.read_text())


def attributes(images: torch.Tensor, labels: torch.Tensor, thresholds: dict | None = None) -> list[dict[str, str]]:
    """Per image: {'digit', 'thickness', 'slant', 'size'} words."""
    th = thresholds or shipped_thresholds()
    if images.shape[-1] != th["image_size"]:
        raise UserError(f"captions: thresholds were fitted on {th['image_size']}px images, got {images.shape[-1]}px "
                        "(fit_thresholds on images of this size)")
    m = measure(images)
    out = []
    for i, label in enumerate(labels.tolist()):
        attrs = {"digit": DIGITS[int(label)]}
        for name, words in WORDS.items():
            lo, hi = th[name][str(int(label))] if PER_CLASS[name] else th[name]
            v = float(m[name][i])
            attrs[name] = words[0] if v < lo else words[2] if v >= hi else words[1]
        out.append(attrs)
    return out


def caption_text(attrs: dict[str, str], keep: tuple[str, ...] = ("thickness", "slant", "size")) -> str:
    """'a thick, right-slanted, large seven' (only the attributes in keep, in that order)."""
    words = [attrs[k] for k in ("thickness", "slant", "size") if k in keep]
    return f"a {', '.join(words)} {attrs['digit']}" if words else f"a {attrs['digit']}"


def captions_for(images: torch.Tensor, labels: torch.Tensor, thresholds: dict | None = None) -> list[str]:
    """The full caption of every image (digit, thickness, slant and size)."""
    return [caption_text(a) for a in attributes(images, labels, thresholds)]


def digit_of(caption: str) -> int:
    """The digit a caption names (its last word)."""
    word = caption.strip().split()[-1] if caption.strip() else ""
    if word not in DIGITS:
        raise ValueError(f"caption {caption!r} names no digit")
    return DIGITS.index(word)


def prompt_table(train_captions: list[str], heldout_captions: list[str], per_digit: int) -> tuple[list[str], int]:
    """(captions, num_search): per digit the `per_digit` most frequent training captions (search
    rows), then per digit the `per_digit` most frequent held-out captions that are not search rows
    (held-out rows; fewer if there are not enough). Within each part rows cycle through the digits
    (row r is digit r % 10 while every digit has prompts left), so any prefix is class-balanced.
    Ties in frequency break alphabetically: the table is deterministic."""

    def ranked(captions: list[str], exclude: set[str]) -> list[list[str]]:
        counts: dict[str, int] = {}
        for c in captions:
            if c not in exclude:
                counts[c] = counts.get(c, 0) + 1
        by_digit: list[list[str]] = [[] for _ in DIGITS]
        for c in sorted(counts, key=lambda c: (-counts[c], c)):
            by_digit[digit_of(c)].append(c)
        return [d[:per_digit] for d in by_digit]

    def interleave(lists: list[list[str]]) -> list[str]:
        return [lst[r] for r in range(max(map(len, lists))) for lst in lists if r < len(lst)]

    search = interleave(ranked(train_captions, set()))
    heldout = interleave(ranked(heldout_captions, set(search)))
    return search + heldout, len(search)


__all__ = ["measure", "fit_thresholds", "attributes", "caption_text", "captions_for", "digit_of", "prompt_table",
           "DIGITS", "WORDS"]
