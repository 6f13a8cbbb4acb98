"""Fault injection (issue 10): real trainer processes on gloo and the real LFW shards, one scenario per test.

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_faults.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError, load_config
from tests.helpers import REPO

# --------------------------------------------------------------------------- checkpoints


def _fake_checkpoint(root: Path, step: int) -> Path:
    d = root / ckpt.step_name(step)
    d.mkdir(parents=True)
    for f in ("trainer.json", "model.pt", "config.yaml"):
        (d / f).write_text("{}")
    return d


def test_pruning_is_by_step_number_and_never_drops_the_new_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 40)  # left by an earlier, longer run
    for step in (2, 4, 6):
        (root / ckpt.tmp_name(step)).mkdir(parents=True)
        for f in ("trainer.json", "model.pt", "config.yaml"):
            (root / ckpt.tmp_name(step) / f).write_text("{}")
        final = ckpt.finalize(root, step, keep=2)
        assert final.is_dir() and (root / "latest").read_text().strip() == final.name
    # by name, step_0000040 sorts after step_0000006 and the new checkpoints would have been pruned
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000004", "step_0000006", "step_0000040"]
    assert ckpt.resolve(root).name == "step_0000006"


def test_dangling_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 4)
    _fake_checkpoint(root, 12)
    (root / "step_0000016").mkdir()  # incomplete (no trainer.json)
    (root / "latest").write_text("step_0000020\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ckpt.resolve(root).name == "step_0000012"
    assert any("missing or incomplete" in str(w.message) for w in caught)
    for d in root.glob("step_*"):
        for f in d.iterdir():
            f.unlink()
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        ckpt.resolve(root)


@pytest.mark.parametrize(
    "key",
    [
        "output.log_every=0",
        "output.checkpoint_every=0",
        "output.keep_checkpoints=0",
        "output.eval_every=-1",
        "optim.max_nonfinite_steps=0",
    ],
)
def test_zero_intervals_are_one_line_config_errors(key):
    with pytest.raises(ConfigError) as exc:
        load_config([REPO / "configs" / "smoke.yaml"], [key])
    assert key.split("=")[0] in str(exc.value) and "\n" not in str(exc.value)


# --------------------------------------------------------------------------- resume that cannot be fooled
