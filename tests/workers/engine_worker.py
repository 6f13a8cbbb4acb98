"""Worker of tests/integration/test_engine.py: one process, the real Trainer on the CPU.

1. The host work of one r100 bf16 training step (``Trainer.train_step``: forward, margin classifier, backward,
   optimizer steps, the NaN guard) in launching aten ops and host syncs, and the same for a bare loop (autocast
   forward, backward, foreach SGD) — counted as a CUDA step dispatches them (labels are range-checked on the host on
   the CPU only: that branch is patched to the CUDA one).
2. channels-last through the engine: an r50 bf16 (autocast) forward fed a channels-last batch, as the trainer feeds
   one on CUDA: every convolution's output stays channels-last (forward only: torch 2.13's CPU backward of a
   channels-last batch can abort, scripts/repro/channels_last_cpu_abort.py).
3. Gradient clipping at stage 0 (the Engine's foreach clip): one fp32 SGD step without momentum or weight decay moves
   the backbone by lr × min(‖g‖, clip), and the engine reports the unclipped ‖g‖.

python tests/engine_worker.py SHARDS OUT_DIR RESULT.json
"""

from __future__ import annotations

import json
import sys
import unittest.mock as mock
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.dispatch_count import count_ops  # noqa: E402
from pipeline.models.iresnet import build_iresnet  # noqa: E402
from pipeline.train import Trainer  # noqa: E402

SIZE = 32  # the op count does not depend on the input size or width; a small network counts fast


def trainer(shards: str, out: Path, *overrides: str) -> Trainer:
    cfg = load_config(
        [REPO / "configs" / "arcface_r50.yaml", REPO / "configs" / "smoke.yaml"],
        [f"data.train={shards}", f"output.dir={out}", f"model.input_size={SIZE}", "data.batch_size=4", "device=cpu"]
        + list(overrides),
    )
    return Trainer(cfg)


def as_on_cuda(fn):
    with mock.patch.object(torch.Tensor, "is_cuda", new=property(lambda self: True)):
        with mock.patch.object(torch, "_assert_async", lambda *a, **k: None):
            return count_ops(fn)


def main() -> int:
    shards, out, result = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(4, 3, SIZE, SIZE, generator=g) * 2 - 1, "label": torch.arange(4)}
    res = {}

    tr = trainer(shards, out / "r100", "model.backbone=iresnet100", "model.width=0.0625", "deepspeed.precision=bf16")
    tr.train_step(batch)  # the optimizer's state exists from here on
    counts = as_on_cuda(lambda: tr.train_step(batch))
    res["engine"] = type(tr.engine.optimizer).__name__
    res["trainer_launches"], res["trainer_syncs"] = counts.launches, counts.syncing
    res["trainer_top"] = counts.top(12)

    torch.manual_seed(0)
    net = build_iresnet(100, width=0.0625, embedding_size=512, input_size=SIZE).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True)

    def bare():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(batch["image"])
        out.embedding.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    bare()
    counts = count_ops(bare)
    res["bare_launches"], res["bare_top"] = counts.launches, counts.top(12)

    tr = trainer(shards, out / "r50", "model.backbone=iresnet50", "model.width=0.25", "deepspeed.precision=bf16")
    layouts = []

    def record(module, inputs, output):
        layouts.append(output.is_contiguous(memory_format=torch.channels_last))

    convs = [m for m in tr.model.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks = [m.register_forward_hook(record) for m in convs]
    nhwc = {**batch, "image": batch["image"].contiguous(memory_format=torch.channels_last)}
    with torch.no_grad():
        tr.engine(nhwc)
    for h in hooks:
        h.remove()
    res["channels_last"] = {"convs": len(convs), "outputs": layouts}

    clip, lr = 0.01, 0.1
    tr = trainer(
        shards,
        out / "clip",
        "model.backbone=iresnet18",
        "model.width=0.0625",
        "deepspeed.precision=fp32",
        f"optim.grad_clip={clip}",
        f"optim.lr={lr}",
        "optim.momentum=0",
        "optim.weight_decay=0",
        "schedule.warmup_epochs=0",
    )
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.train_step(batch)
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(tr.model.parameters(), before)])
    res["clip"] = {
        "clip": clip,
        "lr": float(tr.engine.optimizer.param_groups[0]["lr"]),
        "update_norm": float(update.norm()),
    }
    res["clip"]["grad_norm"] = tr.engine.grad_norm()
    result.write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
