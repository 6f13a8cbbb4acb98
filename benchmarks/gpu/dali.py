"""The dali part of bench_gpu: DALI's knobs swept (CPU threads × prefetch depth × hardware-decoder share), then the
trainer's step fed by the best setting / the same step on an in-memory batch (goal ≥ 0.95)."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.gpu.loader import dali_img_s, dali_importable
from benchmarks.gpu.loops import build_trainer, make_batch
from benchmarks.gpu.timing import Clock, Sizes, free, log, round_robin


def part_dali(args, sz: Sizes, device: torch.device, clock: Clock, shards: Path, tmp: Path) -> dict:
    """DALI's knobs swept (CPU threads × prefetch depth × hardware-decoder share), then the number that matters:
    the trainer's step fed by the best DALI setting / the same step on an in-memory batch (goal ≥ 0.95)."""
    why = dali_importable()
    if why:
        return {"skipped": why}

    dali_device = "gpu" if device.type == "cuda" else "cpu"
    res = {"batch": sz.loader_batch, "dali_device": dali_device, "sweep": _sweep(shards, sz, dali_device)}
    best = max(res["sweep"], key=lambda r: r["img_s"])
    res["best"] = best
    depth, batch = sz.dali_depth, sz.dali_batch
    trainer, why = build_trainer(
        depth,
        batch,
        sz,
        device,
        shards,
        tmp,
        data=(
            "data.loader=dali",
            f"data.num_workers={best['threads']}",
            f"data.dali_prefetch={best['prefetch']}",
            f"data.dali_hw_decoder_load={best['hw_decoder_load']}",
            "data.shuffle_buffer=1024",
        ),
    )
    if trainer is None:
        res["trainer_fed"] = {"skipped": why}
        return res
    res["trainer_fed"] = _fed_vs_memory(trainer, depth, batch, sz, device, clock)
    return res  # the trainer and its loader go with this frame (the caller's next part frees the cache)


def _sweep(shards: Path, sz: Sizes, dali_device: str) -> list[dict]:
    """images/s of the DALI loader at every threads × prefetch × hw_decoder_load (the last on the GPU only)."""
    rows = []
    for threads in sz.dali_sweep_threads:
        for prefetch in sz.dali_sweep_prefetch:
            for hw in sz.dali_sweep_hw if dali_device == "gpu" else (0.0,):
                ips = dali_img_s(shards, sz, dali_device, threads, dali_prefetch=prefetch, dali_hw_decoder_load=hw)
                rows.append({"threads": threads, "prefetch": prefetch, "hw_decoder_load": hw, "img_s": ips})
                log(f"dali: threads {threads}, prefetch {prefetch}, hw_decoder_load {hw}: {ips:.0f} img/s")
                free()
    return rows


def _fed_vs_memory(trainer, depth: int, batch: int, sz: Sizes, device: torch.device, clock: Clock) -> dict:
    """The trainer's step on batches from its DALI loader vs on one in-memory batch, timed round-robin."""
    memory = make_batch(batch, min(trainer.loader.num_classes, 111), device)
    state = {"it": iter(trainer.loader.iter_from(0))}

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:  # a new epoch (its pipeline build is inside the timing: rare with enough shards)
            trainer.loader.set_epoch(trainer.loader.epoch + 1)
            state["it"] = iter(trainer.loader.iter_from(0))
            return next(state["it"])

    variants = {
        "in_memory": (lambda: trainer.train_step(memory), None),
        "dali_fed": (lambda: trainer.train_step(next_batch()), None),
    }
    t = round_robin(clock, variants, sz, f"trainer iresnet{depth} batch {batch}, DALI-fed vs in-memory")
    fed = {
        "depth": depth,
        "batch": batch,
        "in_memory_img_s": batch / t["in_memory"]["median_s"],
        "dali_fed_img_s": batch / t["dali_fed"]["median_s"],
    }
    fed["fed_over_memory"] = fed["dali_fed_img_s"] / fed["in_memory_img_s"]
    log(f"dali: trainer fed by DALI / in-memory batches = {fed['fed_over_memory']:.3f} (goal >= 0.95)")
    return fed
