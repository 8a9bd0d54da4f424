"""Turning plain dicts (from YAML) into validated config dataclasses, and back.

Config classes are ordinary dataclasses with type hints; range checks live in their ``__post_init__`` and raise
`FieldError` so that the recipe loader can say which file, step and field is wrong.

Every conversion also enforces what no config needs to state itself: float fields hold finite numbers (``.inf``,
``.nan`` and ``1e999`` are refused), int fields fit in 64 bits, and counts named in the shared vocabulary have sane
upper bounds (`LIMITS`: a ``batch_size`` of 10**9 is refused before anything allocates it). Messages echo values
through `torchslim.errors.shorten`, never whole.

A config that renamed a field lists it in a ``renamed_fields`` class variable (old key -> new spelling, see
docs/glossary.md); `from_dict` refuses the old key with a message naming the new one, so a recipe written for
the old vocabulary fails clearly instead of as an unknown key.

A sub-config class whose defaults differ per method (``CalibrationConfig``) sets ``overlays_default = True``: a
mapping given for such a field then overrides only the keys it names of that field's default, not of the class's
(``calibration: {samples: 512}`` keeps the method's own split and batch size).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from torchslim.errors import key_text, shorten

# Upper bounds of count fields, by the end of the field's name (one vocabulary across every config, so the
# bound follows a field wherever it is nested or renamed). Far above any real use, far below what exhausts memory.
LIMITS = {
    "batch_size": 1 << 16,
    "samples": 100_000_000,
    "batches": 1_000_000,
    "epochs": 100_000,
    "steps": 1_000_000,
    "iterations": 1_000_000,
    "threads": 4096,
    "warmup": 100_000,
    "repeats": 100_000,
    "max_length": 1 << 20,
}
_INT_RANGE = 1 << 63


class FieldError(ValueError):
    """A config field holds a value out of range; ``field`` names it (dotted for nested configs).

    `from_dict` checks every key before it gives up: when several are wrong, the error it raises is the first
    one and ``problems`` lists them all (each a `FieldError`), so that a recipe's errors are reported at once.
    """

    def __init__(self, field: str, message: str, problems: list[FieldError] | None = None):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.problems = problems or [self]

    @classmethod
    def of(cls, problems: list[FieldError]) -> FieldError:
        """One error standing for ``problems`` (at least one): the first, listing them all."""
        first = problems[0]
        return cls(first.field, first.message, problems)


def did_you_mean(word: Any, known: Any) -> str:
    """``", did you mean 'x'?"`` for the known name closest to ``word`` (typing slips), or ``""``."""
    import difflib

    if not isinstance(word, str) or len(word) > 100:
        return ""
    close = difflib.get_close_matches(word, [str(k) for k in known], n=1, cutoff=0.6)
    return f", did you mean {close[0]!r}?" if close else ""


def check(condition: bool, field: str, message: str) -> None:
    """Raise FieldError(field, message) unless condition holds (for ``__post_init__`` range checks)."""
    if not condition:
        raise FieldError(field, message)


def limit_for(field: str) -> int | None:
    """The upper bound `LIMITS` sets on the (dotted) field ``field``, or None."""
    name = field.rpartition(".")[2].split("[")[0]
    for suffix, limit in LIMITS.items():
        if name == suffix or name.endswith("_" + suffix):
            return limit
    return None


def _checked_int(value: int, field: str) -> int:
    if not -_INT_RANGE < value < _INT_RANGE:
        raise FieldError(field, f"out of range, got {shorten(value)}")
    limit = limit_for(field)
    if limit is not None and value > limit:
        raise FieldError(field, f"must be <= {limit:,}, got {value:,}")
    return value


def _checked_float(value: Any, field: str) -> float:
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        raise FieldError(field, f"must be a finite number, got {shorten(value)}") from None
    if not math.isfinite(number):
        raise FieldError(field, f"must be a finite number, got {shorten(value)}")
    return number


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"list of {_type_name(item)}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, field: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # Optional[X]: X's own error is the informative one
            return _convert(value, arms[0], field)
        for arg in arms:
            try:
                return _convert(value, arg, field)
            except FieldError:
                continue
        choices = [c for arm in arms if typing.get_origin(arm) is Literal for c in typing.get_args(arm)]
        raise FieldError(field, f"expected {_type_name(tp)}, got {shorten(value)}{did_you_mean(value, choices)}")
    if origin is Literal:
        if _hashable(value) and value in typing.get_args(tp):
            return value
        raise FieldError(field, f"expected one of {_type_name(tp)}, got {shorten(value)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise FieldError(field, f"expected {_type_name(tp)}, got {shorten(value)}")
        return [_convert(v, item, f"{field}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict) or not all(isinstance(k, key_type) for k in value):
            raise FieldError(field, f"expected a mapping with {key_type.__name__} keys, got {shorten(value)}")
        return {k: _convert(v, value_type, f"{field}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise FieldError(field, f"expected a mapping, got {shorten(value)}")
        return from_dict(tp, value, prefix=f"{field}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return _checked_int(value, field)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _checked_float(value, field)
        if isinstance(value, str) and len(value) < 100:  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                float(value)
            except ValueError:
                pass
            else:
                return _checked_float(value, field)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config field type {tp!r} for {field}")
    raise FieldError(field, f"expected {_type_name(tp)}, got {shorten(value)}")


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys, types and ranges.

    Raises:
        FieldError: an unknown key, a wrong type or an out-of-range value; ``field`` is the dotted path.
    """
    if not isinstance(data, dict):
        raise FieldError(prefix.rstrip(".") or cls.__name__, f"expected a mapping, got {shorten(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    renamed = getattr(cls, "renamed_fields", {})
    problems: list[FieldError] = []
    kwargs = {}
    for key, value in data.items():
        if key not in fields and key in renamed:
            problems.append(FieldError(f"{prefix}{key}",
                                       f"was renamed to {renamed[key]} (see the glossary in the docs)"))
            continue
        if key not in fields:
            known = ", ".join(fields) or "none"
            problems.append(FieldError(f"{prefix}{key_text(key)}",
                                       f"unknown key{did_you_mean(key, fields)} (known: {known})"))
            continue
        try:
            kwargs[key] = _convert(_overlaid(fields[key], hints[key], value), hints[key], f"{prefix}{key}")
        except FieldError as error:
            problems.extend(error.problems)
    if problems:  # the range checks below would only repeat or mask these
        raise FieldError.of(problems)
    if "version" in kwargs:
        check_version(cls, kwargs["version"], f"{prefix}version")
    try:
        return cls(**kwargs)
    except FieldError as error:
        raise FieldError(f"{prefix}{error.field}", error.message) from None


def _overlaid(field: dataclasses.Field, tp: Any, value: Any) -> Any:
    """``value`` laid over the field's default sub-config where its type asks for that (``overlays_default``)."""
    if not (isinstance(value, dict) and dataclasses.is_dataclass(tp) and getattr(tp, "overlays_default", False)):
        return value
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if not isinstance(default, tp):
        return value
    return {**{f.name: getattr(default, f.name) for f in dataclasses.fields(default) if f.init}, **value}


def supported_version(cls: type) -> int | None:
    """The newest version of config class ``cls`` this torchslim reads (its ``version`` default), or None."""
    field = next((f for f in dataclasses.fields(cls) if f.name == "version"), None)
    return field.default if field is not None and isinstance(field.default, int) else None


def check_version(cls: type, version: Any, field: str = "version") -> None:
    """Refuse a config written for a newer (or no) version of ``cls`` than this torchslim reads.

    Raises:
        FieldError: ``version`` is above `supported_version` or below 1.
    """
    newest = supported_version(cls)
    if newest is None or not isinstance(version, int) or isinstance(version, bool):
        return
    if version > newest:
        raise FieldError(field, f"{cls.__name__} version {version} is newer than this torchslim reads "
                                f"(version {newest}); upgrade torchslim, or write it for version {newest}")
    if version < 1:
        raise FieldError(field, f"must be >= 1, got {version}")


def to_dict(config: Any) -> dict:
    """Plain-dict form of a config dataclass (round-trips through `from_dict`)."""
    return dataclasses.asdict(config)
