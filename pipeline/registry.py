"""Name → builder tables for backbones and recipes.

A recipe module registers itself with :func:`register_recipe`; the trainer looks recipes up by
the config's ``recipe`` name and never branches on it. Built-in modules are imported lazily by
:func:`_load_builtins` so that importing :mod:`pipeline` stays cheap and side-effect free.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

_BACKBONES: dict[str, Callable] = {}
_RECIPES: dict[str, tuple[Callable, type]] = {}

# Modules that register built-in backbones and recipes when first needed.
_BUILTIN_MODULES = (
    "pipeline.models.iresnet",
    "pipeline.models.scan",
    "pipeline.recipes.margin",
    "pipeline.recipes.scan",
    "pipeline.recipes.lrfr",
)
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in _BUILTIN_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real import error inside an existing module
                raise


def register_backbone(name: str):
    """Decorator: ``@register_backbone("iresnet50")`` on ``fn(cfg: ModelConfig) -> nn.Module``."""
    def wrap(fn):
        if name in _BACKBONES:
            raise ValueError(f"backbone '{name}' registered twice")
        _BACKBONES[name] = fn
        return fn
    return wrap


def register_recipe(name: str, config_class: type | None = None):
    """Decorator on ``build(cfg: Config) -> RecipeModel``; ``config_class`` is the schema of ``method:``."""
    def wrap(fn):
        if name in _RECIPES:
            raise ValueError(f"recipe '{name}' registered twice")
        _RECIPES[name] = (fn, config_class or _NoOptions)
        return fn
    return wrap


@dataclasses.dataclass
class _NoOptions:
    pass


def backbone_names() -> list[str]:
    _load_builtins()
    return sorted(_BACKBONES)


def recipe_names() -> list[str]:
    _load_builtins()
    return sorted(_RECIPES)


def build_backbone(model_cfg):
    from pipeline.config import ConfigError

    _load_builtins()
    if model_cfg.backbone not in _BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone '{model_cfg.backbone}' (known: {', '.join(sorted(_BACKBONES))})")
    return _BACKBONES[model_cfg.backbone](model_cfg)


def recipe_config_class(name: str, where: str = "config") -> type:
    from pipeline.config import ConfigError

    _load_builtins()
    if name not in _RECIPES:
        raise ConfigError(f"{where}: key 'recipe' names unknown recipe '{name}' (known: {', '.join(sorted(_RECIPES))})")
    return _RECIPES[name][1]


def build_recipe(cfg):
    _load_builtins()
    recipe_config_class(cfg.recipe)
    return _RECIPES[cfg.recipe][0](cfg)
