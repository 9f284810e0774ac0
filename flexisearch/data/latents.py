"""Training data as batches: pixel images held in memory, or an image folder encoded once by a VAE.

A latent model trains on VAE latents. Encoding them at every step costs more than the DiT step
itself, so `LatentCache.build` encodes every image of a data folder (class subfolders, or captions.jsonl:
data.images.dataset_files) and its horizontal flip once (centre-cropped
and resized as DiT does) and stores the VAE's posterior (mean and log-variance, so each step draws
a fresh latent as DiT's training does) in float16 safetensors shards. The cache is named by a fingerprint
of the VAE weights, the image size, the labels' names and the image files (names, sizes, times), so any run with the same VAE and
data reuses it; it is written to a partial folder and renamed into place when complete (LatentCache.build).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import UserError
from ..files import atomic_write_json, fingerprint, read_json, save_weights
from .images import dataset_files, read_image

INDEX = "index.json"


class TensorData:
    """Images (N, C, H, W) and labels held in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]


class LatentCache:
    """VAE posteriors of an image folder (and its flips), read row by row from safetensors shards."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.index = read_json(self.directory / INDEX, "latent cache index")
        try:
            self.scale = float(self.index["scaling_factor"])
            self.shard_size = int(self.index["shard_size"])
            self.labels = torch.tensor(self.index["labels"], dtype=torch.long)
            self.captions: list[str] | None = self.index.get("captions")  # label i is captions[i]; None: classes
            self._shards = [safe_open(str(self.directory / name), "pt") for name in self.index["shards"]]
        except Exception as e:  # a damaged cache: missing keys, wrong types, unreadable shards
            raise UserError(f"{self.directory / INDEX}: not a usable latent cache ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); delete the folder to rebuild it") from None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        c, h, w = self._shards[0].get_slice("posterior").get_shape()[1:]
        return c // 2, h, w

    def batch(self, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents z = scale (mean + std noise), one fresh draw per row, and their labels."""
        rows = torch.cat([self._shards[i // self.shard_size].get_slice("posterior")[i % self.shard_size:
                                                                                   i % self.shard_size + 1]
                          for i in idx.tolist()])
        mean, log_var = rows.float().chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=gen)
        return self.scale * (mean + torch.exp(0.5 * log_var.clamp(-30.0, 20.0)) * noise), self.labels[idx]

    @classmethod
    def build(cls, root: str | Path, vae: Any, image_size: int, cache_root: str | Path, batch_size: int = 16,
              shard_size: int = 4096, rank: int = 0, world: int = 1, poll_s: float = 1.0) -> LatentCache:
        """The cache of an image folder for a diffusers AutoencoderKL at image_size pixels: reused when one with
        the same fingerprint exists under cache_root, else encoded (on the VAE's device) and written there.

        Data-parallel workers (rank of world) share the work: each encodes every world-th shard into a partial
        folder named by the fingerprint, worker 0 writes the index once every shard is there and renames the
        folder into place, and the others wait for it. Shards are written atomically, so an interrupted build
        resumes with the shards it finished."""
        files, label_names, captioned = dataset_files(root)
        key = _fingerprint(files, label_names, vae, image_size)
        directory, partial = Path(cache_root) / key, Path(cache_root) / f".{key}.partial"
        per_shard = max(1, shard_size // 2)  # images per shard: each gives two rows (itself and its flip)
        names = [f"shard-{i:05d}.safetensors" for i in range(math.ceil(len(files) / per_shard))]
        device = next(vae.parameters()).device

        @torch.no_grad()
        def encode(chunk: list[tuple[Path, int]]) -> torch.Tensor:
            x = torch.stack([read_image(path, image_size) for path, _ in chunk])
            x = torch.cat([x, x.flip(-1)])  # every image and its mirror image, as DiT's training augments
            out = vae.encode(x.to(device, vae.dtype)).latent_dist.parameters.half().cpu()  # ImageNet: 42 GB
            n = len(chunk)
            return torch.stack([out[:n], out[n:]], 1).flatten(0, 1)  # row 2i: image i, row 2i + 1: its flip

        if not (directory / INDEX).is_file():
            partial.mkdir(parents=True, exist_ok=True)
            for i in range(rank, len(names), world):
                if not (partial / names[i]).is_file():
                    part = files[i * per_shard:(i + 1) * per_shard]
                    rows = torch.cat([encode(part[b:b + batch_size]) for b in range(0, len(part), batch_size)])
                    save_weights(partial / names[i], {"posterior": rows})
            if rank == 0:
                wait_for(lambda: all((partial / name).is_file() for name in names), poll_s)
                atomic_write_json(partial / INDEX, {
                    "fingerprint": key, "root": str(root), "captions" if captioned else "classes": label_names,
                    "image_size": image_size,
                    "scaling_factor": vae.config.scaling_factor, "shard_size": 2 * per_shard, "shards": names,
                    "labels": [label for _, label in files for _ in (0, 1)]})
                try:
                    os.replace(partial, directory)
                except OSError:  # another run finished the same cache first
                    if not (directory / INDEX).is_file():
                        raise
        wait_for(lambda: (directory / INDEX).is_file(), poll_s)
        return cls(directory)


def wait_for(done: Callable[[], bool], poll_s: float) -> None:
    """Poll until done() (another worker is writing what this one needs)."""
    while not done():
        time.sleep(poll_s)


def _fingerprint(files: list[tuple[Path, int]], names: list[str], vae: Any, image_size: int) -> str:
    """VAE config and weights, image size, the labels' names (classes or captions), and every file's label, name,
    size and modification time (a stat, not a read: a dataset of a million images is fingerprinted in seconds)."""
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    h = hashlib.sha1(fingerprint(config, vae.state_dict(), torch.float32).encode())
    h.update(str(image_size).encode())
    h.update(json.dumps(names).encode())
    for path, label in files:
        st = path.stat()
        h.update(f"{label}/{path.name}/{st.st_size}/{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


__all__ = ["LatentCache", "TensorData", "wait_for"]
