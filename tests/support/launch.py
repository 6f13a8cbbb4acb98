"""Shared by tests/unit/test_launch.py and tests/integration/test_launch.py: fixtures and helpers of both halves."""

from __future__ import annotations

SMOKE = ["--config", "configs/arcface_r50.yaml", "--config", "configs/smoke.yaml"]
