"""Training loaders: decode + full augmentation, images/s (issue 3 benchmark).

Shards the LFW training faces from ../shared/data (1,814 JPEGs, 112×112; or ``--shards DIR``),
then times the torch loader (WebDataset + DataLoader worker processes) and the DALI loader in CPU
mode (``device_id=None``, DALI threads) at 1 and 2 workers/threads, with every augmentation step
switched on (p = 1: AdaFace crop, flip p=0.5, photometric, blur, multi-resolution 7/14/20 px at
1:1:2, paired HR+LR output) and with decode only (all p = 0). Prints images/s and the DALI/torch
ratio at each worker count, measured in this one run. ``--device gpu`` times DALI on the GPU at
batch 512 (``mixed`` decode, GPU operators); without CUDA it prints "unmeasured: no CUDA".

    .venv/bin/python -m benchmarks.bench_loaders [--images 2000] [--batch 64] [--device cpu|gpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file: its imports need the repository root, which `python -m` puts on sys.path
    raise SystemExit(f"run it from the repository root: python -m benchmarks.{Path(__file__).stem}")

import torch

from benchmarks.common import machine
from benchmarks.gpu.shards import default_shared, make_shards
from pipeline.config import AugmentConfig, DataConfig
from pipeline.data.dali_loader import DaliTrainLoader
from pipeline.data.torch_loader import TorchTrainLoader

FULL = AugmentConfig(flip=0.5, crop_p=1.0, photometric_p=1.0, blur_p=1.0, multires_p=1.0, paired=True)
DECODE = AugmentConfig(flip=0.0)


def measure(make, n_images: int) -> float:
    """images/s over at least ``n_images`` after one warm-up batch (start-up excluded)."""
    loader = make()
    it = iter(loader)
    next(it)
    done, epoch, t0 = 0, 0, time.perf_counter()
    while done < n_images:
        for batch in it:
            done += batch["image"].shape[0]
            if done >= n_images:
                break
        else:
            epoch += 1
            loader.set_epoch(epoch)
            it = iter(loader)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: .venv/bin/python -m benchmarks.bench_loaders --images 2000",
    )
    ap.add_argument("--shards", help="existing shard directory (default: shard the LFW training faces)")
    ap.add_argument("--images", type=int, default=2000, help="images timed per configuration")
    ap.add_argument("--batch", type=int, default=64, help="batch size for the CPU runs")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="gpu: DALI on the GPU, batch 512")
    ap.add_argument("--workers", default="1,2", help="worker/thread counts to compare")
    args = ap.parse_args(argv)

    print(
        f"machine: {machine()}, "
        f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.shards) if args.shards else make_shards(Path(tmp), default_shared(), per_shard=256)
        if args.device == "gpu":
            if not torch.cuda.is_available():
                print("DALI gpu, batch 512, 112x112, full augmentation: unmeasured: no CUDA")
                return 0
            for aug_name, aug in (("full", FULL), ("decode", DECODE)):
                cfg = DataConfig(
                    train=str(root), loader="dali", batch_size=512, num_workers=4, shuffle_buffer=1024, augment=aug
                )
                rate = measure(
                    lambda cfg=cfg: DaliTrainLoader(cfg, 0, 1, 0, 112, device="gpu"), max(args.images, 20 * 512)
                )
                print(f"DALI gpu ({torch.cuda.get_device_name(0)}), batch 512, {aug_name:6s}: {rate:9.0f} images/s")
            return 0
        print(f"shards: {root}; batch {args.batch}; images timed per run: {args.images}")
        for aug_name, aug in (("full", FULL), ("decode", DECODE)):
            for w in [int(x) for x in args.workers.split(",")]:
                cfg = DataConfig(train=str(root), batch_size=args.batch, num_workers=w, shuffle_buffer=512, augment=aug)
                t = measure(lambda cfg=cfg: TorchTrainLoader(cfg, 0, 1, 0, 112), args.images)
                d = measure(lambda cfg=cfg: DaliTrainLoader(cfg, 0, 1, 0, 112, device="cpu"), args.images)
                print(
                    f"{aug_name:6s} x{w} worker(s)/thread(s): torch {t:7.0f} img/s   DALI-cpu {d:7.0f} img/s   "
                    f"DALI/torch = {d / t:5.2f}"
                )
    print(f"load average {os.getloadavg()[0]:.1f} at end (the machine is shared: figures are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
