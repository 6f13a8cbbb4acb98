"""Small-scale fidelity check of SCAN-CNN (scale attention, Table 1 / Fig. 3 ablation), CPU-sized.

Trains four tiny models with the shared trainer (``python -m pipeline.train``, one process,
``device=cpu``) on the LFW View-1 training split (../shared/data/lfw_view1_112/train_list.txt:
111 identities, 1,814 aligned 112×112 images), all with the same width, embedding size, seed,
schedule and data:

1. **plain**         — iresnet18, recipe ``margin`` (Table 1, first row);
2. **SAC**           — iresnet18 + ``model.conv: {kind: scan, sac: true, lsc: false, rmo: false}`` (Table 1 row 2, Fig. 3a);
3. **SAC+RMO**       — ``sac=true lsc=false rmo=true`` (Table 1 row 3, Fig. 3c);
4. **SAC+RMO+LSC**   — the full SCAN-CNN (Table 1 last row, Fig. 3d).

Each is verified (insightface 10-fold protocol, flip-augmented embeddings, ``pipeline.eval.verify``)
on the disjoint LFW dev-test pairs ``lfw_devtest_112.bin`` (500 + 500 pairs), clean and Gaussian-
blurred with σ ∈ {1, 2, 3} px (σ in the 112 px aligned image; copies made once with
``python -m data_prep.bin degrade``). The scales t of every SAC layer are read from the final
checkpoint (``model.pt`` loaded into the recipe rebuilt from ``config.yaml``, then the
``ScaleAttentionConv.t`` property) and summarised; one PNG compares the three t densities
(Fig. 3 style).

Shrunk for a shared 2-core CPU (defaults): iresnet18 width 0.125, 128-d embedding, 56 px input
(the 112 px images — and the blurred test copies — are resized on load, train and test alike, so
σ = 1/2/3 px at 112 px is ≈ 0.5/1/1.5 px at the network's input), batch 64, 10 epochs (280 steps), SGD lr 0.1
(momentum 0.9, weight decay 1e-4, t excluded) divided by 10 at the paper's 16/30, 24/30, 28/30 of
training (Sec. 6.1), CosFace s = 64, m = 0.35 (``--loss arcface`` for the configs' ArcFace; the
additive cosine margin is the gentler choice for a few hundred steps from scratch — not compared
here), seed 0, one compute thread per process
(``--threads``; on a machine shared with other jobs 1 thread measured ~5× faster than 2).
This is a plumbing-and-direction check, not a reproduction of Table 1 (CASIA-WebFace, 0.5 M
images, ResNet-18 at full width, 30 epochs): one seed, 1k test pairs (±1-2 % is noise).

    python scripts/fidelity_scan.py                       # defaults: ~15-20 min on 2 shared cores
    python scripts/fidelity_scan.py --epochs 2 --out runs/fid_scan_quick
    python scripts/fidelity_scan.py --only SAC SAC+RMO+LSC --steps 40

Writes OUT/results.md, OUT/results.json, OUT/<variant>/ (runs; train.log) and the t-density PNG
(default docs/fidelity/scan_t_density.png); prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name → (config layer, extra overrides). Shared hyper-parameters are added in train().
VARIANTS = (
    ("plain", "configs/base.yaml", ["recipe=margin", "model.backbone=iresnet18"]),
    ("SAC", "configs/scan_r18_casia.yaml", ["model.conv.sac=true", "model.conv.lsc=false", "model.conv.rmo=false"]),
    ("SAC+RMO", "configs/scan_r18_casia.yaml", ["model.conv.sac=true", "model.conv.lsc=false", "model.conv.rmo=true"]),
    (
        "SAC+RMO+LSC",
        "configs/scan_r18_casia.yaml",
        ["model.conv.sac=true", "model.conv.lsc=true", "model.conv.rmo=true"],
    ),
)
SCAN_VARIANTS = tuple(v[0] for v in VARIANTS if v[0] != "plain")
LOSSES = {  # margin.{s,m1,m2,m3}: cos(m1·θ + m2) − m3
    "cosface": ["margin.s=64.0", "margin.m1=1.0", "margin.m2=0.0", "margin.m3=0.35"],
    "arcface": ["margin.s=64.0", "margin.m1=1.0", "margin.m2=0.5", "margin.m3=0.0"],
}
STEP_RE = re.compile(r"\[train\] step (\d+)/(\d+) (?:epoch [0-9.]+ )?loss ([0-9.eE+-]+|nan|inf)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data",
        default=str(REPO.parent / "shared" / "data" / "lfw_view1_112"),
        help="folder with train_list.txt, train_112/ and lfw_devtest_112.bin (default ../shared/data/lfw_view1_112)",
    )
    ap.add_argument(
        "--out", default=str(REPO / "runs" / "fidelity_scan"), help="work folder (default runs/fidelity_scan)"
    )
    ap.add_argument(
        "--png",
        default=str(REPO / "docs" / "fidelity" / "scan_t_density.png"),
        help="t-density comparison PNG (default docs/fidelity/scan_t_density.png)",
    )
    ap.add_argument("--epochs", type=float, default=10.0, help="training epochs per model (default 10)")
    ap.add_argument(
        "--steps", type=int, default=0, help="stop after this many steps instead (schedule.max_steps; 0 = off)"
    )
    ap.add_argument("--input-size", type=int, default=56, help="model input size in px (default 56)")
    ap.add_argument("--width", type=float, default=0.125, help="iresnet18 width multiplier (default 0.125)")
    ap.add_argument("--embedding", type=int, default=128, help="embedding size (default 128)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--loss", choices=sorted(LOSSES), default="cosface", help="margin softmax (default cosface)")
    ap.add_argument(
        "--blur", type=float, nargs="+", default=[1.0, 2.0, 3.0], help="test blur σ in px at 112 px (default 1 2 3)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch/OMP threads per process (default 1)")
    ap.add_argument("--workers", type=int, default=1, help="loader worker processes (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", choices=[v[0] for v in VARIANTS], help="train/evaluate only these variants")
    ap.add_argument(
        "--retrain", action="store_true", help="train again even where OUT/<variant> has a final checkpoint"
    )
    return ap.parse_args(argv)


def _env(threads: int) -> dict:
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
    }


def make_shards(data: Path, out: Path, threads: int) -> Path:
    """LFW View-1 train list → WebDataset shards, once (reused when manifest.json exists)."""
    dst = out / "shards"
    if not (dst / "manifest.json").is_file():
        cmd = [
            sys.executable,
            "-m",
            "data_prep.folder2wds",
            "--list",
            str(data / "train_list.txt"),
            "--out",
            str(dst),
            "--shard-size",
            "1000",
            "--no-progress",
        ]
        subprocess.run(cmd, cwd=REPO, check=True, env=_env(threads))
    return dst


def make_blurred(bin_path: Path, out: Path, sigmas, threads: int) -> list[Path]:
    """Blurred copies of the dev-test .bin (data_prep.bin degrade), once."""
    dst = out / "bins"
    want = [dst / f"{bin_path.stem}_blur{s:g}.bin" for s in sigmas]
    if not all(p.is_file() for p in want):
        dst.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "data_prep.bin",
            "degrade",
            "--bin",
            str(bin_path),
            "--out-dir",
            str(dst),
            "--blur",
            *[f"{s:g}" for s in sigmas],
        ]
        with open(dst / "degrade.log", "w") as log:  # its tqdm bars go to the log, not the table
            subprocess.run(cmd, cwd=REPO, check=True, env=_env(threads), stdout=log, stderr=subprocess.STDOUT)
    missing = [str(p) for p in want if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"data_prep.bin degrade did not write {', '.join(missing)}")
    return want


def run_dir_of(out: Path, name: str) -> Path:
    return out / name.lower().replace("+", "_")


def train(name: str, layer: str, extra: list[str], args, shard_dir: Path, out: Path) -> tuple[Path, dict]:
    """One training run (same everything but the variant's switches); returns (run dir, log summary)."""
    run_dir = run_dir_of(out, name)
    e = args.epochs
    milestones = [round(e * m / 30, 3) for m in (16, 24, 28)]  # the paper's ÷10 at 16/24/28 of 30 epochs
    cmd = [
        sys.executable,
        "-m",
        "pipeline.train",
        "--config",
        layer,
        *extra,
        *LOSSES[args.loss],
        "device=cpu",
        f"seed={args.seed}",
        f"data.train={shard_dir}",
        f"output.dir={run_dir}",
        "output.overwrite=true",
        f"model.width={args.width}",
        f"model.head.embedding_size={args.embedding}",
        f"model.input_size={args.input_size}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        "data.shuffle_buffer=1000",
        "optim.name=sgd",
        f"optim.lr={args.lr}",
        "optim.momentum=0.9",
        "optim.weight_decay=1e-4",
        "schedule.kind=step",
        f"schedule.epochs={e}",
        f"schedule.milestones={milestones}",
        "schedule.gamma=0.1",
        "schedule.warmup_epochs=0",
        f"schedule.max_steps={args.steps}",
        "output.log_every=7",
        "output.checkpoint_every=1000000",
        "output.eval_every=0",
        "output.histogram_every=28",
        "output.keep_checkpoints=1",
    ]
    log_path = run_dir / "train.log"
    final = run_dir / "checkpoints"
    if not args.retrain and log_path.is_file() and "[train] done" in log_path.read_text():
        print(f"[fidelity] {name}: reusing {run_dir} (--retrain to train again)", flush=True)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"[fidelity] training {name}: {' '.join(cmd[2:])}", flush=True)
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, cwd=REPO, env=_env(args.threads), stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = log_path.read_text().strip().splitlines()[-5:]
            raise RuntimeError(f"training {name} failed (exit {proc.returncode}), see {log_path}:\n" + "\n".join(tail))
    steps = [(int(m[1]), int(m[2]), float(m[3])) for m in STEP_RE.finditer(log_path.read_text())]
    summary = {
        "steps": steps[-1][1] if steps else None,
        "first_loss": steps[0][2] if steps else None,
        "final_loss": steps[-1][2] if steps else None,
    }
    return final, summary


