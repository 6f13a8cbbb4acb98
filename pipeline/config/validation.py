"""Typed validation of config dicts: :func:`from_dict` builds a config dataclass (or a part's option schema) from
a dict, checking every key against the fields (unknown and renamed keys are errors), every value against the field's
type, then the numeric ranges and the class's ``validate()``; :func:`check` does the same checks on an object built
in code. Every failure is one :class:`ConfigError` line naming the key and the file that set it (``origin``)."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

from pipeline.config.renamed import RENAMED_KEYS
from pipeline.config.sections import Config
from pipeline.core.errors import ConfigError, Invalid
from pipeline.core.ranges import check_ranges

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_value(tp: Any, value: Any, key: str, origin: dict) -> Any:
    where = origin.get(key) or nearest_origin(key, origin)

    def fail(expected: str):
        raise ConfigError(f"{where}: key '{key}' expects {expected}, got {value!r}")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(f"a mapping of {tp.__name__} fields")
        return from_dict(tp, value, origin, prefix=key + ".")
    org = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if tp is list or org is list:
        if isinstance(value, str) and tp is list:
            return [value]  # `data.val=a.bin` on the command line
        if not isinstance(value, list):
            fail("a list")
        args = typing.get_args(tp)
        return [_check_value(args[0], v, key, origin) for v in value] if args else value
    if tp is dict or org is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        return value
    if org in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _check_value(arg, value, key, origin)
            except ConfigError:
                continue
        fail(str(tp))
    return value


def nearest_origin(key: str, origin: dict) -> str:
    """The source that set ``key`` or any key under it (used for block-level errors)."""
    for k, src in origin.items():
        if k.startswith(key + ".") or key.startswith(k + "."):
            return src
    return "defaults"


def check(obj, prefix: str):
    """Validate a config object built in code (not loaded from YAML): its ``validate()`` and those of the
    config objects inside it; a failure is a ConfigError naming ``prefix`` + the key. Returns ``obj``."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check(value, f"{prefix}{f.name}.")
    try:
        check_ranges(obj)
        if hasattr(obj, "validate"):
            obj.validate()
    except Invalid as exc:
        raise ConfigError(f"{prefix}{exc.key}: {exc.message}") from None
    return obj


def run_validation(check, prefix: str, origin: dict) -> None:
    try:
        check()
    except Invalid as exc:
        dotted = prefix + exc.key
        where = origin.get(dotted) or nearest_origin(dotted, origin)
        raise ConfigError(f"{where}: key '{dotted}' {exc.message}") from None


def from_dict(cls: type, data: dict, origin: dict | None = None, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown, renamed or ill-typed keys and values that fail the
    class's ``validate()`` raise :class:`ConfigError`."""
    origin = origin or {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            where = origin.get(dotted) or nearest_origin(dotted, origin)
            if dotted in RENAMED_KEYS:
                raise ConfigError(f"{where}: key '{dotted}' was renamed: write {RENAMED_KEYS[dotted]}")
            raise ConfigError(f"{where}: unknown key '{dotted}' (known: {', '.join(sorted(names))})")
        if cls is Config and key == "method":
            kwargs[key] = value  # validated against the recipe's schema by config_from_dict
            continue
        kwargs[key] = _check_value(hints[key], value, dotted, origin)
    obj = cls(**kwargs)
    run_validation(lambda: check_ranges(obj), prefix, origin)
    if hasattr(obj, "validate"):
        run_validation(obj.validate, prefix, origin)
    return obj


__all__ = ["check", "from_dict", "nearest_origin", "run_validation"]
