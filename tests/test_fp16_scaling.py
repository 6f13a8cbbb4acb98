"""fp16 on one GPU trains the backbone with the right gradients (found by the GPU check of 2026-11-27, H100).

DeepSpeed 0.19's engine.backward() scales the loss for its ZeRO optimizers only, while its stage-0 fp16 optimizer
unscales the gradients at step() all the same: every one-GPU fp16 run (stage 0, see pipeline.train.
deepspeed_config) trained with updates 2^16 times too small, and the loss scale never met an overflow (on the
H100 it stayed at 2^30 for 40 steps). The trainer now scales the loss itself there
(pipeline.train.fp16_loss_needs_scaling_here). These tests run the real Trainer in fp16 on the CPU
(tests/fp16_scaling_worker.py) against the same step in fp32.

Tolerances, measured on 2026-11-27 (iresnet18 at the smoke width, batch 8, loss scale 2^8): the fp16 update
differs from the fp32 one by 1.9 % (backbone, relative L2) and 0.47 % (classifier); bounds 5 % and 2 %. Without
the fix both differ by 99.6 % (the update is 1/256 of the fp32 one).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "fp16_scaling_worker.py"


def one_step(shards, tmp: Path, precision: str, scale_power: int) -> dict:
    res = tmp / f"{precision}_{scale_power}.pt"
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(shards), str(tmp / f"run_{precision}_{scale_power}"), precision,
         str(scale_power), str(res)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(res, weights_only=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def fp32_step(lfw_shards, tmp_path_factory):
    return one_step(lfw_shards, tmp_path_factory.mktemp("fp32"), "fp32", 16)


def test_fp16_update_equals_fp32_update(lfw_shards, tmp_path, fp32_step):
    got = one_step(lfw_shards, tmp_path, "fp16", 8)
    assert got["scaled_here"] and got["skipped_steps"] == 0 and got["scale_after"] == 256.0
    assert rel(got["backbone_update"], fp32_step["backbone_update"]) < 0.05
    assert rel(got["classifier_update"], fp32_step["classifier_update"]) < 0.02


def test_fp16_overflow_is_seen_skipped_and_lowers_the_scale(lfw_shards, tmp_path):
    got = one_step(lfw_shards, tmp_path, "fp16", 30)  # 2^30 x this loss overflows fp16 at once
    assert got["skipped_steps"] == 1, got
    assert got["scale_after"] == 2.0**29, got
    assert float(got["backbone_update"].abs().max()) == 0.0  # nothing applied, the classifier neither
    assert float(got["classifier_update"].abs().max()) == 0.0
