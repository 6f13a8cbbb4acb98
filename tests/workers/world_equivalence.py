"""Worker of tests/integration/test_world_equivalence.py: a few optimizer steps of the real Trainer on fixed samples.

    torchrun --nproc_per_node W tests/world_equivalence.py --shards DIR --list LIST --per-rank B --out OUT.pt

Every run sees the same global batches of 2B real LFW faces per step (W = 1: all of them; W = 2: rank r
takes rows rB..(r+1)B). BatchNorm is frozen (eval mode: running statistics, which are the same on every
rank), dropout is 0 and partial FC keeps every class, so the two runs compute the same function and
the same gradients up to float rounding. Rank 0 writes the per-step losses and the final network and
full class-centre matrix to OUT.pt. ``--no-grad-scale`` drops the trainer's ×world scaling of the
embedding gradient (a negative control: the runs must then disagree).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipeline import distributed  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.losses.sharded_classifier import take_shard  # noqa: E402
from pipeline.train import Trainer  # noqa: E402

CHAIN_STEPS = 6  # the batches are a spread over the list fixed for runs of up to this many steps (resumed legs)


def global_batches(list_file: Path, per_rank: int, world_max: int, steps: int):
    """`steps` batches of per_rank·world_max faces: a fixed spread over the list (several identities)."""
    lines = [ln.split("\t") for ln in list_file.read_text().splitlines() if ln.strip()]
    n = per_rank * world_max * steps
    idx = np.linspace(0, len(lines) - 1, n).round().astype(int)
    imgs, labels = [], []
    for i in idx:
        path, label = lines[i]
        arr = np.asarray(Image.open(list_file.parent / path).convert("RGB"), dtype=np.float32)
        imgs.append(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0)
        labels.append(int(label))
    images, labels = torch.stack(imgs), torch.tensor(labels)
    size = per_rank * world_max
    return [(images[s * size : (s + 1) * size], labels[s * size : (s + 1) * size]) for s in range(steps)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", required=True)
    ap.add_argument("--list", required=True)
    ap.add_argument("--per-rank", type=int, default=4, help="B: per-rank batch of the 2-process run")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-grad-scale", action="store_true")
    ap.add_argument("--global-batch", type=int, default=0, help="G (default 2B): any world size dividing it")
    ap.add_argument("--first-batch", type=int, default=0, help="first global batch (a resumed leg of a chain)")
    ap.add_argument("--resume", default="", help="a checkpoint to resume (the trainer's --resume)")
    ap.add_argument("--save", action="store_true", help="write a checkpoint after the steps (trainer.save)")
    args = ap.parse_args()
    info = distributed.init("cpu")
    world, rank = info.world_size, info.rank
    g = args.global_batch or args.per_rank * 2
    b = g // world  # this rank's share of the global batch
    cfg = load_config(
        [REPO / "configs" / "arcface_r50.yaml", REPO / "configs" / "smoke.yaml"],
        [
            "model.backbone=iresnet18",
            "model.head.dropout=0.0",
            f"data.batch_size={b}",
            f"data.train={args.shards}",
            f"output.dir={Path(args.out).with_suffix('')}_run",
            "optim.lr=0.1",
            "optim.momentum=0.9",
            "optim.weight_decay=5e-4",
            "optim.norm_weight_decay=false",  # two parameter groups (ZeRO links their states separately)
            "schedule.kind=step",
            "schedule.milestones=[]",
            "classifier.sample_rate=1.0",
            "deepspeed.zero_stage=1",
            "margin.s=32",
        ],
    )
    trainer = Trainer(cfg, resume=args.resume or None)
    # The same initial class centres for any world size (the trainer initialises each rank's shard
    # from its own seed, which is reproducible but depends on the world size).
    full = (
        torch.randn(
            trainer.loader.num_classes, trainer.model.embedding_size, generator=torch.Generator().manual_seed(5)
        )
        * 0.01
    )
    if not args.resume:
        with torch.no_grad():
            trainer.classifier.weight.copy_(take_shard(full, rank, world))
    if args.no_grad_scale:
        trainer.classifier.embedding_grad_scale = 1.0
    for m in trainer.model.modules():  # BatchNorm frozen: per-rank batch statistics would differ
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    losses = []
    batches = global_batches(Path(args.list), g, 1, max(args.first_batch + args.steps, CHAIN_STEPS))
    for images, labels in batches[args.first_batch : args.first_batch + args.steps]:
        batch = {"image": images[rank * b : (rank + 1) * b], "label": labels[rank * b : (rank + 1) * b]}
        terms = trainer.train_step(batch)
        losses.append(float(terms["total"]))
    net = {k: v.detach().clone() for k, v in trainer.model.net.state_dict().items()}
    centres = trainer.classifier.gather_full(trainer.classifier.weight.detach())
    optimizer = trainer.engine.optimizer_state(
        trainer.model.named_parameters(), keep=distributed.is_main()
    )  # every rank (ZeRO assembles the partitions)
    saved = str(trainer.save()) if args.save else ""
    if rank == 0:
        moments = {k: v["momentum_buffer"] for k, v in optimizer["params"].items() if "momentum_buffer" in v}
        out = {"losses": losses, "net": net, "centres": centres, "moments": moments, "checkpoint": saved}
        torch.save(out, args.out)
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
