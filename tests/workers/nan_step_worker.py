"""Worker of tests/integration/test_faults.py: three optimizer steps of the real Trainer, the second on a batch with a NaN.

python tests/nan_step_worker.py SHARDS OUT_DIR   → prints one JSON line
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipeline import distributed  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.train import Trainer  # noqa: E402


def snapshot(trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])


def main() -> int:
    shards, out = sys.argv[1], Path(sys.argv[2])
    cfg = load_config(
        [REPO / "configs" / "arcface_r50.yaml", REPO / "configs" / "smoke.yaml"],
        ["model.backbone=iresnet18", f"data.train={shards}", f"output.dir={out}", "data.batch_size=8"],
    )
    trainer = Trainer(cfg)
    g = torch.Generator().manual_seed(0)
    changes = []
    for i in range(3):
        batch = {"image": torch.rand(8, 3, 112, 112, generator=g) * 2 - 1, "label": torch.arange(8)}
        if i == 1:
            batch["image"][3, 0, 10, 10] = float("nan")
        before = snapshot(trainer)
        trainer.train_step(batch)
        changes.append(float((snapshot(trainer) - before).abs().max()))
    finite = bool(torch.isfinite(snapshot(trainer)).all())
    print(
        json.dumps(
            {
                "nonfinite_steps": trainer.nonfinite_steps,
                "steps": trainer.step,
                "finite": finite,
                "changed_by_nan_step": changes[1],
                "changed_by_good_step": changes[2],
            }
        )
    )
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
