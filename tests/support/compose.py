"""Shared by tests/unit/test_compose.py and tests/integration/test_compose.py: fixtures and helpers of both halves."""

from __future__ import annotations

from pipeline.config import load_config
from tests.helpers import REPO

PROBE = REPO / "configs" / "compose" / "probe.yaml"


SMOKE = REPO / "configs" / "smoke.yaml"


def tiny(*overrides, configs=(PROBE,)):
    return load_config([*configs, SMOKE], ["model.input_size=32", *overrides])
