"""Shared by tests/unit/test_eval_report.py and tests/integration/test_eval_report.py: fixtures and helpers of both halves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_prep.bin import degrade_bin
from pipeline import registry
from pipeline.config import dump_config, load_config
from pipeline.faces.io import read_bin, write_bin

SIZE = 56  # network input (px): small keeps the 2-core CPU time down


COPY = {"blur:1": "blur1", "lr:7": "lr7", "cross:7": "lr7_cross", "blur-cross:1": "blur1_cross"}


@pytest.fixture(scope="module")
def lfw200_bin(lfw_bin, tmp_path_factory) -> Path:
    bins, issame = read_bin(lfw_bin)
    out = tmp_path_factory.mktemp("bins") / "lfw200.bin"
    write_bin(out, bins[:400], issame[:200])
    return out


@pytest.fixture(scope="module")
def copies(lfw200_bin) -> dict[str, Path]:
    """label → the copy ``data_prep.bin degrade`` writes (blur σ 1 and 7 px, full and cross)."""
    degrade_bin(lfw200_bin, lfw200_bin.parent / "deg", blur=[1], lowres=[7], cross=True, progress=False)
    out = {"clean": lfw200_bin}
    for label, suffix in COPY.items():
        out[label] = lfw200_bin.parent / "deg" / f"lfw200_{suffix}.bin"
        assert out[label].is_file()
    return out


def make_run(root: Path, seed: int) -> Path:
    """A run directory (checkpoints/step_0000002 + latest) holding a random-init tiny iresnet18 at 56 px."""
    cfg = load_config(
        [],
        ["model.backbone=iresnet18", "model.width=0.0625", "model.head.embedding_size=32", f"model.input_size={SIZE}"],
    )
    ck = root / "checkpoints" / "step_0000002"
    ck.mkdir(parents=True)
    dump_config(cfg, ck / "config.yaml")
    torch.manual_seed(seed)
    torch.save(registry.build_recipe(cfg).net.state_dict(), ck / "model.pt")
    (ck.parent / "latest").write_text("step_0000002\n")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("runs")
    return [make_run(base / "run_a", 1), make_run(base / "run_b", 2)]
