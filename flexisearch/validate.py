"""The one config reader: a typed, frozen dataclass from a mapping (YAML, JSON or CLI overrides).

Types come from the dataclass annotations: bool, int, float (an int is accepted), str, tuple[int, ...]
(positive ints), tuples of such tuples (lists of lists in JSON), dict, X | None, and nested dataclasses.
Numbers must be finite and non-negative.
Every problem is a one-line UserError naming the source, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Callable

from .errors import UserError

Parser = Callable[[Any, str], Any]  # (value, dotted key) -> parsed value


def key_error(source: str, key: str, expected: str, value: Any) -> UserError:
    return UserError(f"{source}: key '{key}' has {_short(value)}, expected {expected}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_dataclass(cls: type, data: Any, source: str, prefix: str = "", parsers: Mapping[str, Parser] | None = None) -> Any:
    """cls(**data) with every value checked against its annotation; parsers[name] overrides one key.

    prefix is the dotted path of a nested section ("space.")."""
    if not isinstance(data, Mapping):
        if prefix:
            raise key_error(source, prefix.rstrip("."), "a mapping", data)
        raise UserError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    parsers = parsers or {}
    kw = {}
    for key, value in data.items():
        if key not in fields:
            raise UserError(f"{source}: unknown key '{prefix}{key}' (known: {', '.join(fields)})")
        name = f"{prefix}{key}"
        kw[key] = parsers[key](value, name) if key in parsers else _value(hints[key], value, source, name)
    for f in dataclasses.fields(cls):
        if f.init and f.name not in kw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"{source}: missing key '{prefix}{f.name}'")
    return cls(**kw)


def _value(hint: Any, value: Any, source: str, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        *others, last = [a for a in args if a is not type(None)]
        for option in others:  # the first type that reads the value; the last one's error otherwise
            try:
                return _value(option, value, source, key)
            except UserError:
                pass
        return _value(last, value, source, key)
    if dataclasses.is_dataclass(hint):
        return read_dataclass(hint, value, source, f"{key}.")
    if hint is bool:
        if not isinstance(value, bool):
            raise key_error(source, key, "true or false", value)
        return value
    if hint in (int, float):
        ok = isinstance(value, int) if hint is int else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            raise key_error(source, key, "an integer" if hint is int else "a number", value)
        if not math.isfinite(value) or value < 0:
            raise key_error(source, key, "a finite, non-negative number", value)
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise key_error(source, key, "a string", value)
        return value
    if origin is tuple and args and typing.get_origin(args[0]) is tuple:
        if not isinstance(value, (list, tuple)):
            raise key_error(source, key, "a list of lists of positive integers", value)
        return tuple(_value(args[0], v, source, key) for v in value)
    if origin is tuple:
        if not (isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                         for v in value)):
            raise key_error(source, key, "a list of positive integers", value)
        return tuple(value)
    if hint is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise key_error(source, key, "a mapping", value)
        return dict(value)
    raise TypeError(f"{key}: no reader for type {hint!r}")  # a programming error, not bad input


class ConfigMixin:
    """to_dict / from_dict for a frozen config dataclass stored as JSON beside its weights."""

    complete: typing.ClassVar[bool] = False  # True: a stored config must give every key (no defaults filled in)

    def __post_init__(self) -> None:
        # A float field given as an int (mlp_ratio=4) is stored as a float, so to_dict and the content
        # fingerprint are the same before saving and after loading.
        for name, hint in typing.get_type_hints(type(self)).items():
            value = getattr(self, name, None)
            if hint is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, source: str = "config") -> Any:
        """Read and check a config mapping; every problem is a one-line UserError naming the key."""
        if cls.complete and isinstance(d, Mapping):
            missing = [f.name for f in dataclasses.fields(cls) if f.name not in d]
            if missing:
                raise UserError(f"{source}: missing key '{missing[0]}'")
        config = read_dataclass(cls, d, source)
        config.check(source)
        return config

    def check(self, source: str = "config") -> None:
        """Constraints between fields; a subclass raises UserError naming the key."""
