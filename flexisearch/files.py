"""Files on disk: the one atomic writer, JSON and safetensors I/O, content fingerprints, the assets path,
and `Pretrained`, the one save_pretrained / from_pretrained of every network the package ships.

Every write goes through `atomic_write`: the content is written to a temporary path beside the target
and renamed into place, so a reader sees the old file (or directory) or the whole new one, never half.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from .errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are read or written, so `flexisearch show` starts fast
    import torch

PACKAGE = Path(__file__).parent
ASSETS = PACKAGE / "assets"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_NAME = "adapter.json"  # an adapter folder: the base it applies to, and only the weights that differ
ADAPTER_WEIGHTS = "adapter.safetensors"


def asset_path(spec: str | os.PathLike) -> Path:
    """The folder a spec names: a shipped asset for 'embedded:<name>' (name relative to assets/), else the path."""
    text = str(spec)
    return ASSETS / text.split(":", 1)[1] if text.startswith("embedded:") else Path(text)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call write(tmp) with a temporary path beside `path` (a file or a directory), then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write data to path, flushed to disk before the rename."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


MAX_TEXT_BYTES = 64 << 20  # configs, schedules and results are kilobytes


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file's content; missing, a directory, unreadable, too large or binary is a UserError."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a {what}")
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        if path.stat().st_size > MAX_TEXT_BYTES:
            raise UserError(f"{path}: {path.stat().st_size} bytes, expected a {what} of at most {MAX_TEXT_BYTES}")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (not UTF-8), expected a {what}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON file; a missing or malformed file, NaN or Infinity, or nesting too deep for Python is a
    UserError naming it."""
    text = read_text(path, what)
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise UserError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, NaN / Infinity, an integer longer than Python converts
        raise UserError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None


# ---- weights -----------------------------------------------------------------------------------

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


def save_weights(path: str | Path, state: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as one safetensors file, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"}))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

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
        if value.is_floating_point() and not bool(value.isfinite().all()):
            raise UserError(f"{source}: weight '{names.get(key, key)}' has NaN or infinite values")


class Pretrained:
    """save_pretrained / from_pretrained for an nn.Module built from a config dataclass: a directory with
    config.json and model.safetensors, plus any JSON side files a subclass names (`_side_files`).

    A subclass sets `config_class` (with to_dict() and from_dict(mapping, source)) and may override
    `_side_files` (name -> JSON object to save) and `_from_files` (build the module from its config and
    the side files read back). An adapter folder (save_adapter) holds only the weights that differ from a
    base model the folder names by place and fingerprint; from_pretrained reads both kinds."""

    config_class: type
    config: Any

    def _side_files(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _from_files(cls, config: Any, directory: Path) -> Any:
        return cls(config)

    def fingerprint(self) -> str:
        raise NotImplementedError

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        save_weights(directory / WEIGHTS_NAME, self.state_dict())
        for stale in (ADAPTER_NAME, ADAPTER_WEIGHTS):  # a folder holds a model or an adapter, never both
            (directory / stale).unlink(missing_ok=True)
        self._save_config(directory)

    def save_adapter(self, directory: str | Path, base: Pretrained, base_ref: str) -> None:
        """Save what makes this model from `base`: the weights base lacks or holds with other values (after a LoRA
        flexify: the adapters, patch-size embeddings and embed/de-embed residuals; megabytes, where a DiT-XL/2
        copy is 2.7 GB), the config, and the base's place (`embedded:<name>`, or a path, stored relative to
        directory) and fingerprint, which loading checks."""
        import torch

        directory = Path(directory)
        base_state = base.state_dict()
        delta = {k: v for k, v in self.state_dict().items()
                 if k not in base_state or v.shape != base_state[k].shape or not torch.equal(v, base_state[k])}
        ref = base_ref if base_ref.startswith("embedded:") else os.path.relpath(Path(base_ref).resolve(),
                                                                               directory.resolve())
        save_weights(directory / ADAPTER_WEIGHTS, delta)
        atomic_write_json(directory / ADAPTER_NAME, {"base": ref, "base_fingerprint": base.fingerprint()})
        (directory / WEIGHTS_NAME).unlink(missing_ok=True)
        self._save_config(directory)

    def _save_config(self, directory: Path) -> None:
        for name, doc in self._side_files().items():
            atomic_write_json(directory / name, doc)
        atomic_write_json(directory / CONFIG_NAME, self.config.to_dict())

    @classmethod
    def _weights(cls, directory: Path) -> dict[str, torch.Tensor]:
        """The whole state dict a directory holds: its weights, or an adapter's base's with the adapter's on top."""
        if not (directory / ADAPTER_NAME).is_file():
            return load_weights(directory / WEIGHTS_NAME)
        doc = read_json(directory / ADAPTER_NAME, "adapter")
        ref, want = (doc.get("base"), doc.get("base_fingerprint")) if isinstance(doc, dict) else (None, None)
        if not isinstance(ref, str) or not isinstance(want, str):
            raise UserError(f"{directory / ADAPTER_NAME}: expected the strings 'base' and 'base_fingerprint'")
        base = cls.from_pretrained(asset_path(ref) if ref.startswith("embedded:") else directory / ref)
        got = base.fingerprint()
        if got != want:
            raise UserError(f"{directory / ADAPTER_NAME}: base {ref} has fingerprint {got}; "
                            f"the adapter was made for {want}")
        return {**base.state_dict(), **load_weights(directory / ADAPTER_WEIGHTS)}

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        torch_dtype: torch.dtype | None = None) -> Any:
        """The module a directory holds, on device, in eval mode; torch_dtype (diffusers' loader passes it) casts it."""
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"{directory}: model directory not found")
        source = str(directory / CONFIG_NAME)
        config = cls.config_class.from_dict(read_json(directory / CONFIG_NAME, "config.json"), source)
        state = cls._weights(directory)
        import torch

        with torch.device("meta"):  # shapes first: a config the weights do not match allocates nothing
            check_state(state, cls._from_files(config, directory).state_dict(), str(directory / WEIGHTS_NAME))
        model = cls._from_files(config, directory)
        model.load_state_dict(state)
        return model.to(device, torch_dtype).eval()
