"""The layers of a config: YAML files (each with its ``base:`` chain) and ``key=value`` overrides, deep-merged in
order into one dict, with ``origin`` recording which file (or ``command line``) set each key so that every error
can name it. :func:`merge_layers` is the whole of it; :mod:`pipeline.config.load` validates what it returns."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import ConfigError


def read_yaml_mapping(path: Path, kind: str = "config", error: type[Exception] = ConfigError, empty_ok: bool = True):
    """A YAML file whose top level is a mapping (a config layer, an ablation spec, ...). Every failure is one
    ``error`` naming the file: missing, binary junk, invalid YAML (with its line), another top level. An empty
    file is an empty mapping where ``empty_ok``."""
    if not path.is_file():
        raise error(f"{path}: {kind} file does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:  # binary junk, NUL bytes
        raise error(f"{path}: not a YAML text file ({type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise error(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: top level must be a mapping of {kind} keys, got {type(data).__name__}")
    return data


PART_BLOCKS = ("model.conv", "model.head")  # blocks whose schema is chosen by their `kind`
KIND_CHANGED = "#kind changed:"  # origin key prefix: the layer that changed a part block's kind


def _merge(dst: dict, src: dict, origin: dict, source: str, prefix: str = "", replace: str = "") -> None:
    """Deep-merge ``src`` into ``dst``; record in ``origin`` which source set each leaf key.

    A part block (``model.conv``, ``model.head``) whose ``kind`` changes keeps the options written for it
    earlier: ``model.head.embedding_size=128`` then ``model.head.kind=lgaf`` is a 128-d LGAF head. An option the
    new kind lacks is a one-line error naming both layers (:mod:`pipeline.config.parts`), never a silent drop. The
    dotted key ``replace`` (a command-line ``model.head={kind: fc}`` / ``model.conv=plain``) replaces its block whole.
    """
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        old = dst.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and dotted != replace:
            if "kind" in value and "kind" in old and value["kind"] != old["kind"]:
                origin[KIND_CHANGED + dotted] = source  # parts names both layers if an old option does not fit
            _merge(dst[key], value, origin, source, dotted + ".", replace)
        else:
            for stale in [k for k in origin if k.startswith(dotted + ".")]:
                del origin[stale]  # a replaced block's old keys no longer have a source
            dst[key] = copy.deepcopy(value)
            _record_origin(origin, dotted, value, source)


def _record_origin(origin: dict, dotted: str, value: Any, source: str) -> None:
    origin[dotted] = source
    if isinstance(value, dict):
        for sub, v in value.items():
            _record_origin(origin, f"{dotted}.{sub}", v, source)


def _load_layers(path: Path, merged: dict, origin: dict, seen: tuple = ()) -> None:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain")
    data = read_yaml_mapping(path)
    bases = data.pop("base", None) or []
    for base in [bases] if isinstance(bases, str) else bases:
        _load_layers((path.parent / base), merged, origin, seen + (path,))
    _merge(merged, data, origin, str(path))


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw != "" else ""


def _nest(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def merge_layers(paths: list[str | Path] = (), overrides: list[str] = ()) -> tuple[dict, dict]:
    """The YAML layers of ``paths`` (left to right, each on top of its bases), then the ``key=value`` overrides,
    merged into one dict; returns (merged, origin: dotted key → the file or ``command line`` that set it)."""
    merged: dict = {}
    origin: dict = {}
    for p in paths:
        _load_layers(Path(p), merged, origin)
    for text in overrides:
        key, value = parse_override(text)
        _merge(merged, _nest(key, value), origin, "command line", replace=key if key in PART_BLOCKS else "")
    return merged, origin


__all__ = ["KIND_CHANGED", "PART_BLOCKS", "merge_layers", "parse_override", "read_yaml_mapping"]
