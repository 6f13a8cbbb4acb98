"""Worker of tests/test_fp16_scaling.py: one optimizer step of the real Trainer in fp16 (DeepSpeed stage 0, the
path every one-GPU run takes) or fp32, on a fixed batch; writes the update of every weight to a .pt file.

DeepSpeed refuses fp16 on a CPU whose oneDNN has no fp16 kernels ("Type fp16 is not supported on your device");
torch's own CPU fp16 kernels run this small network fine, so the worker tells DeepSpeed's accelerator it may.

python tests/fp16_scaling_worker.py SHARDS OUT_DIR PRECISION INITIAL_SCALE_POWER RESULT.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deepspeed.accelerator import get_accelerator  # noqa: E402

from pipeline import distributed  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.train import Trainer  # noqa: E402


def master_weights(trainer) -> list[torch.Tensor]:
    """The fp32 weights the optimizer updates, in param-group order (DeepSpeed's fp32 copies under fp16)."""
    groups = getattr(trainer.optimizer, "fp32_groups", None)
    if groups is None:
        groups = [g["params"] for g in trainer.optimizer.param_groups]
    return [p.detach().float().clone() for g in groups for p in g]


def main() -> int:
    shards, out, precision, power, result = sys.argv[1:6]
    get_accelerator().is_fp16_supported = lambda: True
    cfg = load_config(
        [REPO / "configs" / "arcface_r50.yaml", REPO / "configs" / "smoke.yaml"],
        [
            "model.backbone=iresnet18",
            f"data.train={shards}",
            f"output.dir={out}",
            "data.batch_size=8",
            f"deepspeed.precision={precision}",
            f"deepspeed.initial_scale_power={power}",
            "optim.weight_decay=0",  # the update is then -lr x gradient alone: what the loss scale must not change
            "optim.momentum=0",
            "optim.lr=0.1",
        ],
    )
    trainer = Trainer(cfg)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(8, 3, 112, 112, generator=g) * 2 - 1, "label": torch.arange(8)}
    before, cls_before = master_weights(trainer), trainer.classifier.weight.detach().clone()
    scale_before = trainer._loss_scale()
    trainer._micro_step(batch, 0)
    after = master_weights(trainer)
    torch.save(
        {
            "backbone_update": torch.cat([(a - b).flatten() for a, b in zip(after, before)]),
            "classifier_update": (trainer.classifier.weight.detach() - cls_before).flatten(),
            "scale_before": scale_before,
            "scale_after": trainer._loss_scale(),
            "skipped_steps": trainer.skipped_steps,
            "scaled_here": trainer._scale_loss_here,
        },
        result,
    )
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
