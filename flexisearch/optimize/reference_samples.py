"""Static native's samples on a sample set, kept on disk: every search of a model compares with the same computation.

A search samples static native (the config's reference schedule) on its search seeds, for the bounds, and on its
held-out seeds, for the paired differences of the exported schedules: on the embedded default that is a quarter of
the model calls of a whole run. The samples depend only on the model, the reference schedule, the labels and seeds
(and LoRA merging), so they are kept as reference_samples/<key hash>.safetensors, the key in the file's metadata:
written to the run folder (a resumed study, a re-export and a later study in the same folder read them back) and
read, never written, beside a local model (the embedded default ships its own, so its first search pays for none).
A file whose key differs, or that cannot be read, is ignored and sampled again. The samples are kept in float16
(half the disk, so the default ships both its sample sets) and used as kept, read back or just sampled alike: a
rounding of at most 2^-11 of a pixel's value, far below what FID or a classifier resolves.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..files import save_weights
from ..models.flexible import FlexibleDiT
from ..sampling.schedule import Schedule
from .sample_sets import SampleSet

FOLDER = "reference_samples"
KEPT_DTYPE = torch.float16


def reference_key(model: FlexibleDiT, reference: Schedule, sample_set: SampleSet) -> dict[str, Any]:
    """What static native's samples on a sample set depend on (the reference schedule names the model's
    fingerprint: no second hash of the weights)."""
    prompts = getattr(model, "prompt_fingerprint", None)  # a text model's labels are rows of its prompt table
    return {"model": reference.model, "prompts": prompts() if prompts else None, "merge_lora": model.lora_merged,
            "reference": reference.to_dict(), "labels": list(sample_set.labels), "seeds": list(sample_set.seeds),
            "dtype": str(KEPT_DTYPE)}


def _path(folder: Path, key: dict[str, Any]) -> Path:
    return folder / FOLDER / f"{hashlib.sha256(_text(key).encode()).hexdigest()[:16]}.safetensors"


def _text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


def _read(path: Path, key: dict[str, Any]) -> torch.Tensor | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return f.get_tensor("samples").float() if (f.metadata() or {}).get("key") == _text(key) else None
    except Exception:  # safetensors' own error types: a damaged file is sampled again, and replaced
        return None


def reference_samples(key: dict[str, Any], folders: Iterable[Path], write_to: Path,
                      compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The samples stored under `key` in write_to or one of `folders`, else compute() saved into write_to; float32
    tensors of the kept float16 values."""
    for folder in (write_to, *folders):
        found = _read(_path(folder, key), key)
        if found is not None:
            return found
    samples = compute().to(KEPT_DTYPE)
    save_weights(_path(write_to, key), {"samples": samples}, {"key": _text(key)})
    return samples.float()


__all__ = ["FOLDER", "reference_key", "reference_samples"]
