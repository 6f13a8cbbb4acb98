"""GPU benchmarks (issue 9): loaders, training step + MFU, the obvious levers, SCAN's cost, partial FC at 1M classes.

Every figure is measured in this one process and every comparison is a ratio of two figures measured in the
same run (variants alternate round-robin, so a slow period hits all of them alike). Timing: CUDA events
around ``--steps`` steps after ``--warmup`` untimed ones, the median of ``--repeats`` such blocks
(``time.perf_counter`` around the same blocks on the CPU).

Parts (``--parts``, default all):

* ``loader``: DALI GPU loader (``DaliTrainLoader``, device gpu, the full augmentation of bench_loaders.py,
  112 px, batch 512) vs the torch loader (``TorchTrainLoader``, one worker per core, at most 16), images/s.
  Shards: the LFW faces of ../shared/data (as bench_loaders.py) or ``--shards DIR``. Skipped with one line
  when DALI is not importable.
* ``train``: iresnet50 and iresnet100, bf16 autocast, batch 128 and 256: images/s; MFU = 3 × (forward FLOPs
  counted by ``torch.utils.flop_counter.FlopCounterMode``, 2 FLOPs per multiply-add) × images/s / the card's
  dense bf16 peak; the trainer's step (``pipeline.train.Trainer.train_step``: DeepSpeed engine, bf16,
  ``ShardedMarginClassifier`` on one rank) / the bare PyTorch loop (same network, same classifier rows, same
  ArcFace margin, SGD), same process. Without DeepSpeed the bare loop alone is reported, with the reason.
* ``levers``: the bare loop with ``--channels-last``, fused SGD (``--fused-sgd``), ``torch.backends.cudnn.
  benchmark`` (``--cudnn-benchmark``), ``torch.compile`` (``--compile``), and all of them together, each / the
  default loop (``--lever-depth``, ``--lever-batch``).
* ``scan``: SCAN-iresnet100 training step / plain iresnet100 step (goal <= 1.3); folded SCAN inference / plain
  inference (goal <= 1.02), equal parameter counts checked.
* ``classifier``: ``ShardedMarginClassifier`` at 1M classes, embedding 512, batch 256, sample rate 1.0 and
  0.1, one GPU: peak memory (``torch.cuda.max_memory_allocated`` above the allocation before it was built),
  step time, and the peak predicted by the buffer count of BENCHMARKS.md ("Scale on paper"); at rate 1.0 also
  the step with TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``; the trainer's classifier is fp32).

``--cpu-smoke``: every part on the CPU at tiny sizes (width 0.125, iresnet18, batch 4, 1k classes, 2 steps; the
trainer in fp32, the "all levers" variant without a second compilation, compile backend aot_eager, classifier
peak from a live-tensor tracer). Its timings mean nothing; it checks that every code path runs.

Results: printed, and written to ``--out DIR`` as ``bench_gpu.json`` and ``bench_gpu.md`` after every part, so a
run stopped at a time limit keeps the parts it finished (``machine.complete`` says whether it ran to the end).

Time: 300 s on an H100 with ``--repeats 3 --warmup 3`` (2026-11-27), 145 s of it the two ``torch.compile``
builds of the lever part (``--no-compile`` drops them);
``--parts``, ``--repeats``, ``--steps`` shorten it further.

    .venv/bin/python -m benchmarks.bench_gpu --out benchmarks/results/gpu       # on a CUDA machine
    .venv/bin/python -m benchmarks.bench_gpu --cpu-smoke --out /tmp/gpu_smoke   # every code path, tiny, on the CPU

Without CUDA (and without ``--cpu-smoke``) it prints "no CUDA: nothing measured" and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # run as a file: its imports need the repository root, which `python -m` puts on sys.path
    raise SystemExit(f"run it from the repository root: python -m benchmarks.{Path(__file__).stem}")

import torch
import torch.nn.functional as F

from benchmarks.common import REPO

MiB = 1024**2

# Dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s, matched against torch.cuda.get_device_name in this
# order. Sources: NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100: BF16 1,979 SXM / 1,513 PCIe /
# 1,671 NVL TFLOP/s "with sparsity", i.e. twice the dense figure), NVIDIA H200 datasheet
# (nvidia.com/en-us/data-center/h200: 1,979 SXM / 1,671 NVL with sparsity), glennklockwood.com/garden/
# processors/h100 (BF16 matrix 989.4 dense, 1978.9 sparse), NVIDIA A100 datasheet (312 dense).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),  # "NVIDIA H100 80GB HBM3" = SXM5
    ("A100", 312.0),
)
# iresnet100 (LResNet100E-IR, ArcFace) at 112×112: 24.2115 GFLOPs, 65.132 M parameters — OpenVINO Open Model
# Zoo, models/public/face-recognition-resnet100-arcface-onnx/README.md; OMZ counts 2 FLOPs per multiply-add
# (its resnet-50 is listed at 8.2 GFLOPs = 2 × 4.1 GMACs).
PUBLISHED_R100_GFLOP = 24.2115
PUBLISHED_R100_MPARAMS = 65.132


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


T0 = time.perf_counter()


def peak_tflops(name: str) -> tuple[float | None, str]:
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"{key}: {value} TFLOP/s dense bf16 (datasheet)"
    return None, f"unknown card '{name}': pass --peak-tflops"


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


def profile_steps(variants: dict, label: str, out: Path | None, steps: int = 3) -> dict[str, dict]:
    """Where a step's time goes, per variant: ``steps`` steps under torch.profiler (CPU and, on a GPU, CUDA).

    Per step: wall ms; GPU kernel ms (the sum of the CUDA kernels' self time: wall well above it means the GPU
    waits for the host); host ops dispatched; device→host reads (``aten::_local_scalar_dense``, what .item(),
    bool(t), float(t) end in: each drains the queue). The top operators by device (else CPU) time are appended
    to ``bench_gpu_profile.txt`` in ``out``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    res = {}
    for name, (fn, setup) in variants.items():
        if setup:
            setup()
        fn()  # warm: allocator, cuDNN's algorithm choice
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            wall = time.perf_counter() - t
        events = prof.key_averages()
        count = {e.key: e.count for e in events}
        dev_us = sum(
            getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
            for e in events
            if e.device_type == DeviceType.CUDA
        )
        res[name] = {
            "wall_ms": 1e3 * wall / steps,
            "gpu_kernel_ms": dev_us / 1e3 / steps if torch.cuda.is_available() else None,
            "host_ops": sum(e.count for e in events if e.device_type == DeviceType.CPU) / steps,
            "host_reads": count.get("aten::_local_scalar_dense", 0) / steps,
        }
        r = res[name]
        log(
            f"  profile {label} / {name}: {r['wall_ms']:.1f} ms/step"
            + (f", GPU kernels {r['gpu_kernel_ms']:.1f} ms" if r["gpu_kernel_ms"] is not None else "")
            + f", {r['host_ops']:.0f} host ops, {r['host_reads']:.0f} host reads"
        )
        if out is not None:
            key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            with open(out / "bench_gpu_profile.txt", "a") as f:
                f.write(f"\n==== {label} / {name} ({steps} steps) ====\n")
                f.write(events.table(sort_by=key, row_limit=25, max_name_column_width=60) + "\n")
    return res


