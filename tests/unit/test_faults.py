"""Fault injection (issue 10): real trainer processes on gloo and the real LFW shards, one scenario per test.

| scenario | expected |
|---|---|
| a fresh run in an output.dir that holds a run | one-line error (exit 2); `output.overwrite=true` starts over |
| pruning with an older run's `step_0000040` beside new `step_0000004` | by step number, the new one kept |
| `latest` naming a missing directory | newest complete checkpoint, with a warning |
| SIGTERM to the process group (DataLoader workers included), 1 process | checkpoint written, exit 4 |
| SIGTERM to torchrun, 2 processes | every rank stops at the same step, checkpoint written |
| SIGINT (Ctrl-C) | checkpoint written, exit 4 |
| `optim.lr=1e6` (NaN from step 3) | steps skipped and counted, exit 3 after 5 in a row, finite checkpoint kept |
| one NaN batch in the middle of a run | that step skipped, training goes on, weights finite |
| `output.log_every=0` and friends | one-line error at start-up |
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
