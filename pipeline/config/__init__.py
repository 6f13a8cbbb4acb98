"""Typed configuration loaded from layered YAML files plus ``key=value`` overrides.

A YAML file may name a ``base:`` (a path relative to itself, or a list of them); bases are
merged first, the file on top. Several ``--config`` files are merged left to right, then the
command-line overrides. The merged dict is validated into the dataclasses of the sections: an unknown
key, or a value of the wrong type, is a :class:`ConfigError` whose one-line message names the
key and the file that set it.

The ``method:`` block belongs to the recipe and the blocks ``model.conv``, ``model.head`` and each
entry of ``model.inserts`` to the part their ``kind`` names: their schemas are the dataclasses those
parts registered (see :mod:`pipeline.registry`), so new parts add options without touching this package.

Validation lives with the types: a dataclass may define ``validate(self)`` (checks on its own fields,
raising :class:`Invalid` with the field name) and a recipe's options ``validate_with(self, cfg)``
(checks against the rest of the config). Keys renamed by a redesign are errors that name the new key.

The package, by job (every name is importable from ``pipeline.config`` itself):

* :mod:`~pipeline.config.sections` — the section dataclasses (``ModelConfig`` … ``Config``);
* :mod:`~pipeline.config.layers` — YAML layers, ``base:`` chains, ``key=value`` overrides, the merge;
* :mod:`~pipeline.config.validation` — dict → dataclass with type, range and ``validate()`` checks;
* :mod:`~pipeline.config.parts` — the ``model:`` blocks owned by registered parts (:func:`resolve_model`);
* :mod:`~pipeline.config.load` — :func:`load_config`, :func:`config_from_dict`, dump and reload;
* :mod:`~pipeline.config.renamed` — keys and values of earlier releases.

The shared schema pieces live in :mod:`pipeline.core`: the errors, the part option bases and the numeric
ranges (:mod:`pipeline.core.ranges`).
"""

from __future__ import annotations

from pipeline.config.layers import KIND_CHANGED, PART_BLOCKS, merge_layers, parse_override, read_yaml_mapping
from pipeline.config.load import config_from_dict, config_from_resolved, dump_config, load_config, to_dict
from pipeline.config.parts import resolve_model
from pipeline.config.renamed import RENAMED_BACKBONE_PREFIX, RENAMED_KEYS, RENAMED_VALUES
from pipeline.config.sections import (
    AugmentConfig,
    ClassifierConfig,
    Config,
    DataConfig,
    DeepSpeedConfig,
    MarginConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    ScheduleConfig,
)
from pipeline.config.validation import check, from_dict
from pipeline.core.errors import ConfigError, Invalid
from pipeline.core.ranges import Range, check_ranges, field_ranges, parse_range
from pipeline.core.schema import InsertOptions, PartOptions

__all__ = [
    "KIND_CHANGED",
    "PART_BLOCKS",
    "RENAMED_BACKBONE_PREFIX",
    "RENAMED_KEYS",
    "RENAMED_VALUES",
    "AugmentConfig",
    "ClassifierConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "InsertOptions",
    "Invalid",
    "MarginConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "PartOptions",
    "Range",
    "ScheduleConfig",
    "check",
    "check_ranges",
    "config_from_dict",
    "config_from_resolved",
    "dump_config",
    "field_ranges",
    "from_dict",
    "load_config",
    "merge_layers",
    "parse_override",
    "parse_range",
    "read_yaml_mapping",
    "resolve_model",
    "to_dict",
]
