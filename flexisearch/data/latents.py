"""Training data as batches: pixel images held in memory, or an image folder encoded once by a VAE.

A latent model trains on VAE latents. Encoding them at every step costs more than the DiT step
itself, so `LatentCache.build` encodes every image and its horizontal flip once (centre-cropped
and resized as DiT does) and stores the VAE's posterior (mean and log-variance, so each step draws
a fresh latent as DiT's training does) in safetensors shards. The cache is named by a fingerprint
of the VAE weights, the image size and the image files' bytes, so any run with the same VAE and
data reuses it; it is written to a temporary folder and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..files import (
    atomic_write,
    atomic_write_json,
    fingerprint,
    read_json,
    save_weights,
)
from .images import image_folder_files, read_image

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
        self.scale = float(self.index["scaling_factor"])
        self.shard_size = int(self.index["shard_size"])
        self.labels = torch.tensor(self.index["labels"])
        self._shards = [safe_open(str(self.directory / name), "pt") for name in self.index["shards"]]

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
        mean, log_var = rows.chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=gen)
        return self.scale * (mean + torch.exp(0.5 * log_var.clamp(-30.0, 20.0)) * noise), self.labels[idx]

    @classmethod
    def build(cls, root: str | Path, vae: Any, image_size: int, cache_root: str | Path, batch_size: int = 16,
              shard_size: int = 4096) -> LatentCache:
        """The cache of an image folder for a diffusers AutoencoderKL at image_size pixels: reused when one with
        the same fingerprint exists under cache_root, else encoded (on the VAE's device) and written there."""
        files, classes = image_folder_files(root)
        key = _fingerprint(files, vae, image_size)
        directory = Path(cache_root) / key
        if (directory / INDEX).is_file():
            return cls(directory)
        device = next(vae.parameters()).device

        @torch.no_grad()
        def encode(chunk: list[tuple[Path, int]]) -> torch.Tensor:
            x = torch.stack([read_image(path, image_size) for path, _ in chunk])
            x = torch.cat([x, x.flip(-1)])  # every image and its mirror image, as DiT's training augments
            out = vae.encode(x.to(device, vae.dtype)).latent_dist.parameters.float().cpu()
            n = len(chunk)
            return torch.stack([out[:n], out[n:]], 1).flatten(0, 1)  # row 2i: image i, row 2i + 1: its flip

        def write(tmp: Path) -> None:
            tmp.mkdir()
            shards = []
            per_shard = max(1, shard_size // 2)
            for s in range(0, len(files), per_shard):
                part = files[s:s + per_shard]
                rows = torch.cat([encode(part[b:b + batch_size]) for b in range(0, len(part), batch_size)])
                shards.append(f"shard-{len(shards):05d}.safetensors")
                save_weights(tmp / shards[-1], {"posterior": rows})
            atomic_write_json(tmp / INDEX, {"fingerprint": key, "root": str(root), "classes": classes,
                                            "image_size": image_size, "scaling_factor": vae.config.scaling_factor,
                                            "shard_size": 2 * per_shard, "shards": shards,
                                            "labels": [label for _, label in files for _ in (0, 1)]})

        directory.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(directory, write)
        return cls(directory)


def _fingerprint(files: list[tuple[Path, int]], vae: Any, image_size: int) -> str:
    """VAE weights + image size + every file's class and bytes."""
    h = hashlib.sha1(fingerprint({k: v for k, v in vae.config.items() if not k.startswith("_")}, vae.state_dict(), torch.float32).encode())
    h.update(str(image_size).encode())
    for path, label in files:
        h.update(f"{label}/{path.name}".encode())
        h.update(hashlib.sha1(path.read_bytes()).digest())
    return h.hexdigest()[:16]


__all__ = ["LatentCache", "TensorData"]
