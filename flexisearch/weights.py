"""Weights on disk and their identity: safetensors written atomically, state dicts checked against a
config with one-line errors, and the content fingerprints that schedules and FID statistics use to
name the network they belong to."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError


def fingerprint(config: dict, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                skip: Iterable[str] = ()) -> str:
    """16 hex digits of sha256 over the config (as sorted JSON) and every tensor (name, then bytes, by name).

    dtype casts tensors before hashing (FlexiDiTs hash float32, so a bf16 cast keeps its identity);
    skip leaves out entries that are data, not network (a text model's prompt table)."""
    skip = set(skip)
    hsh = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(state.items()):
        if name in skip:
            continue
        hsh.update(name.encode())
        t = tensor.detach().to("cpu") if dtype is None else tensor.detach().to("cpu", dtype)
        hsh.update(t.contiguous().numpy().tobytes())
    return hsh.hexdigest()[:16]


def save_weights(path: str | Path, state: Mapping[str, torch.Tensor]) -> None:
    """Write a state dict as one safetensors file: to a temp file beside it, then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0]})") from None


def check_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str,
                names: Mapping[str, str] | None = None) -> None:
    """Refuse a state dict whose names or shapes differ from expected (a model built from the config).

    names maps an expected key to the checkpoint's own name for it, so errors quote the latter."""
    names = names or {}
    for keys, where in ((set(expected) - set(state), "missing from"), (set(state) - set(expected), "unexpected in")):
        if keys:
            first = sorted(keys, key=lambda k: names.get(k, k))[0]
            more = f" ({len(keys)} in all)" if len(keys) > 1 else ""
            raise UserError(f"{source}: weight '{names.get(first, first)}' {where} the checkpoint for this config{more}")
    for key, value in sorted(state.items()):
        if value.shape != expected[key].shape:
            raise UserError(f"{source}: weight '{names.get(key, key)}' has shape {tuple(value.shape)}, "
                            f"config expects {tuple(expected[key].shape)}")


__all__ = ["check_state", "fingerprint", "load_weights", "save_weights"]
