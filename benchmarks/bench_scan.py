"""SCAN-CNN cost vs the plain IResNet, measured in one process (ratios are what matter).

Training step (forward + backward + SGD step, same batch, same head): plain iresnet-D vs
SCAN-iresnet-D (SAC + LSC + RMO) with the efficient RMO gradient (Appendix E) and with the naive
one, plus SCAN without RMO for attribution. Goal: efficient ≤ 1.3× plain.
Inference (eval, no grad): the folded SCAN network vs the plain one — parameter counts (must be
equal) and latency ratio (goal ≤ 1.02).

Variants run round-robin (one step of each in turn) and the median per variant is reported, so
a slow period of a shared machine hits all of them alike. By default torch runs on ONE thread and
the ratios use that thread's CPU time (``time.thread_time``): on a machine shared with other jobs
the wall clock mostly measures the neighbours, the CPU time of the one compute thread measures the
work. Wall-clock medians are printed beside them.

    .venv/bin/python -m benchmarks.bench_scan                       # iresnet50, width 0.25, batch 32
    .venv/bin/python -m benchmarks.bench_scan --width 1.0 --steps 3 # the full-width network (slow on CPU)
    .venv/bin/python -m benchmarks.bench_scan --host                # host work of an r100 step only (seconds)

Host work (``--host``, and first in every run): a GPU step of a deep SCAN network is bound by what the host does per
kernel launch. On the meta device (shapes only, no arithmetic) a training step's time *is* its host time; with the
launching aten ops it dispatches (:mod:`pipeline.dispatch_count`) this measures, on any CPU, what decides the GPU
step of a host-bound network — full-width iresnet-``--host-depth`` (default 100), batch 2.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

if not __package__:  # run as a file: its imports need the repository root, which `python -m` puts on sys.path
    raise SystemExit(f"run it from the repository root: python -m benchmarks.{Path(__file__).stem}")


import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.common import machine
from pipeline.models.iresnet import build_iresnet
from pipeline.models.scan import build_scan_iresnet, fold


class _Head(torch.nn.Module):
    """A fixed-size cosine classifier + CE, the same for every variant (stands in for the margin head)."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(classes, dim) * 0.01)

    def forward(self, emb, labels):
        logits = F.normalize(emb) @ F.normalize(self.weight).t() * 64.0
        return F.cross_entropy(logits, labels)


def _train_step(model, head, opt, x, y):
    opt.zero_grad(set_to_none=True)
    out = model(x)  # FaceNetwork: the embedding and, for SCAN with RMO, the aux loss 'rmo'
    loss = head(out.embedding, y)
    if "rmo" in out.aux_losses:
        loss = loss + out.aux_losses["rmo"]  # eq. 7
    loss.backward()
    opt.step()


def host_costs(depth: int, steps: int = 7) -> dict[str, tuple[int, float]]:
    """{variant: (launching ops, median host ms)} of one training step on the meta device, plain vs SCAN."""
    from pipeline.dispatch_count import count_ops

    setups = {}
    for name, conv in (("plain", {"kind": "plain"}), ("scan", {"kind": "scan"})):
        with torch.device("meta"):
            model = build_iresnet(depth, embedding_size=512, conv=conv).train()
            head = _Head(512, 1000)
            x, y = torch.empty(2, 3, 112, 112), torch.zeros(2, dtype=torch.long)
        opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9, foreach=True)
        setups[name] = (model, head, opt, x, y)
        _train_step(model, head, opt, x, y)  # warm-up: momentum buffers
    launches = {name: count_ops(lambda s=s: _train_step(*s)).launches for name, s in setups.items()}
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(steps):  # round-robin, as below
        for name, s in setups.items():
            t0 = time.perf_counter()
            _train_step(*s)
            times[name].append(time.perf_counter() - t0)
    return {name: (launches[name], statistics.median(ts) * 1000) for name, ts in times.items()}


