"""The training engine's host work (issue 21 item 2): a bf16 step is a bare autocast loop's, not DeepSpeed's loop
over parameters; the one host sync is the NaN guard's; stage-0 clipping clips.

Measured 2026-12-05 (torch 2.13 CPU, DeepSpeed 0.19.8): an r100 bf16 trainer step dispatched 2,505 launching aten ops
under DeepSpeed's BF16_Optimizer (2.0× the bare loop's 1,248; per parameter a norm, an fp32 gradient accumulation,
a clip) and 4 host reads; under the autocast engine with foreach SGD 1,403 (1.12×, the margin classifier and its
optimizer included) and the NaN guard's one read.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="module")
def counted(lfw_shards, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("engine")
    result = tmp / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "workers" / "engine_worker.py"),
            str(lfw_shards),
            str(tmp / "out"),
            str(result),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(result.read_text())


def test_bf16_step_launches_at_most_115_percent_of_a_bare_loop(counted):
    ratio = counted["trainer_launches"] / counted["bare_launches"]
    print(
        f"r100 bf16 step: trainer {counted['trainer_launches']} launching ops ({counted['engine']}), bare loop "
        f"{counted['bare_launches']}: {ratio:.3f}×\n  trainer: {counted['trainer_top']}\n  bare: {counted['bare_top']}"
    )
    assert counted["engine"] == "SGD"  # the client optimizer itself: no DeepSpeed wrapper at stage 0
    assert ratio <= 1.15, ratio


def test_the_only_host_sync_is_the_nan_guard(counted):
    assert counted["trainer_syncs"] == ["_local_scalar_dense"], counted["trainer_syncs"]


def test_stage0_clipping_bounds_the_update(counted):
    c = counted["clip"]
    assert c["grad_norm"] is not None and c["grad_norm"] > 10 * c["clip"]  # the clip is active on this step
    # SGD without momentum / weight decay: the update is lr × the clipped gradient, of norm lr × clip
    assert abs(c["update_norm"] - c["lr"] * c["clip"]) <= 1e-4 * c["lr"] * c["clip"], c


def test_conv_outputs_stay_channels_last_through_the_engine(counted):
    """The trainer converts only the input batch (on CUDA; a weight layout would not survive DeepSpeed's
    broadcast and flattening): every conv of an r50 then computes channels-last under the bf16 engine."""
    cl = counted["channels_last"]
    assert cl["convs"] >= 20 and len(cl["outputs"]) == cl["convs"] and all(cl["outputs"]), cl
