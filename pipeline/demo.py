"""`make demo`: the main job end to end on a machine with nothing downloaded.

1. data:   procedurally generated identities (``--data DIR`` uses a class-per-folder tree instead)
2. shards: ``python -m data_prep.folder2wds`` → WebDataset shards + manifest.json
3. train:  ArcFace iresnet on 2 processes (torchrun): DeepSpeed backbone + sharded classifier
4. verify: ``python -m pipeline.eval verify`` on held-out identities (``--val F.bin`` instead)

    python -m pipeline.demo                                       # synthetic faces
    python -m pipeline.demo --data ../shared/data/lfw_view1_112/train_112 \\
                            --val ../shared/data/lfw_view1_112/lfw_devtest_112.bin
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], **kw) -> None:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=REPO, **kw)


def synthetic_dataset(out: Path, train_ids: int, val_ids: int, per_id: int, pairs: int) -> tuple[Path, Path]:
    from pipeline.faces.io import write_bin
    from pipeline.synthetic_faces import make_pairs, write_folder

    train_root, val_root = out / "train", out / "heldout"
    bin_path = out / "heldout.bin"
    if not (out / ".done").exists():
        print(f"[demo] drawing {train_ids} training and {val_ids} held-out identities × {per_id} images", flush=True)
        write_folder(train_root, train_ids, per_id, seed=1)
        held = write_folder(val_root, val_ids, per_id, seed=2)
        chosen = make_pairs(held, pairs, seed=3)
        write_bin(
            bin_path,
            [b for a, c, _ in chosen for b in (a.read_bytes(), c.read_bytes())],
            [same for _, _, same in chosen],
        )
        (out / ".done").write_text("ok\n")
    return train_root, bin_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", help="class-per-folder image tree to train on (default: synthetic identities)")
    p.add_argument("--val", help="insightface .bin to verify on (default: held-out synthetic identities)")
    p.add_argument("--out", default="runs/demo", help="where data, shards, logs and checkpoints go")
    p.add_argument("--nproc", type=int, default=2, help="training processes (torchrun)")
    p.add_argument("--epochs", type=float, default=None, help="override the demo's schedule.epochs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra trainer overrides")
    return p


def train(args, shards: Path, val_bin: Path | None, run_dir: Path) -> None:
    """The demo config on ``shards`` under torchrun (``args.nproc`` processes), into ``run_dir``."""
    overrides = [f"data.train={shards}", f"output.dir={run_dir}", "output.overwrite=true"]  # a rerun starts over
    if val_bin:
        overrides.append(f"data.val=[{val_bin}]")
    if args.epochs:
        overrides.append(f"schedule.epochs={args.epochs}")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    run([*launcher, "-m", "pipeline.train", "--config", "configs/demo.yaml", *overrides, *args.overrides], env=env)


def verify(run_dir: Path, val_bin: Path, result_json: Path) -> dict:
    """``pipeline.eval verify`` of the run's latest checkpoint on ``val_bin``; its JSON."""
    checkpoint = run_dir / "checkpoints"
    run(
        [
            sys.executable,
            "-m",
            "pipeline.eval",
            "verify",
            "--checkpoint",
            checkpoint,
            "--bin",
            val_bin,
            "--json",
            result_json,
        ]
    )
    return json.loads(result_json.read_text())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = (REPO / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    if args.data:
        train_root = Path(args.data).resolve()
        if not train_root.is_dir():
            print(f"error: --data {train_root}: not a directory", file=sys.stderr)
            return 2
        val_bin = Path(args.val).resolve() if args.val else None
    else:
        train_root, val_bin = synthetic_dataset(out / "synthetic", train_ids=120, val_ids=60, per_id=16, pairs=600)
        if args.val:
            val_bin = Path(args.val).resolve()
    shards = out / "shards"
    run([sys.executable, "-m", "data_prep.folder2wds", "--root", train_root, "--out", shards, "--shard-size", "500"])
    run_dir = out / "run"
    train(args, shards, val_bin, run_dir)
    t_train = time.time() - t0
    report = verify(run_dir, val_bin, out / "verify.json") if val_bin else {}
    print(f"\n[demo] finished in {(time.time() - t0) / 60:.1f} min")
    print(f"[demo] training took {t_train / 60:.1f} min on {args.nproc} processes")
    print(f"[demo] checkpoint:   {run_dir / 'checkpoints'}")
    print(f"[demo] tensorboard:  .venv/bin/tensorboard --logdir {run_dir / 'tb'}")
    if report:
        print(f"[demo] verification: {json.dumps(report)[:400]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
