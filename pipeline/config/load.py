"""The config's front door: :func:`load_config` merges the layers (:mod:`pipeline.config.layers`) and validates
them into a :class:`Config` (:func:`config_from_dict`: the sections, the recipe's ``method:`` options, the part
blocks of ``model:``, then the recipe's checks against the whole config); :func:`dump_config` writes the resolved
config a checkpoint keeps and :func:`config_from_resolved` reads it back."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.layers import merge_layers
from pipeline.config.parts import resolve_model
from pipeline.config.renamed import RENAMED_VALUES
from pipeline.config.sections import Config
from pipeline.config.validation import from_dict, run_validation
from pipeline.core.errors import ConfigError


def load_config(paths: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Merge YAML layers and ``key=value`` overrides, then validate into a :class:`Config`."""
    merged, origin = merge_layers(paths, overrides)
    return config_from_dict(merged, origin)


def config_from_dict(merged: dict, origin: dict | None = None) -> Config:
    """Validate a merged dict into a :class:`Config`, resolving the blocks owned by registered parts."""
    from pipeline import registry

    origin = origin or {}
    cfg = from_dict(Config, merged, origin)
    registry.import_plugins(cfg.plugins, origin.get("plugins", "defaults"))
    where = origin.get("recipe", "defaults")
    renamed = RENAMED_VALUES.get(("recipe", cfg.recipe))
    if renamed:
        raise ConfigError(f"{where}: key 'recipe': '{cfg.recipe}' is no longer a recipe; write {renamed}")
    try:
        schema = registry.lookup("recipe", cfg.recipe, "recipe").options
    except ConfigError as exc:
        raise ConfigError(f"{where}: key {exc}") from None
    cfg.method = from_dict(schema, cfg.method or {}, origin, prefix="method.")
    resolve_model(cfg.model, origin)
    check = getattr(cfg.method, "validate_with", None)
    if check is not None:
        run_validation(lambda: check(cfg), "", origin)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config (what a checkpoint was trained with) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_from_resolved(path: str | Path) -> Config:
    """Load a config written by :func:`dump_config` (a single self-contained layer)."""
    return load_config([path])


__all__ = ["config_from_dict", "config_from_resolved", "dump_config", "load_config", "to_dict"]
