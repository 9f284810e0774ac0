"""Moving digits: the offline video data of the embedded video default, made from the shipped MNIST digits.

A clip shows one (or more) MNIST-5k digits moving in straight lines across a dark canvas and bouncing off its
edges, one pixel step per frame per axis times `speed`. Everything is determined by (split, seed, index): the
digit images come from MNIST-5k's fixed train or held-out split (data.images.load_mnist), so train and held-out
clips never share a digit image; start positions, digits and directions come from a NumPy generator seeded by
(seed, split). Each clip's class is its first digit's label and its motion is the first digit's starting
direction (0: down-right, 1: down-left, 2: up-right, 3: up-left), both known, for class-conditional training and
for a classifier of digit and motion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from .images import load_mnist

DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1))  # (dy, dx) per motion class
SPLIT_CLIPS = {"train": 4000, "heldout": 1000}  # the fixed splits of load_moving_digits


@dataclass(frozen=True)
class MovingDigits:
    """Clips (N, 1, frames, canvas, canvas) in [-1, 1], their digit classes and motion classes."""

    videos: torch.Tensor
    labels: torch.Tensor
    motions: torch.Tensor


def _bounce(start: int, velocity: int, steps: int, room: int) -> np.ndarray:
    """Positions 0..steps-1 of a point moving at `velocity` in [0, room], reflected at both ends."""
    pos = start + velocity * np.arange(steps)
    period = 2 * room
    pos = np.mod(pos, period) if room else np.zeros(steps, dtype=int)
    return np.where(pos > room, period - pos, pos)


def moving_digits(n: int, split: str = "train", seed: int = 0, frames: int = 8, canvas: int = 32,
                  digit_size: int = 16, num_digits: int = 1, speed: int = 2) -> MovingDigits:
    """n clips of the split ('train' or 'heldout'), deterministic in (split, seed)."""
    if canvas < digit_size or min(n, frames, canvas, digit_size, num_digits, speed) < 1:
        raise UserError(f"moving digits: expected positive sizes with canvas >= digit_size, got n={n}, "
                        f"frames={frames}, canvas={canvas}, digit_size={digit_size}, digits={num_digits}, speed={speed}")
    images, labels = load_mnist(digit_size, split)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    room = canvas - digit_size
    ink = (images[:, 0].numpy() + 1) / 2  # [0, 1]: digits are combined by their brightest pixel
    videos = np.zeros((n, frames, canvas, canvas), dtype=np.float32)
    first_digit = np.zeros(n, dtype=np.int64)
    motion = np.zeros(n, dtype=np.int64)
    for i in range(n):
        for d in range(num_digits):
            k, direction = int(rng.integers(len(images))), int(rng.integers(len(DIRECTIONS)))
            y0, x0 = (int(v) for v in rng.integers(0, room + 1, size=2))
            dy, dx = DIRECTIONS[direction]
            ys, xs = _bounce(y0, dy * speed, frames, room), _bounce(x0, dx * speed, frames, room)
            for f in range(frames):
                window = videos[i, f, ys[f]:ys[f] + digit_size, xs[f]:xs[f] + digit_size]
                np.maximum(window, ink[k], out=window)
            if d == 0:
                first_digit[i], motion[i] = int(labels[k]), direction
    clips = torch.from_numpy(videos * 2 - 1).unsqueeze(1)
    return MovingDigits(clips, torch.from_numpy(first_digit), torch.from_numpy(motion))


def load_moving_digits(frames: int, canvas: int, split: str = "train", n: int | None = None) -> MovingDigits:
    """The fixed moving-digits split for a video model of `frames` frames of canvas x canvas: SPLIT_CLIPS clips (or
    the first n) of one digit of half the canvas, moving canvas / 16 pixels per frame per axis (at least 1), seed 0."""
    if split not in SPLIT_CLIPS:
        raise UserError(f"split {split!r}: expected 'train' or 'heldout'")
    return moving_digits(n or SPLIT_CLIPS[split], split, 0, frames, canvas, canvas // 2, speed=max(1, canvas // 16))


__all__ = ["DIRECTIONS", "SPLIT_CLIPS", "MovingDigits", "load_moving_digits", "moving_digits"]
