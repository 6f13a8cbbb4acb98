"""A checkpoint of an earlier release (tests/fixtures/ckpt_01e6669: written by the trainer at commit 01e6669, before
the engine / core / SCAN changes of 2026-12-05) still loads in eval and export and still resumes (issue 20 item 3).

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_old_checkpoint.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.helpers import REPO, train_command
from tests.support.old_checkpoint import FIXTURE, STEP

SAME = ["model.backbone=iresnet18", "model.input_size=32", "model.head.embedding_size=16"]  # how it was made


def test_old_checkpoint_exports_to_onnx(tmp_path):
    out = tmp_path / "old.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.export", "--checkpoint", str(STEP), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert out.is_file() and out.stat().st_size > 0


def test_old_checkpoint_resumes(lfw_shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(FIXTURE / "checkpoints", run / "checkpoints")
    cmd = train_command(
        *SAME,
        "schedule.max_steps=4",
        "output.checkpoint_every=2",
        "output.log_every=1",
        f"data.train={lfw_shards}",
        f"output.dir={run}",
        "--resume",
        # the shards were made the same way (1,814 images, 111 classes: the trainer checks that) at another path
        "--resume-changes",
        "data.train",
    )
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 3/4" in proc.stdout and "step 4/4" in proc.stdout  # continued from step 2
    assert (run / "checkpoints" / "step_0000004" / "model.pt").is_file()
