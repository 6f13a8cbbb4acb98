"""Name → builder tables for every composable part of a face model and of its training.

Five kinds of part register themselves where they are defined:

=========  ===========================================  ==========================================
kind       what it is                                    config key that names it
=========  ===========================================  ==========================================
backbone   a trunk: stem + named stages (iresnet50, …)   ``model.backbone``
conv       how the trunk's 3×3 convolutions are built    ``model.conv.kind`` (plain, scan)
insert     a module at a named point of the trunk         ``model.inserts[i].kind``
head       stage map(s) → embedding (fc, …)              ``model.head.kind``
recipe     the training procedure (margin, lrfr)         ``recipe``
=========  ===========================================  ==========================================

``@register(kind, name, options=SomeDataclass)`` on a builder. ``options`` is the schema of the part's
config block (its keys besides ``kind``); validation errors name the key. Every module under the
packages :data:`_PACKAGES` is imported the first time a table is read, so a new part is one new file
in one of them: no existing file lists it. Parts defined outside this package (a lab's own head) are
named in the config's ``plugins:`` list and imported by the config loader.

Ablation diagnostics (``diagnostics:`` of an ablation spec, :mod:`pipeline.experiments`) have their own table:
``@register_diagnostic(name)`` on ``fn(net, cfg, ctx: DiagnosticContext) -> {column: float}``. The generic ones
live with the runner (:mod:`pipeline.experiments.diagnostics`), a model's own with the model (e.g. LCD's in
``pipeline/models/lcd_probes.py``); :func:`diagnostics` imports the model and recipe packages before answering.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

KINDS = ("backbone", "conv", "insert", "head", "recipe")
_PACKAGES = ("pipeline.models", "pipeline.recipes")
_TABLES: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
_discovered = False


class Entry(NamedTuple):
    build: Callable
    options: type  # dataclass: the schema of the part's config block


@dataclasses.dataclass
class NoOptions:
    """The schema of a part without options."""


def _discover() -> None:
    """Import every module of the model and recipe packages (each registers what it defines)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for pkg_name in _PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg_name + "."):
            importlib.import_module(info.name)


def import_plugins(modules: list[str], where: str = "config") -> None:
    """Import the ``plugins:`` modules of a config (each registers its parts); a failure names the module."""
    from pipeline.core.errors import ConfigError

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"{where}: key 'plugins': cannot import '{name}' ({type(exc).__name__}: {exc})") from None


def register(kind: str, name: str, options: type | None = None):
    """Decorator: ``@register("head", "fc", FCHeadOptions)`` on the part's builder."""
    if kind not in _TABLES:
        raise ValueError(f"unknown part kind '{kind}' (known: {', '.join(KINDS)})")

    if options is None and kind in ("conv", "insert", "head"):
        from pipeline.core.schema import InsertOptions, PartOptions

        options = InsertOptions if kind == "insert" else PartOptions

    def wrap(fn):
        if name in _TABLES[kind]:
            raise ValueError(f"{kind} '{name}' registered twice")
        _TABLES[kind][name] = Entry(fn, options or NoOptions)
        return fn

    return wrap


def names(kind: str) -> list[str]:
    _discover()
    return sorted(_TABLES[kind])


def lookup(kind: str, name: str, key: str) -> Entry:
    """The entry for ``name``; an unknown name is a ConfigError naming ``key`` and the known names."""
    from pipeline.core.errors import ConfigError

    _discover()
    table = _TABLES[kind]
    if name not in table:
        raise ConfigError(f"{key}: unknown {kind} '{name}' (known: {', '.join(sorted(table))})")
    return table[name]


# Convenience spellings used across the code base.
def register_backbone(name: str, options: type | None = None):
    return register("backbone", name, options)


def register_recipe(name: str, options: type | None = None):
    return register("recipe", name, options)


def backbone_names() -> list[str]:
    return names("backbone")


def recipe_names() -> list[str]:
    return names("recipe")


def build_recipe(cfg):
    """The training procedure (an ``nn.Module`` holding the network) described by a whole Config."""
    return lookup("recipe", cfg.recipe, "recipe").build(cfg)


# --------------------------------------------------------------------------- ablation diagnostics


@dataclasses.dataclass(frozen=True)
class DiagnosticContext:
    """What a diagnostic may read besides the network and its config (built by the ablation runner)."""

    run_dir: Path  # the cell's trainer output.dir (tb/, checkpoints/)
    eval_sets: list  # the spec's evaluation sets, in order (``.name``; ``.load(input_size)`` → uint8 images, target)
    device: Any  # torch.device the network is on
    input_size: int
    embeddings: dict  # set name → float32 (2P, D) embeddings of its images, no flip, not normalised (numpy)


DiagnosticFn = Callable[[Any, Any, DiagnosticContext], dict[str, float]]
_DIAGNOSTICS: dict[str, DiagnosticFn] = {}


def register_diagnostic(name: str) -> Callable[[DiagnosticFn], DiagnosticFn]:
    """``@register_diagnostic("name")`` on ``fn(net, cfg, ctx) -> {column: float}``; a spec lists it by name."""

    def register_fn(fn: DiagnosticFn) -> DiagnosticFn:
        if name in _DIAGNOSTICS and _DIAGNOSTICS[name] is not fn:
            raise ValueError(f"diagnostic '{name}' is registered twice")
        _DIAGNOSTICS[name] = fn
        return fn

    return register_fn


def diagnostics() -> dict[str, DiagnosticFn]:
    """Every registered diagnostic by name, the model and recipe packages imported first (their diagnostics
    register there); a copy."""
    _discover()
    return dict(_DIAGNOSTICS)
