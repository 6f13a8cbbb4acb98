"""Shared by tests/unit/test_safe_inputs.py and tests/integration/test_safe_inputs.py: fixtures and helpers of both halves."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch

from pipeline import registry
from pipeline.config import dump_config, load_config

TINY_MODEL = "model: {backbone: iresnet18, width: 0.0625, input_size: 48, head: {kind: fc, embedding_size: 16}}\n"


def _one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


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


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _crafted(path: Path, payload, protocol: int = 4, nested: bool = False) -> Path:
    obj = ([b"a", payload], [True]) if nested else payload
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""
