"""No hang, ever (issue 22 item 1): a fault at any stage of a 2-process run with DataLoader workers ends every
process within 60 s, with a non-zero exit code and one ``error:`` line naming the cause; a checkpoint that cannot be
written (ENOSPC, EROFS) leaves the previous checkpoint intact and no ``.tmp_*`` behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.checkpoint import checkpoints, verify
from tests.helpers import REPO

BOUND_S = 60


def alive(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


def run_with_fault(lfw_shards, out: Path, stage: str, rank: int, at: int) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "FAULT_STAGE": stage, "FAULT_RANK": str(rank), "FAULT_AT": str(at), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(REPO / "tests" / "workers" / "fault_worker.py"),
        "--config", "configs/arcface_r50.yaml", "--config", "configs/smoke.yaml",
        "model.backbone=iresnet18", "data.batch_size=8", "data.num_workers=1", "schedule.max_steps=6",
        "output.log_every=1", "output.checkpoint_every=2", "output.eval_every=0", "output.histogram_every=0",
        f"data.train={lfw_shards}", f"output.dir={out}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    ended = time.time()
    fired = re.findall(r"FAULT_FIRED ([0-9.]+)", proc.stderr)
    assert fired, f"the fault never fired\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, ended - float(fired[0])


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage,rank,at,cause",
    [
        ("loader", 1, 2, "injected fault at stage loader"),
        ("forward", 0, 3, "injected fault at stage forward"),
        ("backward", 1, 3, "injected fault at stage backward"),
        ("step", 0, 2, "injected fault at stage step"),
        ("logging", 0, 2, "injected fault at stage logging"),
        ("eval", 0, 0, "injected fault at stage eval"),
        ("checkpoint", 0, 1, "no space left on the device (ENOSPC)"),
        ("finalize", 0, 1, "the file system is read-only (EROFS)"),
    ],
)
def test_a_fault_at_any_stage_ends_every_process_promptly(lfw_shards, tmp_path, stage, rank, at, cause):
    out = tmp_path / f"run_{stage}"
    proc, took = run_with_fault(lfw_shards, out, stage, rank, at)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert took <= BOUND_S, f"{stage}: the run took {took:.1f} s to end after the fault"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert any(cause in line for line in errors), (errors, proc.stderr[-3000:])
    assert not alive(str(out)), alive(str(out))  # no rank, no DataLoader worker left behind
    if stage in ("checkpoint", "finalize"):
        root = out / "checkpoints"
        assert not list(root.glob(".tmp_*")), list(root.iterdir())
        kept = checkpoints(root)
        assert [c.name for c in kept] == ["step_0000002"] and verify(kept[0]) is None  # the previous one, intact
        assert any("the previous checkpoint is kept" in line for line in errors)
