"""Benchmark: memory per rank and step time of the sharded (partial-FC) classifier vs a full one.

For each number of classes C, it runs in fresh processes (so that peak-memory figures do not mix):
  * full   — one process, an unsharded (C, D) margin classifier: F.linear on normalised rows,
             CombinedMargin, F.cross_entropy, SGD with momentum (the reference);
  * shard  — W gloo processes (nccl on GPUs), ShardedMarginClassifier, same optimizer.
Each rank feeds a random (batch, D) embedding that requires grad (standing in for the backbone),
and a step is forward + backward + SGD step. Per rank it reports the classifier state
(parameter + gradient + optimizer buffers, bytes of the tensors actually held) and the peak
memory delta: on CPU VmHWM (peak RSS) from /proc/self/status minus the RSS before the classifier
was built, on GPU torch.cuda.max_memory_allocated. Ratios are against the full run; the goal is
per-rank classifier memory ≈ 1/W of the full one.

    python -m benchmarks.bench_sharded_classifier                    # 100k and 1M classes, W = 1, 2, 4
    python -m benchmarks.bench_sharded_classifier --classes 100000 --worlds 1 2 --steps 5
    python -m benchmarks.bench_sharded_classifier --sample-rate 0.1  # partial FC with sampling

1M × 512 fp32 is 2 GB per copy: the full run holds weight, gradient and momentum (6 GB) plus
temporaries; have ~14 GB free RAM for the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file: its imports need the repository root, which `python -m` puts on sys.path
    raise SystemExit(f"run it from the repository root: python -m benchmarks.{Path(__file__).stem}")


import torch

from benchmarks.common import machine

MB = 1024**2


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _state_bytes(params, opt) -> int:
    total = 0
    for p in params:
        total += p.numel() * p.element_size()
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
        for v in opt.state.get(p, {}).values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def worker(rank: int, world: int, port: int, mode: str, args: argparse.Namespace, out_dir: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from pipeline.losses.margin import CombinedMargin
    from pipeline.losses.sharded_classifier import ShardedMarginClassifier

    torch.set_num_threads(max(1, args.threads // world))
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", rank % max(1, torch.cuda.device_count())) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if mode == "shard":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    margin = CombinedMargin(64.0, 1.0, 0.5, 0.0)

    def build(num_classes):
        if mode == "shard":
            clf = ShardedMarginClassifier(num_classes, args.dim, margin, sample_rate=args.sample_rate).to(device)
            return [clf.weight], clf
        weight = torch.nn.Parameter(torch.normal(0.0, 0.01, (num_classes, args.dim), device=device))

        def full_loss(x, y):
            return F.cross_entropy(margin(F.linear(F.normalize(x), F.normalize(weight)), y), y)

        return [weight], full_loss

    def train_step(loss_fn, params, opt, num_classes):
        x = torch.randn(args.batch, args.dim, device=device, requires_grad=True)
        y = torch.randint(0, num_classes, (args.batch,), device=device)
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        state = _state_bytes(params, opt)
        opt.zero_grad(set_to_none=True)
        return loss.item(), state

    # one step on a tiny classifier first, so that lazily loaded kernels/libraries and the
    # communication buffers are not counted as classifier memory
    tiny_params, tiny_fn = build(8 * world)
    train_step(tiny_fn, tiny_params, torch.optim.SGD(tiny_params, lr=0.1, momentum=0.9), 8 * world)
    del tiny_params, tiny_fn
    try:  # reset the peak-RSS mark to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    baseline_kb = _rss_kb("VmRSS")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline_gpu = torch.cuda.memory_allocated()

    params, loss_fn = build(args.num_classes)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    times, state = [], 0
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        if mode == "shard":
            dist.barrier()
        t0 = time.perf_counter()
        loss, st = train_step(loss_fn, params, opt, args.num_classes)
        state = max(state, st)
        if cuda:
            torch.cuda.synchronize()
        if mode == "shard":
            dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - baseline_gpu
    else:
        peak = (_rss_kb("VmHWM") - baseline_kb) * 1024
    result = dict(
        rank=rank,
        state=state,
        peak=peak,
        step=sum(times) / len(times),
        loss=loss,
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
    )
    Path(out_dir, f"{mode}_{world}_{rank}.json").write_text(json.dumps(result))
    if mode == "shard":
        dist.destroy_process_group()


def run(mode: str, world: int, args, out_dir: str) -> dict:
    import torch.multiprocessing as mp

    from pipeline.distributed import free_port

    mp.spawn(worker, args=(world, free_port(), mode, args, out_dir), nprocs=world, join=True)
    ranks = [json.loads(Path(out_dir, f"{mode}_{world}_{r}.json").read_text()) for r in range(world)]
    return dict(
        state=max(r["state"] for r in ranks),
        peak=max(r["peak"] for r in ranks),
        step=max(r["step"] for r in ranks),
        device=ranks[0]["device"],
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000], help="numbers of classes C")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="numbers of processes W")
    p.add_argument("--dim", type=int, default=512, help="embedding size D")
    p.add_argument("--batch", type=int, default=64, help="batch per rank (the full run uses one such batch)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--sample-rate", type=float, default=1.0, help="partial-FC negative sampling rate")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads shared by the W processes")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or min(args.worlds) < 1:
        print("error: --steps, --batch and --worlds must be >= 1", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2

    from tqdm import tqdm

    jobs = [(c, "full", 1) for c in args.classes] + [(c, "shard", w) for c in args.classes for w in args.worlds]
    jobs.sort(key=lambda j: (j[0], j[1] != "full", j[2]))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for c, mode, world in tqdm(jobs, desc="runs", unit="run"):
            args.num_classes = c
            results[(c, mode, world)] = run(mode, world, args, tmp)

    dev = next(iter(results.values()))["device"]
    lines = [
        f"sharded classifier benchmark: D={args.dim}, batch {args.batch}/rank, sample_rate={args.sample_rate}, "
        f"fp32, SGD momentum, {args.warmup} warm-up + {args.steps} timed steps",
        f"machine: {machine()}, device={dev}, {args.threads} torch threads shared by the W processes",
        "state = parameter + gradient + optimizer bytes per rank; peak = "
        + ("torch.cuda.max_memory_allocated" if dev != "cpu" else "peak RSS (VmHWM) minus RSS before the classifier")
        + " per rank (max over ranks); ratios vs the full classifier",
        "",
        f"{'classes':>9} {'run':>9} {'state MB':>9} {'ratio':>6} {'1/W':>5} {'peak MB':>9} {'ratio':>6} "
        f"{'step s':>7} {'samples/s':>10} {'vs full':>7}",
    ]
    for c in args.classes:
        full = results[(c, "full", 1)]
        full_sps = args.batch / full["step"]
        for mode, world in [("full", 1)] + [("shard", w) for w in args.worlds]:
            r = results[(c, mode, world)]
            sps = args.batch * world / r["step"]
            name = "full" if mode == "full" else f"W={world}"
            lines.append(
                f"{c:>9} {name:>9} {r['state'] / MB:>9.1f} {r['state'] / full['state']:>6.3f} "
                f"{1 / world:>5.3f} {r['peak'] / MB:>9.1f} {r['peak'] / full['peak']:>6.3f} "
                f"{r['step']:>7.3f} {sps:>10.1f} {sps / full_sps:>7.2f}"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
