"""Ranges with the types (issue 22 item 5): every numeric field of every config dataclass — the core config and
every registered part's and recipe's options — declares its valid interval, and a value just outside it is a
one-line ConfigError naming the key."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from pipeline import registry
from pipeline.config import Config, ConfigError, field_ranges, load_config, parse_range
from tests.helpers import REPO

BASE = [REPO / "configs" / "arcface_r50.yaml"]


def numeric_fields(cls: type, prefix: str = "") -> list[tuple[type, str, str, type]]:
    """(dataclass, field, dotted key, int|float) for every numeric field under ``cls``."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += numeric_fields(tp, f"{prefix}{f.name}.")
        elif tp in (int, float):
            out.append((cls, f.name, prefix + f.name, tp))
    return out


def part_fields() -> list[tuple[type, str, str, type, list[str]]]:
    """Numeric fields of the registered parts/recipes, with the override that selects the part."""
    registry._discover()
    out = []
    for kind, select in (
        ("conv", lambda n: [f"model.conv={{kind: {n}}}"]),
        ("head", lambda n: [f"model.head={{kind: {n}}}"]),
        ("insert", lambda n: []),
        ("recipe", lambda n: [f"recipe={n}"]),
    ):
        for name in registry.names(kind):
            schema = registry.lookup(kind, name, "x").options
            if schema is None or not schema.__module__.startswith("pipeline."):
                continue  # the built-in parts (a lab's plugin, e.g. tests/plugins, brings its own RANGES or none)
            for cls, fname, _, tp in numeric_fields(schema):
                out.append((cls, fname, f"{kind}:{name}.{fname}", tp, select(name)))
    return out


def outside(rng, tp) -> list:
    """Values just outside an interval (below and above its finite ends), of the field's type."""
    values = []
    if math.isfinite(rng.low):
        below = rng.low if not rng.low_closed else rng.low - (1 if tp is int else 1e-3 * max(1.0, abs(rng.low)))
        values.append(tp(below) if tp is int else below)
    if math.isfinite(rng.high):
        above = rng.high if not rng.high_closed else rng.high + (1 if tp is int else 1e-3 * max(1.0, abs(rng.high)))
        values.append(tp(above) if tp is int else above)
    return values


def test_interval_parsing():
    r = parse_range("[0, 1)")
    assert 0 in r and 0.999 in r and 1 not in r and -1e-9 not in r
    r = parse_range("(0, inf)")
    assert 0 not in r and 1e300 in r
    assert math.pi not in parse_range("[0, pi)")


def test_every_numeric_field_declares_its_range():
    missing = [key for cls, name, key, _ in numeric_fields(Config) if name not in field_ranges(cls)]
    missing += [key for cls, name, key, _, _ in part_fields() if name not in field_ranges(cls)]
    assert not missing, f"numeric config fields without a RANGES entry: {missing}"


@pytest.mark.parametrize("key", [k for _, _, k, _ in numeric_fields(Config)])
def test_a_core_value_outside_its_range_names_the_key(key):
    cls, name, _, tp = next(f for f in numeric_fields(Config) if f[2] == key)
    values = outside(field_ranges(cls)[name], tp)
    assert values, f"{key}: its range has no finite end to step past"
    for value in values:
        with pytest.raises(ConfigError) as err:
            load_config(BASE, [f"{key}={value!r}"])
        msg = str(err.value)
        assert f"key '{key}'" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("key", [k for _, _, k, _, _ in part_fields()])
def test_a_part_value_outside_its_range_names_the_key(key):
    cls, name, _, tp, select = next(f for f in part_fields() if f[2] == key)
    kind, part = key.split(":")[0], key.split(":")[1].split(".")[0]
    for value in outside(field_ranges(cls)[name], tp):
        if kind == "insert":
            overrides = [f"model.inserts=[{{kind: {part}, {name}: {value!r}}}]"]
            dotted = f"model.inserts[0].{name}"
        elif kind == "recipe":
            overrides = [*select, f"method.{name}={value!r}"]
            dotted = f"method.{name}"
        else:
            block = "model.conv" if kind == "conv" else "model.head"
            overrides = [*select, f"{block}.{name}={value!r}"]
            dotted = f"{block}.{name}"
        with pytest.raises(ConfigError) as err:
            load_config(BASE, overrides)
        msg = str(err.value)
        assert f"key '{dotted}'" in msg and "\n" not in msg, msg


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=-0.1",
        "optim.momentum=5",
        "optim.weight_decay=-1",
        "classifier.lr_scale=-1",
        "optim.betas=[2,0.9]",
        "data.shuffle_buffer=-5",
        "schedule.max_steps=-3",
    ],
)
def test_the_reported_values_are_refused(override):
    with pytest.raises(ConfigError, match=rf"key '{override.split('=')[0]}'"):
        load_config(BASE, [override])


def test_cutout_larger_than_the_input_is_refused():
    with pytest.raises(ConfigError, match=r"key 'data.augment.cutout_size' must be <= model.input_size \(112\)"):
        load_config(BASE, ["data.augment.cutout_p=0.5", "data.augment.cutout_size=500"])
    load_config(BASE, ["data.augment.cutout_p=0.5", "data.augment.cutout_size=112"])
