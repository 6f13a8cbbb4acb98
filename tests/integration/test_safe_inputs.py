"""Inputs cannot run code, and bad inputs fail early in one line (issue 10, items 7-8).

- ``.bin`` files are unpickled by one restricted reader (``data_prep.bin.read_bin``): the real LFW
  ``.bin``, numpy-array and Python 2 layouts load; a crafted pickle that calls ``os.system`` /
  ``builtins.eval`` is refused before anything runs, by the library and by both CLIs;
- no loader in the source tree unpickles anything else (``torch.load`` always ``weights_only=True``);
- ``pipeline.export``: a truncated/empty ``model.pt``, a garbage ``config.yaml``, an unwritable
  ``--out`` are each one ``error:`` line and exit 2;
- non-finite embeddings are a one-line error naming the set and the count;
- an arcface_torch ``checkpoint_gpu_0.pt`` (backbone under ``state_dict_backbone``) evaluates.
"""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import registry
from pipeline.config import dump_config, load_config

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = "model: {backbone: iresnet18, width: 0.0625, input_size: 48, head: {kind: fc, embedding_size: 16}}\n"


def _one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A checkpoint dir as the trainer writes it (config.yaml + model.pt) and its network."""
    root = tmp_path_factory.mktemp("safe_ckpt")
    (root / "recipe.yaml").write_text(TINY_MODEL)
    cfg = load_config([root / "recipe.yaml"])
    torch.manual_seed(0)
    net = registry.build_recipe(cfg).net
    ck = root / "ck"
    ck.mkdir()
    dump_config(cfg, ck / "config.yaml")
    torch.save(net.state_dict(), ck / "model.pt")
    return ck, net.eval()


# --------------------------------------------------------------------------- .bin: what loads


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _crafted(path: Path, payload, protocol: int = 4, nested: bool = False) -> Path:
    obj = ([b"a", payload], [True]) if nested else payload
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


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


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""
