"""``model.compile`` (issue 21 item 1): every network the configs compose traces into one graph (no graph break,
Trace and SCAN's per-call state included), and a compiled network computes what the eager one does.

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_compile.py.
"""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config
from tests.helpers import REPO


def test_unknown_compile_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="model.compile"):
        load_config([REPO / "configs" / "arcface_r50.yaml"], ["model.compile=fast"])
