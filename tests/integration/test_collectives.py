"""Every collective goes through pipeline.collectives, which checks devices (issue 9, item 1).

The device check itself is exercised for the backends a CUDA run uses (an NCCL-only group would reject
a CPU tensor, the cpu:gloo,cuda:nccl group accepts both) without a GPU; the audit runs each training
procedure for 2 steps on 2 gloo processes (logging, histograms, a checkpoint and verification included)
with every torch.distributed collective wrapped, and finds none issued outside the module except by
DeepSpeed's engine.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_collectives.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

CASES = {
    "margin": ["--config", "configs/arcface_r50.yaml", "model.backbone=iresnet18"],
    "scan": ["--config", "configs/scan_r18_casia.yaml"],
    "lrfr": ["--config", "configs/lrfr_r34_casia.yaml", "model.backbone=iresnet18"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_collective_of_a_training_run_goes_through_the_module(case, lfw_shards, lfw_bin, tmp_path):
    audit = tmp_path / "audit"
    args = [
        *CASES[case][:2],
        "--config",
        "configs/smoke.yaml",
        *CASES[case][2:],
        "schedule.max_steps=2",
        "output.log_every=1",
        "output.histogram_every=1",
        "output.checkpoint_every=2",
        f"data.val=[{lfw_bin}]",
        f"data.train={lfw_shards}",
        f"output.dir={tmp_path / 'run'}",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "workers" / "collective_audit.py"),
        str(audit),
        *args,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    for rank in (0, 1):
        rep = json.loads((audit / f"rank{rank}.json").read_text())
        assert rep["rc"] == 0
        assert rep["violations"] == [], rep["violations"]
        counts = rep["counts"]
        # the classifier's all-gathers / reductions, the logged means, the stop flag, the checkpoint
        assert counts.get("collectives:all_gather", 0) >= 4 and counts.get("collectives:all_reduce", 0) >= 8, counts
        assert counts.get("collectives:barrier", 0) >= 1, counts
        assert set(rep["devices"]) == {"cpu"}
