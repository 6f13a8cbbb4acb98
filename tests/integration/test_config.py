"""Config layering, overrides and one-line errors; schedules stated in epochs.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_config.py.
"""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO
from tests.support.config import write


def test_train_cli_one_line_error(tmp_path):
    cfg = write(tmp_path, "c.yaml", f"base: {REPO / 'configs/smoke.yaml'}\ndata: {{train: {tmp_path / 'missing'}}}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and "missing" in err[-1] and "does not exist" in err[-1]
    assert "Traceback" not in proc.stderr