def t_values(net) -> dict[str, np.ndarray]:  # noqa: F821
    """t (one per output filter) of every SAC layer of a loaded backbone, via ScaleAttentionConv.t."""
    import torch

    from pipeline.models.scan import sac_layers

    with torch.no_grad():
        return {n: layer.t.detach().float().cpu().numpy() for n, layer in sac_layers(net) if layer.sac}


def t_stats(t) -> dict:
    import numpy as np

    t = np.asarray(t, dtype=np.float64)
    return {
        "n": int(t.size),
        "mean": float(t.mean()),
        "std": float(t.std(ddof=1)),
        "median": float(np.median(t)),
        "frac_below_0.1": float((t < 0.1).mean()),
        "frac_near_init": float((np.abs(t - 1.0) < 0.05).mean()),
        "min": float(t.min()),
        "max": float(t.max()),
    }


def evaluate(ckpt_root: Path, bins: list[Path], threads: int) -> tuple[list[dict], dict | None]:
    """Verification results per .bin and the t values (None for the plain model)."""
    import torch

    from pipeline.eval.checkpoint import load_model
    from pipeline.eval.verify import evaluate_bin

    torch.set_num_threads(threads)
    net, info = load_model(ckpt_root, device="cpu")
    rows = []
    with torch.inference_mode():
        for b in bins:
            r = evaluate_bin(net, b, batch_size=128, device="cpu", image_size=info["input_size"])
            rows.append({k: r[k] for k in ("name", "accuracy", "std", "auc", "tar_at_far") if k in r})
    ts = t_values(net)
    return rows, (ts or None)