def print_host_costs(depth: int) -> None:
    costs = host_costs(depth)
    (pl, pt), (sl, st) = costs["plain"], costs["scan"]
    print(f"\n# host work of one iresnet{depth} training step (meta device: no arithmetic), median of 7")
    print(f"  plain  {pl:6d} launching ops  {pt:8.1f} ms host")
    print(
        f"  SCAN   {sl:6d} launching ops  {st:8.1f} ms host   ratios vs plain: launches {sl / pl:.2f}, host {st / pt:.2f}"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--width", type=float, default=0.25, help="channel multiplier (1.0 = insightface widths)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input-size", type=int, default=112)
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per variant")
    ap.add_argument("--infer-reps", type=int, default=15, help="timed inference batches per variant")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: ratios from the compute thread's CPU time; >1: wall clock)",
    )
    ap.add_argument("--host", action="store_true", help="only the host-work section (launching ops, meta-device time)")
    ap.add_argument("--host-depth", type=int, default=100, help="the host-work section's iresnet depth")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print_host_costs(args.host_depth)
    if args.host:
        return 0
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    clock_name = "thread CPU time" if args.threads == 1 else "wall clock"

    torch.manual_seed(0)
    dims = dict(width=args.width, embedding_size=512, input_size=args.input_size)
    x = torch.rand(args.batch, 3, args.input_size, args.input_size) * 2 - 1
    y = torch.randint(0, 1000, (args.batch,))
    variants = {
        "plain": build_iresnet(args.depth, **dims),
        "scan_efficient_rmo": build_scan_iresnet(args.depth, efficient_rmo=True, **dims),
        "scan_naive_rmo": build_scan_iresnet(args.depth, efficient_rmo=False, **dims),
        "scan_no_rmo": build_scan_iresnet(args.depth, rmo=False, **dims),
    }
    setups = {}
    for name, model in variants.items():
        model.train()
        head = _Head(512, 1000)
        opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
        setups[name] = (model, head, opt)

    print(f"machine: {machine()}, {torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}")
    print(f"model: iresnet{args.depth} width {args.width}, input {args.input_size}px, batch {args.batch}, CPU float32")
    times = {name: [] for name in setups}
    walls = {name: [] for name in setups}
    for rep in tqdm(range(args.steps + 1), desc="train steps (round-robin)"):
        for name, (model, head, opt) in setups.items():
            t0, w0 = clock(), time.perf_counter()
            _train_step(model, head, opt, x, y)
            if rep:  # rep 0 is warm-up
                times[name].append(clock() - t0)
                walls[name].append(time.perf_counter() - w0)
    base = statistics.median(times["plain"])
    print(f"\n# training step (forward + backward + SGD), median of {args.steps}; ratios from {clock_name}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"  {name:20s} {med * 1000:9.1f} ms   ratio vs plain {med / base:5.3f}   "
            f"(wall {statistics.median(walls[name]) * 1000:9.1f} ms)"
        )
    eff = statistics.median(times["scan_efficient_rmo"]) / base
    print(f"  goal: efficient RMO <= 1.30x plain -> {'met' if eff <= 1.3 else 'NOT met'} ({eff:.3f}x)")
    naive_vs_eff = statistics.median(times["scan_naive_rmo"]) / statistics.median(times["scan_efficient_rmo"])
    print(f"  naive / efficient RMO: {naive_vs_eff:.3f}")

    # ------------------------------------------------------------------ inference
    plain = build_iresnet(args.depth, **dims).eval()
    scan = copy.deepcopy(variants["scan_efficient_rmo"]).eval()
    folded = fold(copy.deepcopy(scan)).eval()
    n_plain = sum(p.numel() for p in plain.parameters())
    n_folded = sum(p.numel() for p in folded.parameters())
    n_scan = sum(p.numel() for p in scan.parameters())
    plain.load_state_dict(folded.state_dict(), strict=True)  # same weights: identical work
    with torch.no_grad():
        diff = (folded.embed(x) - scan.embed(x)).abs().max().item()
    inf = {"plain": plain.embedder(), "scan_folded": folded.embedder(), "scan_unfolded": scan.embedder()}
    itimes = {name: [] for name in inf}
    iwalls = {name: [] for name in inf}
    with torch.no_grad():
        for rep in tqdm(range(args.infer_reps + 2), desc="inference (round-robin)"):
            for name, model in inf.items():
                t0, w0 = clock(), time.perf_counter()
                model(x)
                if rep >= 2:
                    itimes[name].append(clock() - t0)
                    iwalls[name].append(time.perf_counter() - w0)
    ibase = statistics.median(itimes["plain"])
    print(f"\n# inference (eval, no grad, batch {args.batch}), median of {args.infer_reps}; ratios from {clock_name}")
    print(
        f"  parameters: plain {n_plain:,}  folded SCAN {n_folded:,}  ({'equal' if n_plain == n_folded else 'DIFFERENT'}); "
        f"unfolded SCAN (training form) {n_scan:,} (+{(n_scan - n_plain) / n_plain:.1%})"
    )
    for name, ts in itimes.items():
        med = statistics.median(ts)
        print(
            f"  {name:20s} {med * 1000:9.1f} ms   ratio vs plain {med / ibase:5.3f}   "
            f"(wall {statistics.median(iwalls[name]) * 1000:9.1f} ms)"
        )
    ratio = statistics.median(itimes["scan_folded"]) / ibase
    print(f"  goal: folded <= 1.02x plain -> {'met' if ratio <= 1.02 else 'NOT met'} ({ratio:.3f}x)")
    print(f"  max |folded - unfolded| output (float32): {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
