"""Shared by tests/unit/test_faults.py and tests/integration/test_faults.py: a trainer command run to its end."""

from __future__ import annotations

from tests import helpers


def run(cmd, timeout=600):
    """``cmd`` run to its end whatever its exit code: the fault tests assert on the code and the last line."""
    return helpers.run(cmd, timeout, check=False)
