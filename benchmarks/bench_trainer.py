"""Trainer overhead: samples/s of the trainer's step (DeepSpeed engine + sharded classifier +
recipe contract + logging hooks) vs a bare PyTorch loop of the same model and loss, in one process.

    .venv/bin/python -m benchmarks.bench_trainer [--backbone iresnet50] [--batch 32] [--steps 4] [--rounds 3]

Both loops see the same in-memory batch (data loading is measured by bench_loaders.py), run
alternately for several rounds so machine noise hits both, and the ratio is printed. Ratios are
taken from the process's CPU time (all threads) as well as wall time: on a shared machine the
wall clock mostly measures the neighbours.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file: its imports need the repository root, which `python -m` puts on sys.path
    raise SystemExit(f"run it from the repository root: python -m benchmarks.{Path(__file__).stem}")

import torch
import torch.nn.functional as F

from benchmarks.common import REPO


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="iresnet50")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 = real iresnet)")
    ap.add_argument("--zero", type=int, default=1, help="DeepSpeed ZeRO stage for the trainer (0, 1, 2)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round and loop")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    args = ap.parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

    from pipeline.config import load_config
    from pipeline.losses.margin import CombinedMargin
    from pipeline.models.iresnet import build_iresnet
    from pipeline.train import Trainer

    tmp = Path(tempfile.mkdtemp())
    shards = tmp / "shards"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.folder2wds",
            "--list",
            f"{args.shared}/lfw_view1_112/train_list.txt",
            "--out",
            str(shards),
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    cfg = load_config(
        [REPO / "configs/arcface_r50.yaml"],
        [
            f"model.backbone={args.backbone}",
            f"data.train={shards}",
            f"data.batch_size={args.batch}",
            f"output.dir={tmp / 'run'}",
            "device=cpu",
            "data.num_workers=0",
            f"deepspeed.zero_stage={args.zero}",
            f"model.width={args.width}",
        ],
    )
    trainer = Trainer(cfg)
    C = trainer.loader.num_classes
    gen = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(args.batch, 3, 112, 112, generator=gen) * 2 - 1,
        "label": torch.randint(0, C, (args.batch,), generator=gen),
    }

    torch.manual_seed(0)
    bare = build_iresnet(int(args.backbone.replace("iresnet", "")), width=args.width).embedder()
    weight = torch.nn.Parameter(torch.randn(C, 512) * 0.01)
    margin = CombinedMargin(64.0, 1.0, 0.5, 0.0)
    opt = torch.optim.SGD(
        [{"params": bare.parameters()}, {"params": [weight]}], lr=0.1, momentum=0.9, weight_decay=5e-4
    )

    def bare_step():
        emb = bare(batch["image"])
        cos = F.linear(F.normalize(emb), F.normalize(weight))
        loss = F.cross_entropy(margin(cos, batch["label"]), batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def trainer_step():
        trainer.train_step(batch)

    def timed(fn) -> tuple[float, float]:
        fn()  # warm-up
        w, c = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            fn()
        n = args.steps * args.batch
        return n / (time.perf_counter() - w), n / (time.process_time() - c)

    rows = []
    for r in range(args.rounds):
        (bw, bc), (tw, tc) = timed(bare_step), timed(trainer_step)
        rows.append((bw, bc, tw, tc))
        print(
            f"round {r}: samples/s wall: bare {bw:7.2f} trainer {tw:7.2f} ratio {tw / bw:.3f} | "
            f"per CPU-second: bare {bc:7.2f} trainer {tc:7.2f} ratio {tc / bc:.3f}",
            flush=True,
        )

    def med(i: int) -> float:
        return sorted(r[i] for r in rows)[len(rows) // 2]

    print(
        f"\n{args.backbone} width {args.width} batch {args.batch}, ZeRO-{args.zero}, CPU ({torch.get_num_threads()} threads), load average "
        f"{os.getloadavg()[0]:.1f}: median of {args.rounds} rounds x {args.steps} steps"
    )
    print(f"  wall:       bare {med(0):.2f} samples/s, trainer {med(2):.2f} samples/s, ratio {med(2) / med(0):.3f}")
    print(
        f"  CPU time:   bare {med(1):.2f} samples/CPU-s, trainer {med(3):.2f} samples/CPU-s, "
        f"ratio {med(3) / med(1):.3f}   (goal: trainer/bare >= 0.95)"
    )


if __name__ == "__main__":
    main()