def free() -> None:
    """Collect what the caller has just deleted and hand cached GPU blocks back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- FLOPs


def count_flops(depth: int, width: float, input_size: int = 112, scan: bool = False) -> dict:
    """Forward and forward+backward FLOPs per image (FlopCounterMode: 2 per multiply-add), on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models.iresnet import build_iresnet
    from pipeline.models.scan import build_scan_iresnet

    build = build_scan_iresnet if scan else build_iresnet
    with torch.device("meta"):
        net = build(depth, width=width, embedding_size=512, input_size=input_size)
    x = torch.empty(1, 3, input_size, input_size, device="meta")
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net.embed(x)
    fwd = fc.get_total_flops()
    net.train()
    with FlopCounterMode(display=False) as fc:
        out = net(torch.empty(2, 3, input_size, input_size, device="meta"))
        loss = out.embedding.sum() + sum(out.aux_losses.values(), torch.zeros((), device="meta"))
        loss.backward()
    params = sum(p.numel() for p in net.parameters())
    return {"fwd_flop": fwd, "train_flop_counted": fc.get_total_flops() / 2, "params": params}


# --------------------------------------------------------------------------- shards


def default_shared() -> Path:
    """Where the LFW faces are: $LOWQ_SHARED/data (as tests/conftest.py reads it; gpu_check.sh points it at the
    copy carried to the GPU machine), else ../shared/data beside the checkout."""
    env = os.environ.get("LOWQ_SHARED")
    return Path(env) / "data" if env else REPO.parent / "shared" / "data"


def make_shards(
    root: Path, shared: Path, repeat: int = 1, num_classes: int | None = None, per_shard: int = 512
) -> Path:
    """The LFW training faces (1,814 JPEGs, 111 people) as WebDataset shards, as bench_loaders.make_shards,
    each image written ``repeat`` times under distinct keys: one epoch at batch 512 must be long enough that
    the loaders' per-epoch start-up (DataLoader workers, a fresh DALI pipeline) is not what is timed. The
    manifest may claim more classes than the faces have (classes without images), so that the training-step
    classifier has realistic rows."""
    import webdataset as wds

    from data_prep.manifest import Manifest, ShardInfo, sha256_file, write_manifest

    lfw = shared / "lfw_view1_112" / "train_112"
    if not lfw.is_dir():
        raise SystemExit(f"bench_gpu: no LFW faces at {lfw}: pass --shared DIR (the folder holding lfw_view1_112/)")
    people = sorted(p for p in lfw.iterdir() if p.is_dir())
    files = [(f, c) for c, p in enumerate(people) for f in sorted(p.glob("*.jpg"))]
    samples = [(f, c, r) for r in range(repeat) for f, c in files]
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for i in range(0, len(samples), per_shard):
        name = f"shard-{i // per_shard:06d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for f, c, r in samples[i : i + per_shard]:
                w.write(
                    {
                        "__key__": f"{c:04d}_{f.stem}_r{r}",
                        "jpg": f.read_bytes(),
                        "cls": str(c).encode(),
                        "src": f.name.encode(),
                    }
                )
        shards.append(ShardInfo(name, len(samples[i : i + per_shard]), sha256_file(root / name)))
    classes = max(len(people), num_classes or 0)
    write_manifest(root, Manifest(num_classes=classes, num_images=len(samples), shards=shards))
    return root


# --------------------------------------------------------------------------- parts


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
    why = _dali_importable()
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


class BareLoop:
    """The bare PyTorch training step: network (bf16 autocast) → fp32 embedding → cosine classifier with the
    ArcFace margin → CE; SGD with momentum and weight decay over the network and the class centres."""

    def __init__(
        self,
        net,
        classes: int,
        batch: dict,
        device: torch.device,
        channels_last=False,
        fused=False,
        compile_backend=None,
    ):
        from pipeline.losses.margin import CombinedMargin

        self.net = net.to(device).train()
        self.weight = torch.nn.Parameter(torch.randn(classes, net.embedding_size, device=device) * 0.01)
        self.margin = CombinedMargin(64.0, 1.0, 0.5, 0.0)
        self.x, self.y = batch["image"], batch["label"]
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.forward = self._forward
        if compile_backend:  # model.compile: blocks — each residual block compiled in place (one graph per shape)
            self.net.compile_regions("blocks", backend=compile_backend)
        params = [{"params": list(self.net.parameters())}, {"params": [self.weight]}]
        self.opt = torch.optim.SGD(
            params, lr=0.1, momentum=0.9, weight_decay=5e-4, **({"fused": True} if fused else {})
        )
        self.device = device

    def _forward(self, x):
        out = self.net(x)
        return out.embedding, out.aux_losses

    def step(self):
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            emb, aux = self.forward(self.x)
        cos = F.linear(F.normalize(emb.float()), F.normalize(self.weight))
        loss = F.cross_entropy(self.margin(cos, self.y), self.y)
        for v in aux.values():
            loss = loss + v.float()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def make_batch(n: int, classes: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": (torch.rand(n, 3, 112, 112, generator=g) * 2 - 1).to(device),
        "label": torch.randint(0, classes, (n,), generator=g).to(device),
    }


