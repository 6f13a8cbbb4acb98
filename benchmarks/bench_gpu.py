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
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

if not __package__:  # run as a file: its imports need the repository root, which `python -m` puts on sys.path
    raise SystemExit(f"run it from the repository root: python -m benchmarks.{Path(__file__).stem}")

import torch

# the machinery and the parts live in benchmarks/gpu/
from benchmarks.gpu.classifier import part_classifier
from benchmarks.gpu.dali import part_dali
from benchmarks.gpu.flops import flops_section, peak_tflops
from benchmarks.gpu.loader import part_loader
from benchmarks.gpu.report import write_results
from benchmarks.gpu.scan import part_scan
from benchmarks.gpu.shards import default_shared, make_shards
from benchmarks.gpu.timing import T0, Clock, Sizes, log, smoke_sizes
from benchmarks.gpu.train import part_levers, part_train

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


def parse_args(argv=None) -> tuple[argparse.Namespace, dict, list[str]]:
    """The options, with the chosen plan's values filled in where not given: (args, the plan, the parts to run)."""
    ap = _parser()
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
    return args, plan, parts


def _parser() -> argparse.ArgumentParser:
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
    _add_size_options(ap)
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the card (default: from its name)")
    for lever, helptext in (
        ("channels-last", "NHWC activations and weights"),
        ("fused-sgd", "torch.optim.SGD(..., fused=True)"),
        ("cudnn-benchmark", "torch.backends.cudnn.benchmark = True"),
        ("compile", "model.compile: blocks, each residual block compiled (inductor; aot_eager in --cpu-smoke)"),
    ):
        ap.add_argument(f"--{lever}", action=argparse.BooleanOptionalAction, default=True, help=f"lever: {helptext}")
    return ap


def _add_size_options(ap: argparse.ArgumentParser) -> None:
    """The options that override a field of ``Sizes``."""
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


def run_sizes(args: argparse.Namespace, plan: dict) -> Sizes:
    """The sizes of this run: full (or the CPU smoke's), with the options and the plan applied."""
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
    return sz


def machine_section(args: argparse.Namespace, device: torch.device, sz: Sizes) -> tuple[dict, float | None]:
    """The report's ``machine`` section (device, versions, timing, sizes) and the bf16 peak for the MFU (None on
    the CPU)."""
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    peak, peak_src = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else peak_tflops(name)
    if device.type == "cpu":
        peak, peak_src = None, "no MFU on the CPU"
    machine = {
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
    }
    return machine, peak


def shards_for(args: argparse.Namespace, sz: Sizes, parts: list[str], tmp: Path) -> Path | None:
    """--shards, else (when a part reads shards) the LFW faces sharded under ``tmp``, repeated to fill an epoch."""
    shards = args.shards
    if shards is None and {"loader", "train", "dali"} & set(parts):
        repeat = max(1, math.ceil((sz.loader_images + 4 * sz.loader_batch) / 1814))
        log(f"shards: the LFW faces x{repeat} under {tmp / 'shards'}")
        shards = make_shards(tmp / "shards", args.shared, repeat=repeat, num_classes=sz.train_classes)
    elif shards is not None and "train" in parts:  # the trainer's classifier rows come from the manifest
        log(f"shards: {shards} (the trainer uses its manifest's class count)")
    return shards


def run_parts(args, sz: Sizes, device: torch.device, parts: list[str], R: dict, peak: float | None) -> None:
    """Every part of ``parts`` in order, into ``R`` (an error is recorded and the next part runs); the results
    are written after each."""
    clock, fl = Clock(device), R["flops"]
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmpdir:
        tmp = Path(tmpdir)
        shards = shards_for(args, sz, parts, tmp)
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


def main(argv=None) -> int:
    args, plan, parts = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("no CUDA: nothing measured (--cpu-smoke runs every part at tiny sizes on the CPU)")
        return 0
    device = torch.device("cuda", 0) if cuda and not args.cpu_smoke else torch.device("cpu")
    sz = run_sizes(args, plan)
    if args.cpu_smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))

    machine, peak = machine_section(args, device, sz)
    R: dict = {"machine": machine, "errors": {}}
    log(f"device: {machine['device_name']}; peak bf16: {peak} ({machine['peak_source']}); parts: {', '.join(parts)}")
    # FLOPs: always the published check at full width; the measured widths too
    R["flops"] = flops_section(device, sz.depths)
    run_parts(args, sz, device, parts, R, peak)
    R["machine"]["total_seconds"] = time.perf_counter() - T0
    md = write_results(args.out, R, final=True)
    print("\n" + md)
    if args.out:
        log(f"wrote {args.out / 'bench_gpu.json'} and {args.out / 'bench_gpu.md'}")
    return 1 if R["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
