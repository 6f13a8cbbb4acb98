"""``model.compile`` (issue 21 item 1): every network the configs compose traces into one graph (no graph break,
Trace and SCAN's per-call state included), and a compiled network computes what the eager one does.

On the CPU the tests compile with the ``aot_eager`` backend: Dynamo's capture and AOT autograd's forward/backward
graphs (what inductor receives on a GPU) without generating kernels, so a test takes seconds, not minutes.
"""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config
from tests.helpers import REPO


def test_unknown_compile_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="model.compile"):
        load_config([REPO / "configs" / "arcface_r50.yaml"], ["model.compile=fast"])