def build_trainer(
    depth: int, batch: int, sz: Sizes, device: torch.device, shards: Path, tmp: Path, data: tuple[str, ...] = ()
):
    """The real Trainer (as bench_trainer.py builds it), bf16, one rank, or (None, reason). ``data``: overrides
    of its loader (default: the torch loader, never iterated: batches come from memory)."""
    if importlib.util.find_spec("deepspeed") is None:
        return None, "deepspeed is not installed: bare loop only"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    from pipeline.config import load_config
    from pipeline.train import Trainer

    cfg = load_config(
        [REPO / "configs/arcface_r50.yaml"],
        [
            f"model.backbone=iresnet{depth}",
            f"model.width={sz.width}",
            f"data.train={shards}",
            f"data.batch_size={batch}",
            f"output.dir={tmp / (f'run_r{depth}_b{batch}' + ('_dali' if data else ''))}",  # one run per folder
            f"device={'cuda' if device.type == 'cuda' else 'cpu'}",
            *(data or ("data.loader=torch", "data.num_workers=0")),  # never iterated: the cheapest to build
            f"deepspeed.precision={sz.trainer_precision}",
            "classifier.sample_rate=1.0",
        ],
    )
    try:
        return Trainer(cfg), None
    except Exception as e:  # reported (with the reason), the bare loop is still measured
        traceback.print_exc()
        return None, f"Trainer failed to build: {type(e).__name__}: {e}"


def part_train(
    args, sz: Sizes, device: torch.device, clock: Clock, shards: Path, tmp: Path, peak: float | None, fl: dict
) -> dict:
    from pipeline.models.iresnet import build_iresnet

    res = {
        "precision": f"bf16 autocast (bare loop); trainer deepspeed.precision={sz.trainer_precision} (stage 0: autocast)",
        "runs": [],
    }
    # MFU counts the FLOPs of the network actually run (full width on the GPU, tiny width in the smoke run)
    flops = {d: fl[f"iresnet{d}"] if sz.width == 1.0 else count_flops(d, sz.width) for d in sz.depths}
    res["flops_width"] = sz.width
    for depth in sz.depths:
        for batch in sz.batches:
            label = f"iresnet{depth} batch {batch}"
            log(f"train: {label}")
            trainer, why = build_trainer(depth, batch, sz, device, shards, tmp)
            classes = trainer.loader.num_classes if trainer is not None else sz.train_classes
            data = make_batch(batch, min(classes, 111), device)  # labels of real faces (< 111)
            torch.manual_seed(0)
            bare = BareLoop(build_iresnet(depth, width=sz.width, embedding_size=512), classes, data, device)
            variants = {"bare": (bare.step, None)}
            trainer_step = None
            if trainer is not None:

                def trainer_step(trainer=trainer, data=data):
                    trainer.train_step(data)

                variants["trainer"] = (trainer_step, None)
            t = round_robin(clock, variants, sz, label)
            if not res.get("profile"):  # the first network and batch only: the why, not another timing
                res["profile"] = {"label": label, **profile_steps(variants, label, args.out)}
            fwd = flops[depth]["fwd_flop"]
            row = {"depth": depth, "batch": batch, "classes": classes}
            for name, r in t.items():
                ips = batch / r["median_s"]
                row[name] = {
                    "step_s": r["median_s"],
                    "img_s": ips,
                    "blocks_s": r["blocks_s"],
                    "peak_step_mib": r["peak_step_mib"],
                    "tflop_s": 3 * fwd * ips / 1e12,
                    "mfu": (3 * fwd * ips / 1e12 / peak) if peak else None,
                }
            row["trainer_over_bare"] = (row["trainer"]["img_s"] / row["bare"]["img_s"]) if trainer else None
            row["trainer_note"] = why
            res["runs"].append(row)
            mfu = row["bare"]["mfu"]
            log(
                f"train: {label}: bare {row['bare']['img_s']:.1f} img/s"
                + (f" (MFU {mfu:.1%})" if mfu is not None else "")
                + (
                    f", trainer {row['trainer']['img_s']:.1f} img/s, trainer/bare {row['trainer_over_bare']:.3f}"
                    if trainer
                    else f"; {why}"
                )
            )
            del bare, trainer, trainer_step, variants, data
            free()
    return res


