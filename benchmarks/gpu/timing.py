"""What every part of bench_gpu times with: the run's log line, its sizes (full or CPU smoke), the clock (CUDA events
or perf_counter), the round-robin timer of variants, the per-step profile, and freeing what a part leaves."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

MiB = 1024**2


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


T0 = time.perf_counter()


# --------------------------------------------------------------------------- sizes


@dataclass
class Sizes:
    width: float = 1.0
    depths: tuple[int, ...] = (50, 100)
    batches: tuple[int, ...] = (128, 256)
    train_classes: int = 10_000  # the classifier rows of one GPU in the training-step runs (≈ MS1MV2 85k / 8)
    lever_depth: int = 50
    lever_batch: int = 128
    scan_depth: int = 100
    scan_batch: int = 128
    infer_batch: int = 256
    loader_batch: int = 512
    loader_images: int = 20 * 512
    torch_workers: int = 16
    dali_threads: int = 8
    dali_sweep_threads: tuple[int, ...] = (4, 8, 12)
    dali_sweep_prefetch: tuple[int, ...] = (2, 3)
    dali_sweep_hw: tuple[float, ...] = (0.0, 0.65, 0.9)
    dali_depth: int = 100
    dali_batch: int = 256
    cls_classes: int = 1_000_000
    cls_batch: int = 256
    cls_rates: tuple[float, ...] = (1.0, 0.1)
    warmup: int = 5
    steps: int = 10
    repeats: int = 5
    compile_backend: str = "inductor"
    trainer_precision: str = "bf16"  # DeepSpeed's; the bare loop always runs under bf16 autocast
    all_with_compile: bool = True  # the "all levers" variant compiles too (a second compilation)
    extra: dict = field(default_factory=dict)


def smoke_sizes() -> Sizes:
    # depth costs time even at tiny width (per-op overhead): the smallest trunk everywhere, one Trainer
    return Sizes(
        width=0.125,
        depths=(18,),
        batches=(4,),
        train_classes=1000,
        lever_depth=18,
        lever_batch=4,
        scan_depth=18,
        scan_batch=4,
        infer_batch=4,
        loader_batch=4,
        loader_images=8,
        torch_workers=1,
        dali_threads=1,
        dali_sweep_threads=(1,),
        dali_sweep_prefetch=(2,),
        dali_depth=18,
        dali_batch=4,
        cls_classes=1000,
        cls_batch=4,
        warmup=1,
        steps=2,
        repeats=1,
        compile_backend="aot_eager",  # dynamo + autograd tracing without a C++ build: the code path, quickly
        trainer_precision="fp32",  # DeepSpeed bf16 runs plain bf16 kernels: very slow on a CPU without bf16 units
        all_with_compile=False,  # one compilation (~10 s here) is enough to exercise the path
    )


# --------------------------------------------------------------------------- timing


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def per_call(self, fn, n: int) -> float:
        """Seconds per call of ``fn`` over ``n`` back-to-back calls (CUDA events on the GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0 / n
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n

    def peak_step_bytes(self, fn) -> int | None:
        """Peak allocation during one call above the allocation before it (GPU only)."""
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before


def round_robin(clock: Clock, variants: dict, sz: Sizes, label: str) -> dict[str, dict]:
    """Warm each variant up, then ``repeats`` rounds of ``steps`` timed calls of each in turn.

    ``variants``: name → (step function, setup-before-block function or None). Returns name → {median_s,
    blocks_s, peak_step_mib}."""
    out = {name: {"blocks_s": []} for name in variants}
    for name, (fn, setup) in variants.items():
        if setup:
            setup()
        for _ in range(sz.warmup):
            fn()
        peak = clock.peak_step_bytes(fn)
        out[name]["peak_step_mib"] = None if peak is None else peak / MiB
    for r in range(sz.repeats):
        for name, (fn, setup) in variants.items():
            if setup:
                setup()
            out[name]["blocks_s"].append(clock.per_call(fn, sz.steps))
        log(f"  {label}: round {r + 1}/{sz.repeats}")
    for res in out.values():
        res["median_s"] = statistics.median(res["blocks_s"])
    return out


# --------------------------------------------------------------------------- profile


def profile_steps(variants: dict, label: str, out: Path | None, steps: int = 3) -> dict[str, dict]:
    """Where a step's time goes, per variant: ``steps`` steps under torch.profiler (CPU and, on a GPU, CUDA).

    Per step: wall ms; GPU kernel ms (the sum of the CUDA kernels' self time: wall well above it means the GPU
    waits for the host); host ops dispatched; device→host reads (``aten::_local_scalar_dense``, what .item(),
    bool(t), float(t) end in: each drains the queue). The top operators by device (else CPU) time are appended
    to ``bench_gpu_profile.txt`` in ``out``."""
    res = {}
    for name, (fn, setup) in variants.items():
        if setup:
            setup()
        events, wall = _profiled(fn, steps)
        res[name] = _step_costs(events, wall, steps)
        _log_step_costs(f"{label} / {name}", res[name])
        if out is not None:
            _append_top_operators(out, f"{label} / {name}", steps, events)
    return res


def _profiled(fn, steps: int):
    """One warm call of ``fn``, then ``steps`` calls under torch.profiler: (its key averages, wall seconds)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    fn()  # warm: allocator, cuDNN's algorithm choice
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        wall = time.perf_counter() - t
    return prof.key_averages(), wall


def _step_costs(events, wall: float, steps: int) -> dict:
    """Per step: wall ms, GPU kernel ms (None on the CPU), host ops, device→host reads."""
    from torch.autograd import DeviceType

    count = {e.key: e.count for e in events}
    dev_us = sum(
        getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
        for e in events
        if e.device_type == DeviceType.CUDA
    )
    return {
        "wall_ms": 1e3 * wall / steps,
        "gpu_kernel_ms": dev_us / 1e3 / steps if torch.cuda.is_available() else None,
        "host_ops": sum(e.count for e in events if e.device_type == DeviceType.CPU) / steps,
        "host_reads": count.get("aten::_local_scalar_dense", 0) / steps,
    }


def _log_step_costs(what: str, r: dict) -> None:
    log(
        f"  profile {what}: {r['wall_ms']:.1f} ms/step"
        + (f", GPU kernels {r['gpu_kernel_ms']:.1f} ms" if r["gpu_kernel_ms"] is not None else "")
        + f", {r['host_ops']:.0f} host ops, {r['host_reads']:.0f} host reads"
    )


def _append_top_operators(out: Path, what: str, steps: int, events) -> None:
    """The top 25 operators by device (else CPU) self time, appended to ``out/bench_gpu_profile.txt``."""
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    with open(out / "bench_gpu_profile.txt", "a") as f:
        f.write(f"\n==== {what} ({steps} steps) ====\n")
        f.write(events.table(sort_by=key, row_limit=25, max_name_column_width=60) + "\n")


def free() -> None:
    """Collect what the caller has just deleted and hand cached GPU blocks back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
