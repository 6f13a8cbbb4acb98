"""Small-scale fidelity check of LRFR (Ling et al. 2023) on real faces, CPU-sized.

Trains three tiny models with the shared trainer on the LFW View-1 training split
(../shared/data/lfw_view1_112/train_112: 111 identities, 1,814 aligned images) and verifies each
on the disjoint LFW dev-test pairs (lfw_devtest_112.bin, 500 + 500 pairs), clean and at 7/14/20 px
(both images degraded, and cross-resolution with one HR side), with ``pipeline.eval.lowres``:

1. **baseline**      — CosFace on HR images only (Table 4 "Baseline"; configs/lrfr/baseline.yaml);
2. **MAug**          — Siamese HR/LR with MAug 7/14/20 px at 1:1:2, both CosFace halves, λ = 0
                        (Table 4 "MAug"; configs/lrfr/no_dist.yaml);
3. **MAug + LogExp** — the paper's method: MAug + LogExp p = 1, λ = 1 (eq. 7; the configs' defaults).

All three start from configs/lrfr_r34_casia.yaml (CosFace s = 48, m = 0.4, SGD 0.9, wd 5e-4,
step lr ÷10 at 16/28 and 24/28 of training) and are shrunk identically to fit a 2-core CPU:
iresnet18 at width 0.0625, 512-d embeddings, ``--input-size`` px (default 56: the 112 px images
are resized on load, train and test alike; "7 px" still means a 7×7 face), batch 64, the same seed,
the same number of epochs. The numbers are a plumbing-and-direction check, not a reproduction of
the paper's Table 4 (CASIA-WebFace, ResNet34, 28 epochs): one seed, 1k test pairs (one fold =
100 pairs, so ±1-2 % is noise).

    python scripts/fidelity_lrfr.py                   # defaults (2 epochs): 12.2 CPU-minutes in all
    python scripts/fidelity_lrfr.py --epochs 4 --out runs/fid_longer

Measured with the defaults on a 2-core CPU machine shared with other jobs (load ~10): 27.7 min
wall, 12.2 min CPU (user+sys of all processes), i.e. about 6-10 min wall on 2 idle cores.

Writes OUT/results.md (the markdown table) and OUT/results.json; prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUNS = (
    ("baseline", ["configs/lrfr/baseline.yaml"]),
    ("MAug", ["configs/lrfr/maug.yaml", "configs/lrfr/no_dist.yaml"]),
    ("MAug + LogExp", ["configs/lrfr/maug.yaml", "configs/lrfr/dist_logexp_p1.yaml"]),
)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data",
        default=str(REPO.parent / "shared" / "data" / "lfw_view1_112"),
        help="folder with train_112/ and lfw_devtest_112.bin (default ../shared/data/lfw_view1_112)",
    )
    ap.add_argument(
        "--out", default=str(REPO / "runs" / "fidelity_lrfr"), help="output folder (default runs/fidelity_lrfr)"
    )
    ap.add_argument("--epochs", type=float, default=2.0, help="training epochs per model (default 2)")
    ap.add_argument("--input-size", type=int, default=56, help="model input size in px (default 56)")
    ap.add_argument("--width", type=float, default=0.0625, help="iresnet18 width multiplier (default 0.0625)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--sizes", type=int, nargs="+", default=[7, 14, 20], help="LR test resolutions (default 7 14 20)")
    ap.add_argument("--workers", type=int, default=1, help="loader worker processes (default 1)")
    ap.add_argument("--only", nargs="+", choices=[r[0] for r in RUNS], help="train/evaluate only these models")
    return ap.parse_args(argv)


def shards(data: Path, out: Path) -> Path:
    dst = out / "shards"
    if (dst / "manifest.json").is_file():
        return dst
    cmd = [
        sys.executable,
        "-m",
        "data_prep.folder2wds",
        "--root",
        str(data / "train_112"),
        "--out",
        str(dst),
        "--shard-size",
        "500",
        "--no-progress",
    ]
    subprocess.run(cmd, cwd=REPO, check=True)
    return dst


def train(name: str, layers: list[str], args, shard_dir: Path, out: Path) -> Path:
    run_dir = out / name.lower().replace(" + ", "_").replace(" ", "_")
    e = args.epochs
    milestones = [round(e * 16 / 28, 3), round(e * 24 / 28, 3)]  # the paper's 16/28 and 24/28
    cmd = [sys.executable, "-m", "pipeline.train", "--config", "configs/lrfr_r34_casia.yaml"]
    for layer in layers:
        cmd += ["--config", layer]
    cmd += [
        "device=cpu",
        f"data.train={shard_dir}",
        f"output.dir={run_dir}",
        "output.overwrite=true",
        "model.backbone=iresnet18",
        f"model.width={args.width}",
        "model.head.embedding_size=512",
        f"model.input_size={args.input_size}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        "data.shuffle_buffer=500",
        f"optim.lr={args.lr}",
        f"schedule.epochs={e}",
        f"schedule.milestones={milestones}",
        "output.log_every=20",
        "output.checkpoint_every=100000",
        "output.eval_every=0",
        "output.histogram_every=100000",
        "output.keep_checkpoints=1",
        "seed=0",
    ]
    print(f"[fidelity] training {name}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return run_dir


def evaluate(run_dir: Path, bin_path: Path, sizes) -> list[dict]:
    import torch

    from pipeline.eval.checkpoint import load_model
    from pipeline.eval.lowres import evaluate_lowres_bin

    net, info = load_model(run_dir, device="cpu")
    with torch.inference_mode():
        return evaluate_lowres_bin(net, bin_path, sizes, batch_size=128, image_size=info["input_size"], progress=True)


def table(results: dict[str, list[dict]], sizes) -> str:
    """One row per model: HR and, per size, LR (both) / cross accuracy in %, ± fold std."""
    head = ["model", "HR (clean)"] + [f"LR {s} px" for s in sizes] + [f"cross {s} px" for s in sizes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in results.items():
        by = {(r["mode"], r["size"]): r for r in rows}
        cells = [by[("clean", None)]] + [by[("lr", s)] for s in sizes] + [by[("cross", s)] for s in sizes]
        lines.append(
            "| " + " | ".join([name] + [f"{100 * r['accuracy']:.1f} ± {100 * r['std']:.1f}" for r in cells]) + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    bin_path = data / "lfw_devtest_112.bin"
    if not (data / "train_112").is_dir() or not bin_path.is_file():
        print(f"error: {data}: expected train_112/ and lfw_devtest_112.bin", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    t0 = time.time()
    shard_dir = shards(data, out)
    results, timings = {}, {}
    for name, layers in RUNS:
        if args.only and name not in args.only:
            continue
        t = time.time()
        run_dir = train(name, layers, args, shard_dir, out)
        t_train = time.time() - t
        t = time.time()
        results[name] = evaluate(run_dir, bin_path, args.sizes)
        timings[name] = {"train_s": round(t_train, 1), "eval_s": round(time.time() - t, 1)}
        print(f"[fidelity] {name}: train {t_train:.0f} s, eval {timings[name]['eval_s']:.0f} s", flush=True)
    md = table(results, args.sizes)
    total = time.time() - t0
    cpu = sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )
    note = (
        f"\nLFW dev-test (1,000 pairs, 10-fold accuracy % ± fold std); iresnet18 width {args.width}, "
        f"{args.input_size} px input, {args.epochs:g} epochs on LFW View-1 train (111 ids, 1,814 images), "
        f"batch {args.batch_size}, seed 0. LR = both images bicubic down/up to s px; cross = second image only. "
        f"Total wall time {total / 60:.1f} min, CPU time {cpu / 60:.1f} min (user+sys, all processes).\n"
    )
    (out / "results.md").write_text(md + "\n" + note)
    (out / "results.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "timings": timings,
                "total_s": round(total, 1),
                "cpu_s": round(cpu, 1),
                "results": results,
            },
            indent=1,
        )
        + "\n"
    )
    print(md)
    print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