def part_levers(args, sz: Sizes, device: torch.device, clock: Clock, tmp: Path) -> dict:
    from pipeline.models.iresnet import build_iresnet

    depth, batch = sz.lever_depth, sz.lever_batch
    data = make_batch(batch, 111, device)
    want = {
        "channels_last": args.channels_last,
        "fused_sgd": args.fused_sgd,
        "cudnn_benchmark": args.cudnn_benchmark,
        "compile": args.compile,
    }
    if device.type == "cpu" and want["channels_last"]:  # a CUDA lever; on this CPU it can abort the process
        log("levers: channels_last skipped on the CPU (its backward aborted torch 2.13's CPU kernels with heap "
            "corruption on an AVX-512 EPYC: scripts/repro/channels_last_cpu_abort.py)")  # fmt: skip
        want["channels_last"] = False
    on = [k for k, v in want.items() if v]
    configs = {"default": {}}
    for k in on:
        configs[k] = {k: True}
    together = [k for k in on if k != "compile" or sz.all_with_compile]
    if len(together) > 1:
        configs["all"] = dict.fromkeys(together, True)
    loops, variants, notes = {}, {}, {}
    for name, c in configs.items():
        torch.manual_seed(0)
        log(f"levers: building '{name}'")
        try:
            loop = BareLoop(
                build_iresnet(depth, width=sz.width, embedding_size=512),
                sz.train_classes,
                data,
                device,
                channels_last=c.get("channels_last", False),
                fused=c.get("fused_sgd", False),
                compile_backend=sz.compile_backend if c.get("compile") else None,
            )
            if c.get("compile"):  # compile outside the timed blocks (counted separately)
                t = time.perf_counter()
                loop.step()
                clock.sync()
                notes[name] = f"first step incl. compilation {time.perf_counter() - t:.1f} s"
        except Exception as e:
            traceback.print_exc()
            notes[name] = f"failed: {type(e).__name__}: {e}"
            continue
        bench = bool(c.get("cudnn_benchmark"))
        loops[name] = loop
        variants[name] = (loop.step, lambda bench=bench: setattr(torch.backends.cudnn, "benchmark", bench))
    t = round_robin(clock, variants, sz, f"levers iresnet{depth} batch {batch}")
    torch.backends.cudnn.benchmark = False
    base = t["default"]["median_s"]
    res = {
        "depth": depth,
        "batch": batch,
        "compile_backend": sz.compile_backend,
        "all_is": "+".join(configs.get("all", {})),
        "variants": {},
    }
    for name in configs:
        if name not in t:
            res["variants"][name] = {"speedup_vs_default": None, "note": notes.get(name)}
            continue
        res["variants"][name] = {
            "step_s": t[name]["median_s"],
            "img_s": batch / t[name]["median_s"],
            "speedup_vs_default": base / t[name]["median_s"],
            "peak_step_mib": t[name]["peak_step_mib"],
            "note": notes.get(name),
        }
        log(
            f"levers: {name:16s} {batch / t[name]['median_s']:9.1f} img/s   x{base / t[name]['median_s']:.3f} vs default"
        )
    del loops, variants, data
    free()
    return res


def part_scan(args, sz: Sizes, device: torch.device, clock: Clock) -> dict:
    from pipeline.models.iresnet import build_iresnet
    from pipeline.models.scan import build_scan_iresnet

    depth, batch = sz.scan_depth, sz.scan_batch
    data = make_batch(batch, 111, device)
    torch.manual_seed(0)
    plain = BareLoop(build_iresnet(depth, width=sz.width, embedding_size=512), sz.train_classes, data, device)
    scan = BareLoop(build_scan_iresnet(depth, width=sz.width, embedding_size=512), sz.train_classes, data, device)
    log(f"scan: training step, iresnet{depth} vs SCAN-iresnet{depth} (efficient RMO), batch {batch}")
    t = round_robin(clock, {"plain": (plain.step, None), "scan": (scan.step, None)}, sz, "scan train")
    res = {
        "depth": depth,
        "train_batch": batch,
        "train_plain_step_s": t["plain"]["median_s"],
        "train_scan_step_s": t["scan"]["median_s"],
        "train_scan_over_plain": t["scan"]["median_s"] / t["plain"]["median_s"],
        "train_peak_step_mib": {k: v["peak_step_mib"] for k, v in t.items()},
    }
    res["train_goal_met"] = res["train_scan_over_plain"] <= 1.3
    res["profile"] = profile_steps(
        {"plain": (plain.step, None), "scan": (scan.step, None)}, f"scan iresnet{depth} batch {batch}", args.out
    )
    log(f"scan: training SCAN/plain = {res['train_scan_over_plain']:.3f} (goal <= 1.3)")

    scan_net = scan.net.eval()
    folded, n_folded = scan_net.folded()
    plain_net = plain.net.eval()
    folded = folded.to(device).eval()
    res["folded_convs"] = n_folded
    res["params_plain"] = sum(p.numel() for p in plain_net.parameters())
    res["params_folded"] = sum(p.numel() for p in folded.parameters())
    x = make_batch(sz.infer_batch, 111, device, seed=1)["image"]

    def infer(net, x=x):
        def run():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                net.embed(x)

        return run

    log(f"scan: inference, folded SCAN vs plain, batch {sz.infer_batch}")
    isz = Sizes(**{**sz.__dict__, "steps": sz.steps * 2, "repeats": max(sz.repeats, 7) if device.type == "cuda" else 1})
    ti = round_robin(clock, {"plain": (infer(plain_net), None), "folded": (infer(folded), None)}, isz, "scan infer")
    res.update(
        infer_batch=sz.infer_batch,
        infer_plain_s=ti["plain"]["median_s"],
        infer_folded_s=ti["folded"]["median_s"],
        infer_folded_over_plain=ti["folded"]["median_s"] / ti["plain"]["median_s"],
        params_equal=res["params_plain"] == res["params_folded"],
    )
    res["infer_goal_met"] = res["infer_folded_over_plain"] <= 1.02 and res["params_equal"]
    log(
        f"scan: inference folded/plain = {res['infer_folded_over_plain']:.3f} (goal <= 1.02), params equal: {res['params_equal']}"
    )
    del plain, scan, scan_net, plain_net, folded, data, x
    free()
    return res


def _dali_importable() -> str | None:
    """None when nvidia.dali imports, else why not."""
    if importlib.util.find_spec("nvidia.dali") is None:
        return "nvidia.dali is not importable"
    try:
        import nvidia.dali  # noqa: F401
    except Exception as e:  # a broken install (CUDA mismatch, ...) is a skip, not a crash
        return f"nvidia.dali does not import: {type(e).__name__}: {e}"
    return None


