"""Shared by tests/unit/test_config.py and tests/integration/test_config.py: fixtures and helpers of both halves."""

from __future__ import annotations

from pathlib import Path


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p
