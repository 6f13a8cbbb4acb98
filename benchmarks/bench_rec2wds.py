"""rec2wds end-to-end throughput, 1 vs 2 worker processes (issue 3 benchmark).

Builds an insightface-layout rec of ``--images`` images (LFW 112x112 JPEGs from ../shared/data,
repeated) with the pure-Python writer, then converts it with ``data_prep.rec2wds`` into a fresh
directory per run and prints images/s (planning + reading + image check + tar writing + sha256 +
manifest) and the 2-worker / 1-worker ratio, for the default full decode check and for
``--verify none`` (pure I/O path).

    .venv/bin/python benchmarks/bench_rec2wds.py [--images 4000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a file: its imports need the repository root, which `python -m` puts on sys.path
    raise SystemExit(f"run it from the repository root: python -m benchmarks.{Path(__file__).stem}")

from benchmarks.common import REPO, machine
from data_prep import recordio, shards
from data_prep.rec2wds import RecSource


def build_rec(tmp: Path, lfw: Path, n_images: int) -> tuple[Path, Path]:
    people = [d for d in sorted(lfw.iterdir()) if d.is_dir()]
    files = [(c, f.read_bytes()) for c, d in enumerate(people) for f in sorted(d.glob("*.jpg"))]
    classes: list[list[bytes]] = [[] for _ in people]
    for i in range(n_images):
        c, data = files[i % len(files)]
        classes[c].append(data)
    rec, idx = tmp / "train.rec", tmp / "train.idx"
    recordio.write_insightface_rec(rec, idx, classes, tmp / "property")
    return rec, idx


def _cpu() -> float:
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def one_run(rec: Path, idx: Path, out: Path, workers: int, verify: str, shard_size: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process and its workers)."""
    if out.exists():
        shutil.rmtree(out)
    c0 = _cpu()
    res = shards.run(
        RecSource(rec, idx),
        out,
        shard_size=shard_size,
        workers=workers,
        verify=verify,
        progress=False,
        log=lambda m: None,
    )
    n = res.manifest.num_images
    return n / res.seconds, n / max(_cpu() - c0, 1e-9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--lfw", default=str(REPO.parent / "shared" / "data" / "lfw_view1_112" / "train_112"))
    args = p.parse_args()
    lfw = Path(args.lfw)
    if not lfw.is_dir():
        sys.exit(f"error: {lfw}: LFW train_112 folder missing")
    with tempfile.TemporaryDirectory(prefix="bench_rec2wds_") as t:
        tmp = Path(t)
        rec, idx = build_rec(tmp, lfw, args.images)
        print(
            f"rec2wds benchmark: {args.images} images ({rec.stat().st_size / 1e6:.1f} MB rec), "
            f"shard size {args.shard_size}, {args.repeats} runs each (median)"
        )
        print(f"machine: {machine()}, load average at start {os.getloadavg()[0]:.1f}")
        for verify in ("decode", "none"):
            rates = {}
            for w in (1, 2):
                runs = [one_run(rec, idx, tmp / f"out{w}", w, verify, args.shard_size) for _ in range(args.repeats)]
                rates[w] = statistics.median(r[0] for r in runs)
                per_cpu = statistics.median(r[1] for r in runs)
                print(
                    f"  verify={verify:6s} workers={w}: {rates[w]:8.0f} images/s wall, "
                    f"{per_cpu:8.0f} images per CPU-second"
                )
            print(f"  verify={verify:6s} ratio 2 workers / 1 worker (wall): {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
