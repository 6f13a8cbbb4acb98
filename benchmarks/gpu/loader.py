"""The loader part of bench_gpu: the DALI loader (full augmentation) vs the torch loader, images/s; and the DALI
timing the DALI part sweeps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from benchmarks.gpu.timing import Sizes, log


def dali_importable() -> str | None:
    """None when nvidia.dali imports, else why not."""
    if importlib.util.find_spec("nvidia.dali") is None:
        return "nvidia.dali is not importable"
    try:
        import nvidia.dali  # noqa: F401
    except Exception as e:  # a broken install (CUDA mismatch, ...) is a skip, not a crash
        return f"nvidia.dali does not import: {type(e).__name__}: {e}"
    return None


def dali_img_s(shards: Path, sz: Sizes, dali_device: str, threads: int, **knobs) -> float:
    """images/s of the DALI loader with the full augmentation (bench_loaders.FULL) at ``sz.loader_batch``;
    ``knobs``: DataConfig's DALI fields (dali_prefetch, dali_hw_decoder_load)."""
    from benchmarks import bench_loaders
    from pipeline.config import DataConfig
    from pipeline.data.dali_loader import DaliTrainLoader

    cfg = DataConfig(
        train=str(shards),
        loader="dali",
        batch_size=sz.loader_batch,
        num_workers=threads,
        shuffle_buffer=1024,
        augment=bench_loaders.FULL,
        **knobs,
    )
    return bench_loaders.measure(lambda: DaliTrainLoader(cfg, 0, 1, 0, 112, device=dali_device), sz.loader_images)


def part_loader(args, sz: Sizes, device: torch.device, shards: Path) -> dict:
    why = dali_importable()
    if why:
        return {"skipped": why}
    from benchmarks import bench_loaders
    from pipeline.config import DataConfig
    from pipeline.data.torch_loader import TorchTrainLoader

    dali_device = "gpu" if device.type == "cuda" else "cpu"
    res = {"batch": sz.loader_batch, "augment": "full (bench_loaders.FULL)", "dali_device": dali_device}
    cfg_t = DataConfig(
        train=str(shards),
        batch_size=sz.loader_batch,
        num_workers=sz.torch_workers,
        shuffle_buffer=1024,
        augment=bench_loaders.FULL,
    )
    log(f"loader: DALI {dali_device}, {sz.dali_threads} threads, batch {sz.loader_batch}")
    res["dali_img_s"] = dali_img_s(shards, sz, dali_device, sz.dali_threads)
    log(f"loader: torch, {sz.torch_workers} workers, batch {sz.loader_batch}")
    res["torch_img_s"] = bench_loaders.measure(lambda: TorchTrainLoader(cfg_t, 0, 1, 0, 112), sz.loader_images)
    res.update(
        dali_threads=sz.dali_threads,
        torch_workers=sz.torch_workers,
        images_timed=sz.loader_images,
        dali_over_torch=res["dali_img_s"] / res["torch_img_s"],
    )
    log(
        f"loader: DALI {res['dali_img_s']:.0f} img/s, torch {res['torch_img_s']:.0f} img/s, "
        f"DALI/torch {res['dali_over_torch']:.2f}"
    )
    return res
