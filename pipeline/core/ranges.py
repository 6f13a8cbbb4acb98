"""Valid ranges of numeric config fields, written as intervals: the ``RANGES`` class attribute of a config
dataclass or a part's option schema (field name → ``"[0, 1)"``), parsed once per class and checked by the config
loader (:func:`check_ranges`, raising :class:`~pipeline.core.errors.Invalid` with the field name)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.core.errors import Invalid

__all__ = ["Range", "check_ranges", "field_ranges", "parse_range"]

_RANGE_RE = re.compile(r"^([\[(])\s*([^,]+?)\s*,\s*([^,\])]+?)\s*([\])])(?:\s*:\s*(.+))?$")


@dataclass(frozen=True)
class Range:
    """An interval written as in mathematics: ``"[0, 1)"``, ``"(0, inf)"``, ``"[16, inf)"``, ``"[0, pi)"``; after a
    colon, why (``"[0, inf): 0 disables"``), which the error message repeats."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool
    text: str
    note: str = ""

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below


def parse_range(text: str) -> Range:
    m = _RANGE_RE.match(text.strip())
    if not m:
        raise ValueError(f"not an interval: {text!r}")
    value = {"inf": math.inf, "-inf": -math.inf, "pi": math.pi}
    low, high = (value[v] if v in value else float(v) for v in (m.group(2), m.group(3)))
    interval = f"{m.group(1)}{m.group(2)}, {m.group(3)}{m.group(4)}"
    return Range(low, high, m.group(1) == "[", m.group(4) == "]", interval, m.group(5) or "")


def field_ranges(cls: type) -> dict[str, Range]:
    """The valid range of each numeric field of a config dataclass: its class attribute ``RANGES`` (a mapping of
    field name → interval text; every int/float field has one, tests/unit/test_config_ranges.py walks them all)."""
    cached = cls.__dict__.get("_parsed_ranges")
    if cached is None:
        cached = {}
        for klass in reversed(cls.__mro__):
            cached.update({k: parse_range(v) for k, v in klass.__dict__.get("RANGES", {}).items()})
        cls._parsed_ranges = cached
    return cached


def check_ranges(obj) -> None:
    """Raise :class:`Invalid` for the first numeric field of ``obj`` outside its :func:`field_ranges` interval."""
    for name, rng in field_ranges(type(obj)).items():
        value = getattr(obj, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in rng:
            why = f" ({rng.note})" if rng.note else ""
            raise Invalid(name, f"must be in {rng.text}{why}, got {value}")
