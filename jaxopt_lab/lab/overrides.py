"""``--set KEY=VALUE``: change any field of an experiment's config from the command line.

A value is parsed by the field's annotated type: ``int``, ``float``, ``bool``, ``str``, ``X | None``
(``none``), and tuples of those written with commas (``batch_sizes=2,4,8``; one element: ``seeds=3`` for an
int, ``learning_rates=1e-3,`` for a tuple; no element: ``rnn_batch_sizes=``). Fields of other types (nested
configs) cannot be set here.

>>> import dataclasses
>>> @dataclasses.dataclass(frozen=True)
... class Config:
...     steps: int
...     learning_rates: tuple[float, ...]
...     widths: tuple[int, ...] | None = None
>>> apply_overrides(Config(100, (1e-3,)), ["steps=40", "learning_rates=1e-3,3e-3", "widths=16,32"])
Config(steps=40, learning_rates=(0.001, 0.003), widths=(16, 32))
>>> apply_overrides(Config(100, (1e-3,)), ["stepz=40"])
Traceback (most recent call last):
...
jaxopt_lab.lab.overrides.OverrideError: --set stepz=40: unknown key; valid keys: learning_rates, steps, widths
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any

__all__ = ["OverrideError", "apply_overrides", "parse_value", "settable_fields"]


class OverrideError(ValueError):
    """A ``--set`` that names no field of the config, or a value its field's type cannot take."""


def settable_fields(config_type: type) -> dict[str, Any]:
    """The config's field names and their resolved type hints, sorted by name."""
    if not dataclasses.is_dataclass(config_type):
        raise TypeError(f"settable_fields: expected a dataclass type, got {config_type!r}")
    hints = typing.get_type_hints(config_type)
    return {f.name: hints[f.name] for f in sorted(dataclasses.fields(config_type), key=lambda f: f.name)}


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def parse_value(text: str, hint: Any) -> Any:
    """``text`` as a value of the type ``hint`` (see the module docstring); ``ValueError`` if it is not.

    >>> parse_value("2,4,8", tuple[int, ...]), parse_value("none", int | None), parse_value("3e-4", float)
    ((2, 4, 8), None, 0.0003)
    >>> parse_value("", tuple[int, ...]), parse_value("4,", tuple[int, ...])
    ((), (4,))
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() == "none" and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return parse_value(text, option)
            except ValueError:
                continue
        raise ValueError(f"expected {_type_name(hint)}")
    if origin is tuple:
        parts = [p.strip() for p in text.split(",")]
        parts = parts[:-1] if parts[-1] == "" else parts  # a trailing comma (`4,`) or nothing at all (``)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_value(p, args[0]) for p in parts)
        if len(parts) != len(args):
            raise ValueError(f"expected {len(args)} comma-separated values")
        return tuple(parse_value(p, a) for p, a in zip(parts, args, strict=True))
    if hint is bool:
        if text.strip().lower() in ("true", "1", "yes"):
            return True
        if text.strip().lower() in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected an int") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a float") from None
    if hint is str:
        return text
    raise ValueError(f"a field of type {_type_name(hint)} cannot be set from the command line")


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """``config`` (a frozen dataclass) with each ``KEY=VALUE`` of ``overrides`` applied, in order.

    Raises:
      OverrideError: a malformed item, an unknown key (the message lists the valid ones) or a value its
        field's type cannot take.
    """
    fields = settable_fields(type(config))
    valid = ", ".join(fields)
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise OverrideError(f"--set {item}: expected KEY=VALUE; valid keys: {valid}")
        if key not in fields:
            raise OverrideError(f"--set {item}: unknown key; valid keys: {valid}")
        try:
            changes[key] = parse_value(text, fields[key])
        except ValueError as err:
            raise OverrideError(f"--set {item}: {err} for {key} ({_type_name(fields[key])}); "
                                f"valid keys: {valid}") from None
    return dataclasses.replace(config, **changes)