def plot_t_densities(t_by_variant: dict, path: Path, caption: str) -> Path:
    """Fig. 3 style: one panel per SCAN variant, normalised histogram + Gaussian KDE of all t."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy.stats import gaussian_kde

    names = list(t_by_variant)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 2.9), dpi=90, squeeze=False)
    for ax, name in zip(axes[0], names):
        t = np.asarray(t_by_variant[name], dtype=np.float64)
        hi = max(1.6, float(t.max()) * 1.05)
        ax.hist(t, bins=np.linspace(0, hi, 60), density=True, color="#9ecae1", edgecolor="none")
        if np.ptp(t) > 1e-6:
            xs = np.linspace(0, hi, 300)
            ax.plot(xs, gaussian_kde(t)(xs), color="#08519c", lw=1.4)
        ax.axvline(1.0, color="#d62728", lw=0.8, ls="--", label="init t = 1")
        ax.set_title(f"{name}  (mean {t.mean():.2f}, {100 * (t < 0.1).mean():.0f}% < 0.1)", fontsize=8.5)
        ax.set_xlabel("t")
        ax.set_xlim(0, hi)
    axes[0][0].set_ylabel("density")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(caption, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def tables(results: dict, sigmas, tstats: dict, summaries: dict) -> str:
    head = ["variant", "clean"] + [f"blur σ={s:g}" for s in sigmas] + ["final train loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in results.items():
        cells = [f"{100 * r['accuracy']:.1f} ± {100 * r['std']:.1f}" for r in rows]
        loss = summaries[name]["final_loss"]
        lines.append("| " + " | ".join([name, *cells, f"{loss:.2f}" if loss is not None else "-"]) + " |")
    if tstats:
        lines += [
            "",
            "| variant | #t | mean | std | median | frac < 0.1 | frac ∣t−1∣ < 0.05 | min | max |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, s in tstats.items():
            lines.append(
                f"| {name} | {s['n']} | {s['mean']:.3f} | {s['std']:.3f} | {s['median']:.3f} | "
                f"{s['frac_below_0.1']:.3f} | {s['frac_near_init']:.3f} | {s['min']:.3f} | {s['max']:.3f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    bin_path = data / "lfw_devtest_112.bin"
    if not (data / "train_list.txt").is_file() or not bin_path.is_file():
        print(f"error: {data}: expected train_list.txt (+ train_112/) and lfw_devtest_112.bin", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    shard_dir = make_shards(data, out, args.threads)
    bins = [bin_path, *make_blurred(bin_path, out, args.blur, args.threads)]
    print(f"[fidelity] data ready in {time.time() - t0:.0f} s", flush=True)
    results, t_by, tstats, summaries, timings = {}, {}, {}, {}, {}
    for name, layer, extra in VARIANTS:
        if args.only and name not in args.only:
            continue
        t = time.time()
        ckpt, summaries[name] = train(name, layer, extra, args, shard_dir, out)
        t_train = time.time() - t
        t = time.time()
        results[name], ts = evaluate(ckpt, bins, args.threads)
        if ts:
            t_by[name] = [v for arr in ts.values() for v in arr.tolist()]
            tstats[name] = {**t_stats(t_by[name]), "layers": len(ts)}
        timings[name] = {"train_s": round(t_train, 1), "eval_s": round(time.time() - t, 1)}
        acc = ", ".join(f"{r['name']} {100 * r['accuracy']:.1f}" for r in results[name])
        print(f"[fidelity] {name}: train {t_train:.0f} s, eval {timings[name]['eval_s']:.0f} s; {acc}", flush=True)
    total = time.time() - t0
    if t_by:
        caption = (
            f"t of every SAC filter, SCAN-iresnet18 w{args.width:g}, {args.input_size} px, "
            f"{args.steps or args.epochs:g} {'steps' if args.steps else 'epochs'} on LFW View-1 train (1.8k images)"
        )
        plot_t_densities(t_by, Path(args.png), caption)
    cpu = sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )
    md = tables(results, args.blur, tstats, summaries)
    sched = f"{args.steps} steps" if args.steps else f"{args.epochs:g} epochs"
    note = (
        f"\nLFW dev-test (1,000 pairs; 10-fold accuracy % ± fold std, flip-augmented embeddings); blur σ in px of "
        f"the 112 px aligned face, before the resize to the {args.input_size} px input. iresnet18 / scan_iresnet18 "
        f"width {args.width:g}, {args.embedding}-d, {sched} on LFW View-1 train (111 ids, 1,814 images), batch "
        f"{args.batch_size}, SGD lr {args.lr:g} ÷10 at 16/24/28 of 30, wd 1e-4, {args.loss} s=64, seed {args.seed}, "
        f"{args.threads} thread(s). t statistics over all SAC filters of the final checkpoint "
        f"(t initialised to 1). Total wall time {total / 60:.1f} min, CPU time {cpu / 60:.1f} min (all processes)."
        + (f"\nt densities: {args.png}" if t_by else "")
        + "\n"
    )
    (out / "results.md").write_text(md + "\n" + note)
    (out / "results.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "timings": timings,
                "total_s": round(total, 1),
                "cpu_s": round(cpu, 1),
                "train": summaries,
                "results": results,
                "t_stats": tstats,
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
