"""Worker of tests/integration/test_mixed_precision.py and tests/integration/test_mixed_precision.py: one optimizer step of the real Trainer, one
rank, at a given precision, on a fixed batch; then a second step under torch.profiler to count device→host reads.
Writes the update of every weight (the optimizer's fp32 master copy) and the counts to a .pt file.

DeepSpeed refuses fp16 on a CPU whose oneDNN has no fp16 kernels ("Type fp16 is not supported on your device");
torch's own CPU fp16 kernels run this small network fine, so the worker tells DeepSpeed's accelerator it may.

python tests/step_worker.py SHARDS OUT_DIR PRECISION INITIAL_SCALE_POWER RESULT.pt [BACKBONE]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from deepspeed.accelerator import get_accelerator  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from pipeline import distributed  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.train import Trainer  # noqa: E402


def master_weights(trainer) -> list[torch.Tensor]:
    """The fp32 weights the optimizer updates (DeepSpeed's master copies under bf16/fp16), in model order."""
    out = []
    for p in trainer.model.parameters():
        hp = safe_get_full_fp32_param(p)
        out.append((hp if hp is not None else p).detach().float().clone())
    return out


def main() -> int:
    shards, out, precision, power, result = sys.argv[1:6]
    backbone = sys.argv[6] if len(sys.argv) > 6 else "iresnet18"
    get_accelerator().is_fp16_supported = lambda: True
    cfg = load_config(
        [REPO / "configs" / "arcface_r50.yaml", REPO / "configs" / "smoke.yaml"],
        [
            f"model.backbone={backbone}",
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
    scale_before = trainer.engine.loss_scale
    trainer.train_step(batch)
    after = master_weights(trainer)
    res = {
        "backbone_update": torch.cat([(a - b).flatten() for a, b in zip(after, before)]),
        "classifier_update": (trainer.classifier.weight.detach() - cls_before).flatten(),
        "scale_before": scale_before,
        "scale_after": trainer.engine.loss_scale,
        "skipped_steps": trainer.skipped_steps,
        "optimizer": type(trainer.engine.optimizer).__name__,
        "parameters": sum(1 for _ in trainer.model.parameters()),
    }
    # .item(), bool(tensor), float(tensor) all end in aten::_local_scalar_dense: one device→host read each
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(batch)
    counts = {e.key: e.count for e in prof.key_averages()}
    res["host_reads_per_step"] = counts.get("aten::_local_scalar_dense", 0)
    res["skipped_steps_after_two"] = trainer.skipped_steps
    res["scale_after_two"] = trainer.engine.loss_scale
    torch.save(res, result)
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
