"""The ``model:`` blocks owned by registered parts: ``model.conv``, ``model.head`` and each entry of
``model.inserts`` is a ``{kind: NAME, options...}`` mapping validated against the option dataclass that part NAME
registered (:mod:`pipeline.registry`), so new parts add options without touching the config. A block whose ``kind``
changed between layers (:mod:`pipeline.config.layers`) may not keep an option the new kind lacks."""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.config.layers import KIND_CHANGED
from pipeline.config.renamed import RENAMED_BACKBONE_PREFIX, RENAMED_KEYS
from pipeline.config.sections import ModelConfig
from pipeline.config.validation import from_dict, nearest_origin
from pipeline.core.errors import ConfigError
from pipeline.core.schema import PartOptions


def resolve_model(model: ModelConfig, origin: dict) -> None:
    if model.backbone.startswith(RENAMED_BACKBONE_PREFIX[0]):
        plain = model.backbone[len(RENAMED_BACKBONE_PREFIX[0]) :]
        where = origin.get("model.backbone", "defaults")
        raise ConfigError(
            f"{where}: key 'model.backbone': '{model.backbone}' is now "
            + RENAMED_BACKBONE_PREFIX[1].format(plain=plain)
        )
    model.conv = _part("conv", model.conv, "model.conv", origin)
    model.head = _part("head", model.head, "model.head", origin)
    if not isinstance(model.inserts, list):
        raise ConfigError(
            f"{nearest_origin('model.inserts', origin)}: key 'model.inserts' expects a list of "
            f"{{kind: ..., at: ...}} mappings, got {model.inserts!r}"
        )
    model.inserts = [_part("insert", ins, f"model.inserts[{i}]", origin) for i, ins in enumerate(model.inserts)]


_DEFAULT_KINDS = {"conv": "plain", "head": "fc"}  # ModelConfig's defaults


def _part(kind: str, block: Any, key: str, origin: dict):
    """A part's block ({kind: NAME, options...}) → the dataclass NAME registered as its schema."""
    from pipeline import registry

    where = origin.get(key + ".kind") or nearest_origin(key, origin)
    if isinstance(block, PartOptions):
        return block
    if isinstance(block, str):
        block = {"kind": block}  # `model.head=fc` on the command line
    if isinstance(block, dict) and "kind" not in block and kind in _DEFAULT_KINDS:
        block = {"kind": _DEFAULT_KINDS[kind], **block}  # e.g. smoke.yaml's head: {embedding_size: 64}
    if not isinstance(block, dict) or not isinstance(block.get("kind"), str):
        raise ConfigError(
            f"{where}: key '{key}' expects a mapping with a 'kind' ({', '.join(registry.names(kind))}), got {block!r}"
        )
    try:
        schema = registry.lookup(kind, block["kind"], f"{key}.kind").options
    except ConfigError as exc:
        raise ConfigError(f"{where}: key {exc}") from None
    names = {f.name for f in dataclasses.fields(schema)}
    changed_by = origin.get(KIND_CHANGED + key)
    for option in block:
        set_by = origin.get(f"{key}.{option}", "defaults")
        if option not in names and key + "." + option not in RENAMED_KEYS and changed_by and set_by != changed_by:
            # written for another kind in an earlier layer; the kind changed after it (see _merge)
            raise ConfigError(
                f"{set_by}: key '{key}.{option}' is not an option of {kind} kind '{block['kind']}' (set by {changed_by}); "
                f"remove it, or write {key}={{kind: {block['kind']}, ...}} on the command line to start the block afresh"
            )
    return from_dict(schema, block, origin, prefix=key + ".")


__all__ = ["resolve_model"]
