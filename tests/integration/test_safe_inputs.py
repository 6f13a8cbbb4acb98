"""Inputs cannot run code, and bad inputs fail early in one line (issue 10, items 7-8).

- ``.bin`` files are unpickled by one restricted reader (``pipeline.faces.io.read_bin``): the real LFW
  ``.bin``, numpy-array and Python 2 layouts load; a crafted pickle that calls ``os.system`` /
  ``builtins.eval`` is refused before anything runs, by the library and by both CLIs;
- no loader in the source tree unpickles anything else (``torch.load`` always ``weights_only=True``);
- ``pipeline.export``: a truncated/empty ``model.pt``, a garbage ``config.yaml``, an unwritable
  ``--out`` are each one ``error:`` line and exit 2;
- non-finite embeddings are a one-line error naming the set and the count;
- an arcface_torch ``checkpoint_gpu_0.pt`` (backbone under ``state_dict_backbone``) evaluates.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_safe_inputs.py.
"""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO
from tests.support.safe_inputs import _crafted, _one_error_line, _System

# --------------------------------------------------------------------------- fixtures


# --------------------------------------------------------------------------- .bin: what loads


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_clis_refuse_crafted_bin_in_one_line(tmp_path, tiny):
    ck, _ = tiny
    marker = tmp_path / "MARKER"
    crafted = _crafted(tmp_path / "crafted.bin", _System(f"touch {marker}"))
    r = _run(["-m", "data_prep.bin", "info", str(crafted)])
    assert r.returncode == 2 and r.stdout == ""
    assert "crafted.bin: refused pickle global 'posix.system'" in _one_error_line(r.stderr)
    r = _run(["-m", "pipeline.eval", "verify", "--checkpoint", str(ck), "--bin", str(crafted), "--no-progress"])
    assert r.returncode == 2
    assert "crafted.bin: refused pickle global" in _one_error_line(r.stderr)
    r = _run(["-m", "data_prep.bin", "degrade", "--bin", str(crafted), "--out-dir", str(tmp_path / "d"), "--blur", "1"])
    assert r.returncode == 2 and "refused pickle global" in _one_error_line(r.stderr)
    assert not marker.exists() and not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- the source tree