def part_dali(args, sz: Sizes, device: torch.device, clock: Clock, shards: Path, tmp: Path) -> dict:
    """DALI's knobs swept (CPU threads × prefetch depth × hardware-decoder share), then the number that matters:
    the trainer's step fed by the best DALI setting / the same step on an in-memory batch (goal ≥ 0.95)."""
    why = _dali_importable()
    if why:
        return {"skipped": why}

    dali_device = "gpu" if device.type == "cuda" else "cpu"
    res = {"batch": sz.loader_batch, "dali_device": dali_device, "sweep": []}
    for threads in sz.dali_sweep_threads:
        for prefetch in sz.dali_sweep_prefetch:
            for hw in sz.dali_sweep_hw if dali_device == "gpu" else (0.0,):
                ips = dali_img_s(shards, sz, dali_device, threads, dali_prefetch=prefetch, dali_hw_decoder_load=hw)
                res["sweep"].append({"threads": threads, "prefetch": prefetch, "hw_decoder_load": hw, "img_s": ips})
                log(f"dali: threads {threads}, prefetch {prefetch}, hw_decoder_load {hw}: {ips:.0f} img/s")
                free()
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
    res["trainer_fed"] = {
        "depth": depth,
        "batch": batch,
        "in_memory_img_s": batch / t["in_memory"]["median_s"],
        "dali_fed_img_s": batch / t["dali_fed"]["median_s"],
    }
    res["trainer_fed"]["fed_over_memory"] = res["trainer_fed"]["dali_fed_img_s"] / res["trainer_fed"]["in_memory_img_s"]
    log(f"dali: trainer fed by DALI / in-memory batches = {res['trainer_fed']['fed_over_memory']:.3f} (goal >= 0.95)")
    return res  # the trainer and its loader go with this frame (the caller's next part frees the cache)


def expected_positive_rows(classes_local: int, global_batch: int, world: int = 1) -> float:
    """Expected distinct positive classes of a uniform-label global batch that fall in one shard."""
    total = classes_local * world
    return classes_local * (1.0 - (1.0 - 1.0 / total) ** global_batch)


def predicted_classifier_peak(classes: int, dim: int, global_batch: int, sample_rate: float, world: int = 1) -> dict:
    """Peak tensor bytes of one ShardedMarginClassifier step on a rank holding ``classes`` rows (all fp32),
    from the buffers live at its three high-water marks (traced op by op; BENCHMARKS.md "Scale on paper"):

    * softmax forward (exp):  weight + momentum + normalised rows (+ gathered rows if sampling) + 4 N×S
      (cosine, s·cosine with the margin, logits − max, exp) + 2 N×D (gathered and normalised embeddings);
    * F.normalize backward:   weight + momentum + 5 S×D (grad of the normalised rows, two quotients, a
      negation, a product) (+ gathered rows if sampling);
    * index backward (sampling only): weight + momentum + 2 C×D (the dense zero gradient and index_put's
      out-of-place result) + S×D.

    S = the sampled rows = max(ceil(rate·C), distinct positives in the shard)."""
    pos = expected_positive_rows(classes, global_batch, world)
    num_sample = classes if sample_rate >= 1.0 else min(classes, max(math.ceil(sample_rate * classes), round(pos)))
    sampled = num_sample < classes
    cd, sd, ns = classes * dim * 4, num_sample * dim * 4, global_batch * num_sample * 4
    marks = {
        "softmax": 2 * cd + (2 if sampled else 1) * sd + 4 * ns + 2 * global_batch * dim * 4,
        "normalize_backward": 2 * cd + (6 if sampled else 5) * sd,
        "index_backward": (4 * cd + sd) if sampled else 0,
    }
    where = max(marks, key=marks.get)
    return {"state_bytes": 3 * cd, "peak_bytes": marks[where], "peak_at": where, "num_sample": num_sample}


class LiveTensorPeak:
    """Peak bytes of live tensor storages during a block of code, on any device (the CPU stand-in for
    ``torch.cuda.max_memory_allocated``): a dispatch mode registers every op's output storage and a weakref
    finalizer drops it when the storage dies. Tensors that exist before the block are passed to ``track``."""

    def __init__(self):
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def track(self, *tensors) -> None:
        import weakref

        for t in tensors:
            st = t.untyped_storage()
            k = st._cdata
            if k in self.live:
                continue
            self.live[k] = st.nbytes()
            self.current += st.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._drop, k)

    def _drop(self, k: int) -> None:
        self.current -= self.live.pop(k, 0)

    def run(self, fn) -> int:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.track(*(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)))
                return out

        self.peak = self.current
        with Mode():
            fn()
        return self.peak


def part_classifier(args, sz: Sizes, device: torch.device, clock: Clock) -> dict:
    from pipeline.losses.margin import CombinedMargin
    from pipeline.losses.sharded_classifier import ShardedMarginClassifier

    res = {"classes": sz.cls_classes, "dim": 512, "batch": sz.cls_batch, "runs": []}
    for rate in sz.cls_rates:
        log(f"classifier: {sz.cls_classes:,} classes, sample rate {rate}, batch {sz.cls_batch}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        clf = ShardedMarginClassifier(sz.cls_classes, 512, CombinedMargin(64.0, 1.0, 0.5, 0.0), sample_rate=rate)
        clf = clf.to(device)
        opt = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(0)
        emb = torch.randn(sz.cls_batch, 512, generator=g).to(device).requires_grad_(True)
        lab = torch.randint(0, sz.cls_classes, (sz.cls_batch,), generator=g).to(device)

        def step(clf=clf, opt=opt, emb=emb, lab=lab):
            loss = clf(emb, lab)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            emb.grad = None

        for _ in range(sz.warmup):
            step()
        times = [clock.per_call(step, sz.steps) for _ in range(sz.repeats)]
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            how = "torch.cuda.max_memory_allocated above the allocation before the classifier was built"
        else:  # one more step under the live-tensor tracer (RSS is allocator noise at smoke sizes)
            tracer = LiveTensorPeak()
            tracer.track(
                clf.weight, emb, lab, *(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
            )
            peak = tracer.run(step)
            how = "live tensor bytes at the peak of one step (dispatch-mode tracer, CPU)"
        tf32 = None
        if device.type == "cuda" and rate == 1.0:  # lever: the fp32 matmuls on TF32 tensor cores
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                step()
                tf32 = statistics.median([clock.per_call(step, sz.steps) for _ in range(sz.repeats)])
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
        state = (
            sum(p.numel() * p.element_size() for p in clf.parameters())
            + sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
            + clf.weight.numel() * 4
        )  # + the gradient, freed by zero_grad(set_to_none) at the end of the step
        pred = predicted_classifier_peak(sz.cls_classes, 512, sz.cls_batch, rate)
        row = {
            "sample_rate": rate,
            "step_s": statistics.median(times),
            "blocks_s": times,
            "peak_mib": None if peak is None else peak / MiB,
            "peak_how": how,
            "state_mib": state / MiB,
            "predicted_peak_mib": pred["peak_bytes"] / MiB,
            "predicted_state_mib": pred["state_bytes"] / MiB,
            "peak_over_predicted": None if peak is None else peak / pred["peak_bytes"],
            "predicted_peak_at": pred["peak_at"],
            "tf32_step_s": tf32,
            "tf32_speedup": None if tf32 is None else statistics.median(times) / tf32,
        }
        res["runs"].append(row)
        log(
            f"classifier: rate {rate}: step {row['step_s'] * 1000:.1f} ms, peak "
            + ("n/a" if peak is None else f"{row['peak_mib']:.0f} MiB")
            + f" (predicted {row['predicted_peak_mib']:.0f} MiB), state {row['state_mib']:.0f} MiB"
        )
        del clf, opt, emb, lab, step
        free()
    return res


# --------------------------------------------------------------------------- report


def fmt(v, spec=".3f", none="—") -> str:
    return none if v is None else format(v, spec)


def profile_table(prof: dict, title: str) -> list[str]:
    L = [f"### {title}", "", "| variant | wall ms/step | GPU kernels ms/step | host ops/step | host reads/step |"]
    L += ["|---|---:|---:|---:|---:|"]
    for name, r in prof.items():
        if isinstance(r, dict):
            L.append(
                f"| {name} | {r['wall_ms']:.1f} | {fmt(r['gpu_kernel_ms'], '.1f')} | {r['host_ops']:.0f} | "
                f"{r['host_reads']:.0f} |"
            )
    return L + ["", "(top operators of each: bench_gpu_profile.txt)", ""]


def markdown(R: dict) -> str:
    m = R["machine"]
    L = [
        f"# bench_gpu.py — {m['device_name']} ({'CPU SMOKE: tiny sizes, not a measurement' if m['cpu_smoke'] else 'measured'})",
        "",
        f"torch {m['torch']}, {m['cpu_cores']} CPU cores, {m['date']}; peak bf16 {fmt(m['peak_tflops'], '.1f')} TFLOP/s "
        f"({m['peak_source']}); timing: {m['timing']}",
        "",
    ]
    fl = R.get("flops", {})
    if fl:
        L += ["## FLOPs (FlopCounterMode, 2 FLOPs per multiply-add, 112 px, per image)", ""]
        L += ["| network | forward GFLOP | counted fwd+bwd / fwd | parameters (M) |", "|---|---:|---:|---:|"]
        for k, v in fl.items():
            if isinstance(v, dict) and "fwd_flop" in v:
                L.append(
                    f"| {k} | {v['fwd_flop'] / 1e9:.3f} | {v['train_flop_counted'] / v['fwd_flop']:.2f} | {v['params'] / 1e6:.3f} |"
                )
        if "r100_vs_published" in fl:
            L += ["", f"iresnet100 forward / published {PUBLISHED_R100_GFLOP} GFLOP: **{fl['r100_vs_published']:.4f}**"]
        L.append("")
    ld = R.get("loader", {})
    L += ["## Loader", ""]
    if "skipped" in ld:
        L += [f"skipped: {ld['skipped']}", ""]
    elif ld:
        L += [
            "| loader | batch | threads/workers | img/s |",
            "|---|---:|---:|---:|",
            f"| DALI ({ld['dali_device']}) | {ld['batch']} | {ld['dali_threads']} | {ld['dali_img_s']:.0f} |",
            f"| torch | {ld['batch']} | {ld['torch_workers']} | {ld['torch_img_s']:.0f} |",
            "",
            f"DALI / torch: **{ld['dali_over_torch']:.2f}**",
            "",
        ]
    dl = R.get("dali", {})
    if "sweep" in dl:
        L += [f"## DALI sweep ({dl['dali_device']}, batch {dl['batch']})", ""]
        L += ["| threads | prefetch | hw_decoder_load | img/s |", "|---:|---:|---:|---:|"]
        for r in dl["sweep"]:
            L.append(f"| {r['threads']} | {r['prefetch']} | {r['hw_decoder_load']} | {r['img_s']:.0f} |")
        fed = dl.get("trainer_fed", {})
        if "fed_over_memory" in fed:
            L += [
                "",
                f"Trainer iresnet{fed['depth']} batch {fed['batch']} fed by DALI (the best row): "
                f"{fed['dali_fed_img_s']:.0f} img/s vs {fed['in_memory_img_s']:.0f} on an in-memory batch: "
                f"**{fed['fed_over_memory']:.3f}** (goal ≥ 0.95)",
            ]
        elif fed:
            L += ["", f"trainer fed by DALI: skipped: {fed.get('skipped')}"]
        L.append("")
    elif "skipped" in dl and dl["skipped"] != "not in --parts":
        L += ["## DALI sweep", "", f"skipped: {dl['skipped']}", ""]
    tr = R.get("train", {})
    if "runs" in tr:
        L += [f"## Training step ({tr['precision']})", ""]
        L += [
            "| network | batch | bare img/s | bare MFU | trainer img/s | trainer MFU | trainer / bare | bare peak step MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in tr["runs"]:
            t = r.get("trainer") or {}
            L.append(
                f"| iresnet{r['depth']} | {r['batch']} | {r['bare']['img_s']:.1f} | {fmt(r['bare']['mfu'], '.1%')} | "
                f"{fmt(t.get('img_s'), '.1f')} | {fmt(t.get('mfu'), '.1%')} | {fmt(r['trainer_over_bare'])} | "
                f"{fmt(r['bare']['peak_step_mib'], '.0f')} |"
            )
        notes = {r["trainer_note"] for r in tr["runs"] if r["trainer_note"]}
        L += [""] + [f"note: {n}" for n in notes] + ([""] if notes else [])
        if tr.get("profile"):
            L += profile_table(tr["profile"], f"Where a step goes ({tr['profile']['label']})")
    elif tr:
        L += ["## Training step", "", f"skipped: {tr.get('skipped')}", ""]
    lv = R.get("levers", {})
    if "variants" in lv:
        L += [
            f"## Levers (bare loop, iresnet{lv['depth']}, batch {lv['batch']}, compile backend "
            f"{lv['compile_backend']}; all = {lv['all_is']})",
            "",
        ]
        L += ["| variant | img/s | speed-up vs default | note |", "|---|---:|---:|---|"]
        for k, v in lv["variants"].items():
            L.append(f"| {k} | {fmt(v.get('img_s'), '.1f')} | {fmt(v['speedup_vs_default'])} | {v.get('note') or ''} |")
        L.append("")
    sc = R.get("scan", {})
    if "train_scan_over_plain" in sc:
        L += [
            f"## SCAN (iresnet{sc['depth']})",
            "",
            "| ratio | measured | goal |",
            "|---|---:|---|",
            f"| training step SCAN / plain (batch {sc['train_batch']}) | **{sc['train_scan_over_plain']:.3f}** | <= 1.3 |",
            f"| inference folded SCAN / plain (batch {sc['infer_batch']}) | **{sc['infer_folded_over_plain']:.3f}** | <= 1.02 |",
            "",
            f"parameters plain / folded: {sc['params_plain']:,} / {sc['params_folded']:,} ({'equal' if sc['params_equal'] else 'DIFFERENT'})",
            "",
        ]
        if sc.get("profile"):
            L += profile_table(sc["profile"], f"Where a training step goes (iresnet{sc['depth']} vs SCAN)")
    cl = R.get("classifier", {})
    if "runs" in cl:
        L += [f"## Sharded classifier ({cl['classes']:,} classes, D {cl['dim']}, batch {cl['batch']}, one device)", ""]
        L += [
            "| sample rate | step ms | TF32 speed-up | peak MiB | predicted peak MiB (at) | measured / predicted | state MiB |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in cl["runs"]:
            L.append(
                f"| {r['sample_rate']} | {r['step_s'] * 1000:.1f} | {fmt(r.get('tf32_speedup'))} | "
                f"{fmt(r['peak_mib'], '.1f')} | {r['predicted_peak_mib']:.1f} ({r['predicted_peak_at']}) | "
                f"{fmt(r['peak_over_predicted'])} | {r['state_mib']:.1f} |"
            )
        L += ["", f"peak: {cl['runs'][0]['peak_how']}", ""]
    errs = R.get("errors", {})
    if errs:
        L += ["## Errors", ""] + [f"- {k}: {v}" for k, v in errs.items()] + [""]
    return "\n".join(L)


def write_results(out: Path | None, R: dict, final: bool) -> str:
    """bench_gpu.json and bench_gpu.md into ``out`` (atomically); before the end they say "incomplete"."""
    R["machine"]["complete"] = final
    md = markdown(R)
    if not final:
        md = md.replace("\n", "\n\n**incomplete: the run had not finished when this was written**\n", 1)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (
            ("bench_gpu.json", json.dumps(R, indent=1, default=str) + "\n"),
            ("bench_gpu.md", md + "\n"),
        ):
            tmp = out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(out / name)
    return md


# --------------------------------------------------------------------------- main

PARTS = ("loader", "train", "levers", "scan", "classifier", "dali")
# make gpu-check's first call (docs/gpu-check.md): the figures that matter most first, all on one GPU in ~5 minutes
PLANS = {
    "gpu-check": dict(
        parts="train,levers,scan,classifier",
        depths="100",
        batches="128,256",
        lever_depth=100,
        lever_batch=256,
        repeats=3,
        warmup=3,
        cls_rates=(1.0,),
    ),
    # the DALI call: the loader sweep and the trainer fed by DALI
    "dali": dict(parts="dali", repeats=3, warmup=3),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", type=Path, help="write bench_gpu.json and bench_gpu.md into this directory")
    ap.add_argument("--cpu-smoke", action="store_true", help="run every part at tiny sizes on the CPU")
    ap.add_argument(
        "--parts",
        help=f"comma-separated subset of {','.join(PARTS)}, run in this order (default: all but dali, or the plan's)",
    )
    ap.add_argument("--plan", choices=sorted(PLANS), help="a preset: gpu-check (call 1 of make gpu-check) | dali")
    ap.add_argument("--shards", type=Path, help="WebDataset shard directory (default: shard the LFW faces)")
    ap.add_argument(
        "--shared",
        type=Path,
        default=default_shared(),
        help="the shared data folder holding lfw_view1_112/ (default: $LOWQ_SHARED/data, else ../shared/data)",
    )
    ap.add_argument("--warmup", type=int, help="untimed steps per variant (default 5; smoke 1)")
    ap.add_argument("--steps", type=int, help="timed steps per block (default 10; smoke 2)")
    ap.add_argument("--repeats", type=int, help="timed blocks per variant, median reported (default 5; smoke 1)")
    ap.add_argument("--depths", help="training-step depths (default 50,100)")
    ap.add_argument("--batches", help="training-step batches per GPU (default 128,256)")
    ap.add_argument("--train-classes", type=int, help="classifier rows in the training-step runs (default 10000)")
    ap.add_argument("--lever-depth", type=int, help="iresnet depth for the lever runs (default 50)")
    ap.add_argument("--lever-batch", type=int, help="batch for the lever runs (default 128)")
    ap.add_argument("--cls-classes", type=int, help="classes of the classifier part (default 1000000)")
    ap.add_argument("--torch-workers", type=int, help="torch loader workers (default: CPU cores, at most 16)")
    ap.add_argument("--dali-threads", type=int, help="DALI CPU threads (default 8)")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the card (default: from its name)")
    for lever, helptext in (
        ("channels-last", "NHWC activations and weights"),
        ("fused-sgd", "torch.optim.SGD(..., fused=True)"),
        ("cudnn-benchmark", "torch.backends.cudnn.benchmark = True"),
        ("compile", "model.compile: blocks, each residual block compiled (inductor; aot_eager in --cpu-smoke)"),
    ):
        ap.add_argument(f"--{lever}", action=argparse.BooleanOptionalAction, default=True, help=f"lever: {helptext}")
    args = ap.parse_args(argv)
    plan = dict(PLANS[args.plan]) if args.plan else {}
    for key in ("depths", "batches", "lever_depth", "lever_batch", "repeats", "warmup"):
        if plan.get(key) is not None and getattr(args, key) is None:
            setattr(args, key, plan[key])
    if args.parts is None:
        args.parts = plan.get("parts", ",".join(p for p in PARTS if p != "dali"))
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"--parts: unknown {sorted(unknown)} (known: {', '.join(PARTS)})")

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("no CUDA: nothing measured (--cpu-smoke runs every part at tiny sizes on the CPU)")
        return 0
    device = torch.device("cuda", 0) if cuda and not args.cpu_smoke else torch.device("cpu")
    sz = smoke_sizes() if args.cpu_smoke else Sizes(torch_workers=min(16, os.cpu_count() or 1))
    for name in ("warmup", "steps", "repeats", "train_classes", "lever_depth", "lever_batch", "cls_classes"):
        if getattr(args, name) is not None:
            setattr(sz, name, getattr(args, name))
    if args.torch_workers:
        sz.torch_workers = args.torch_workers
    if args.dali_threads:
        sz.dali_threads = args.dali_threads
    if args.depths:
        sz.depths = tuple(int(d) for d in args.depths.split(","))
    if args.batches:
        sz.batches = tuple(int(b) for b in args.batches.split(","))
    if "cls_rates" in plan:
        sz.cls_rates = plan["cls_rates"]
    if args.cpu_smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    peak, peak_src = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else peak_tflops(name)
    if device.type == "cpu":
        peak, peak_src = None, "no MFU on the CPU"
    R: dict = {
        "machine": {
            "device_name": name,
            "cpu_smoke": bool(args.cpu_smoke),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cpu_cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "peak_tflops": peak,
            "peak_source": peak_src,
            "timing": ("CUDA events" if device.type == "cuda" else "time.perf_counter")
            + f", {sz.warmup} warm-up, median of {sz.repeats} blocks of {sz.steps} steps",
            "sizes": {k: v for k, v in sz.__dict__.items() if k != "extra"},
        },
        "errors": {},
    }
    log(f"device: {name}; peak bf16: {peak} ({peak_src}); parts: {', '.join(parts)}")

    # FLOPs: always the published check at full width; the measured widths too
    fl = {}
    for d in sorted({100, *sz.depths}) if device.type == "cuda" else [100]:  # the MFU needs them on the GPU
        fl[f"iresnet{d}"] = count_flops(d, 1.0)
    fl["r100_vs_published"] = fl["iresnet100"]["fwd_flop"] / 1e9 / PUBLISHED_R100_GFLOP
    fl["r100_params_vs_published"] = fl["iresnet100"]["params"] / 1e6 / PUBLISHED_R100_MPARAMS
    fl["convention"] = "FlopCounterMode: 2 FLOPs per multiply-add (published figure: the same convention)"
    R["flops"] = fl
    log(
        f"FLOPs: iresnet100 forward {fl['iresnet100']['fwd_flop'] / 1e9:.3f} GFLOP/image "
        f"(published {PUBLISHED_R100_GFLOP}: ratio {fl['r100_vs_published']:.4f}); "
        f"counted fwd+bwd = {fl['iresnet100']['train_flop_counted'] / fl['iresnet100']['fwd_flop']:.2f} x fwd"
    )

    clock = Clock(device)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmpdir:
        tmp = Path(tmpdir)
        shards = args.shards
        if shards is None and {"loader", "train", "dali"} & set(parts):
            repeat = max(1, math.ceil((sz.loader_images + 4 * sz.loader_batch) / 1814))
            log(f"shards: the LFW faces x{repeat} under {tmp / 'shards'}")
            shards = make_shards(tmp / "shards", args.shared, repeat=repeat, num_classes=sz.train_classes)
        elif shards is not None and "train" in parts:  # the trainer's classifier rows come from the manifest
            log(f"shards: {shards} (the trainer uses its manifest's class count)")
        jobs = {
            "loader": lambda: part_loader(args, sz, device, shards),
            "train": lambda: part_train(args, sz, device, clock, shards, tmp, peak, fl),
            "levers": lambda: part_levers(args, sz, device, clock, tmp),
            "scan": lambda: part_scan(args, sz, device, clock),
            "classifier": lambda: part_classifier(args, sz, device, clock),
            "dali": lambda: part_dali(args, sz, device, clock, shards, tmp),
        }
        for part in PARTS:
            if part not in parts:
                R[part] = {"skipped": "not in --parts"}
        for part in parts:  # in the order given: the most important first (a time limit cuts the tail)
            t = time.perf_counter()
            try:
                R[part] = jobs[part]()
            except Exception as e:
                traceback.print_exc()
                R[part] = {"skipped": f"error: {type(e).__name__}: {e}"}
                R["errors"][part] = f"{type(e).__name__}: {e}"
            R[part]["seconds"] = time.perf_counter() - t
            log(f"{part}: done in {R[part]['seconds']:.1f} s")
            write_results(args.out, R, final=False)  # a run killed at a time limit keeps the parts done
    R["machine"]["total_seconds"] = time.perf_counter() - T0
    md = write_results(args.out, R, final=True)
    print("\n" + md)
    if args.out:
        log(f"wrote {args.out / 'bench_gpu.json'} and {args.out / 'bench_gpu.md'}")
    return 1 if R["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
