"""Scale on paper: per-GPU memory, FLOPs and communication of WebFace42M × iresnet100 training (BENCHMARKS.md).

Prints, for W GPUs and partial-FC sample rates r, the per-GPU terms of one training step (batch 128 per GPU,
embedding 512, the ArcFace margin in ``ShardedMarginClassifier``, the backbone under DeepSpeed ZeRO-1 bf16):

* class-centre shard: rows C/W, weight + momentum + (dense) gradient, fp32;
* logits: global batch N = 128·W × sampled rows S per shard, fp32 (the trainer casts the embeddings to fp32
  and the classifier has no autocast), and the classifier's peak from the buffers live at its high-water
  marks (``benchmarks.gpu.classifier.predicted_classifier_peak``: the softmax forward, ``F.normalize``'s backward, the
  sampled rows' index backward);
* collectives per step: the all-gather of embeddings (fp32) and labels (int64), the all-reduce of the
  gathered embeddings' gradient and of the softmax statistics; the backbone's gradient reduction and
  parameter all-gather (bf16);
* backbone state and its collectives for the engine the trainer actually runs (``pipeline/train/engine.py``): the
  default, bf16 at ZeRO stage 0 = torch autocast over fp32 weights — fp32 parameters, gradients and momentum
  (12Ψ B), one fp32 gradient all-reduce after backward (DeepSpeed's stage 0 reduces at the boundary, not
  overlapped); and ``zero_stage: 1`` = DeepSpeed's BF16_Optimizer — bf16 parameters and gradients, the fp32
  accumulated gradient (whole), fp32 master weights and momentum partitioned (2Ψ + 2Ψ + 4Ψ + 8Ψ/W B), an fp32
  gradient all-reduce and a bf16 parameter all-gather;
  activations at batch 128 in bf16 = the bytes of the tensors autograd saves, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` on the meta device (no compute; identical to a real CPU
  forward on a small network, checked by ``--verify-meta``);
* FLOPs per step (FlopCounterMode, 2 per multiply-add): backbone 3 × forward, classifier 6·N·S·D.

``--check FILE...`` compares the per-rank peak memory printed by bench_sharded_classifier.py (gloo ranks on
the CPU) with the same buffer count, and its step times with a two-term model t = a·N·S + c·C/W calibrated on
the W = 1 rows, printing measured / predicted.

``--trace``: the live-tensor peak of one step (``benchmarks.gpu.classifier.LiveTensorPeak``) vs the buffer count, in one CPU
process; ``--comm``: the bytes through ``dist.all_gather`` / ``dist.all_reduce`` in a 2-rank gloo step vs the
formulas; ``--verify-meta``: the meta-device activation count equals a real CPU forward.

    .venv/bin/python -m benchmarks.scale_on_paper                       # the tables (~20 s)
    .venv/bin/python -m benchmarks.scale_on_paper --trace --comm --verify-meta
    .venv/bin/python -m benchmarks.scale_on_paper --check benchmarks/results/scale_classifier_*.txt
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

if not __package__:  # run as a file: its imports need the repository root, which `python -m` puts on sys.path
    raise SystemExit(f"run it from the repository root: python -m benchmarks.{Path(__file__).stem}")


import torch

from benchmarks.gpu.classifier import expected_positive_rows, predicted_classifier_peak

MiB, GB = 1024**2, 1e9
WEBFACE42M_CLASSES = 2_059_906
WEBFACE42M_IMAGES = 42_474_557  # insightface arcface_torch configs/wf42m_pfc02_r100.py (num_classes 2059906)


def saved_activation_bytes(
    depth: int, batch: int, dtype=torch.bfloat16, device: str = "meta", width: float = 1.0
) -> int:
    """Bytes of the distinct storages autograd saves in one training forward of iresnet-``depth``."""
    from pipeline.models.iresnet import build_iresnet

    with torch.device(device):
        torch.manual_seed(0)
        net = build_iresnet(depth, width=width).to(dtype).train()
        x = torch.randn(batch, 3, 112, 112, dtype=dtype)
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st._cdata] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    return sum(seen.values())


def backbone_numbers(depth: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models.iresnet import build_iresnet

    with torch.device("meta"):
        net = build_iresnet(depth).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net.embed(torch.empty(1, 3, 112, 112, device="meta"))
    params = sum(p.numel() for p in net.parameters())
    a2 = saved_activation_bytes(depth, 2)
    a128 = saved_activation_bytes(depth, 128)
    per_image = (a128 - a2) / 126
    return {
        "params": params,
        "fwd_flop": fc.get_total_flops(),
        "act128": a128,
        "act_per_image": per_image,
        "act_fixed": a2 - 2 * per_image,  # the bf16 weights autograd also saves
    }


_VIEWS = {
    "view", "_unsafe_view", "t", "transpose", "expand", "as_strided", "unsqueeze", "squeeze", "select", "slice",
    "detach", "alias", "permute", "reshape", "lift_fresh",
}  # fmt: skip


def _step_traffic(classes: int, batch: int, rate: float, dim: int = 512) -> tuple[int, int]:
    """Bytes every op of one classifier step reads and writes (each operand streamed once: no fusion, no
    cache reuse, what eager PyTorch does to tensors larger than the GPU's L2), and the sampled rows S."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from pipeline.losses.margin import CombinedMargin
    from pipeline.losses.sharded_classifier import ShardedMarginClassifier

    def nb(t):
        return t.numel() * t.element_size()

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func._schema.name.split("::")[1]
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            if name in _VIEWS or name in ("empty", "new_empty", "empty_like"):
                b = 0
            elif name == "index":  # gather: the gathered elements, read and written
                b = 2 * sum(nb(t) for t in outs)
            elif name in ("index_put_", "index_put"):  # the values scattered; out-of-place also copies self
                b = 2 * nb(args[2]) + (2 * nb(args[0]) if name == "index_put" else 0)
            elif name in ("new_zeros", "zeros_like", "zeros"):
                b = sum(nb(t) for t in outs)
            else:
                ins = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
                b = sum(nb(t) for t in ins) + sum(nb(t) for t in outs)
            Count.total += b
            return out

    torch.manual_seed(0)
    clf = ShardedMarginClassifier(classes, dim, CombinedMargin(64.0, 1.0, 0.5, 0.0), sample_rate=rate)
    opt = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    emb, y = torch.randn(batch, dim, requires_grad=True), torch.randint(0, classes, (batch,))

    def step():
        clf(emb, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        emb.grad = None

    step()  # momentum exists from the second step on
    with Count():
        step()
    return Count.total, clf.num_sample


def traffic_passes(rate: float, classes: int = 20_000, dim: int = 512) -> tuple[float, float]:
    """(passes over the N×S fp32 logits, passes over the C×D fp32 shard) of one step, from two counted runs
    that differ only in the batch (the C×D terms cancel)."""
    (b1, s1), (b2, s2) = _step_traffic(classes, 64, rate, dim), _step_traffic(classes, 1024, rate, dim)
    alpha = (b2 - b1) / ((1024 * s2 - 64 * s1) * 4)
    beta = (b1 - alpha * 64 * s1 * 4) / (classes * dim * 4)
    return alpha, beta


# H100 SXM5 (glennklockwood.com/garden/processors/h100; NVIDIA H100 datasheet): dense TFLOP/s, HBM3 TB/s;
# links: NVLink 4 900 GB/s per GPU both directions together (450 each way) inside a node; between nodes a
# DGX H100's 8 × 400 Gb/s ConnectX-7 = 50 GB/s per GPU each way.
H100 = {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9, "hbm_tb_s": 3.35, "nvlink_gb_s": 450.0, "ib_gb_s": 50.0}


def backbone_state_bytes(psi: int, world: int) -> dict[str, float]:
    """Per-GPU bytes of the backbone's optimizer state: stage 0 autocast (fp32 weights, gradients, momentum) and
    ZeRO-1 BF16_Optimizer (bf16 weights + gradients, the whole fp32 accumulated gradient, fp32 master + momentum
    partitioned over ``world``)."""
    return {"stage0": 12.0 * psi, "zero1": 2.0 * psi + 2.0 * psi + 4.0 * psi + 8.0 * psi / world}


def backbone_comm_bytes(psi: int) -> dict[str, tuple[float, float]]:
    """(all-reduce payload, all-gather payload) per step: stage 0 all-reduces the fp32 gradient; BF16_Optimizer
    all-reduces the fp32 gradient and all-gathers the updated bf16 parameters."""
    return {"stage0": (4.0 * psi, 0.0), "zero1": (4.0 * psi, 2.0 * psi)}


def comm_seconds(all_reduce: float, all_gather: float, world: int, link_gb_s: float) -> float:
    """Ring collectives at ``link_gb_s`` each way: all-reduce moves 2(W−1)/W of its payload, all-gather (W−1)/W."""
    ring = (world - 1) / world
    return (2 * ring * all_reduce + ring * all_gather) / (link_gb_s * 1e9)


def link_gb_s(world: int) -> float:
    """Bandwidth each way per GPU: NVLink inside one 8-GPU node, InfiniBand beyond."""
    return H100["nvlink_gb_s"] if world <= 8 else H100["ib_gb_s"]


def classifier_comm_bytes(n: int, dim: int, world: int) -> tuple[int, int]:
    """(all-gather, all-reduce) payloads of the classifier per step: embeddings fp32 + labels int64 + sizes; the
    gathered-embedding gradient + (2 maxes, 3 sums) per sample."""
    return n * dim * 4 + n * 8 + world * 8, n * dim * 4 + 5 * n * 4


def classifier_cost(n: int, s: int, rows: int, dim: int, passes: tuple[float, float]) -> tuple[float, float]:
    """(matmul FLOP, bytes streamed) of one classifier step: 6·N·S·D and the counted passes over N×S and C/W×D."""
    a, b = passes
    return 6 * n * s * dim, a * n * s * 4 + b * rows * dim * 4


def classifier_seconds(flop: float, traffic: float, matmul_tflops: float) -> float:
    """Lower bound: the matmul at peak plus the traffic at peak HBM bandwidth, not overlapped."""
    return flop / (matmul_tflops * 1e12) + traffic / (H100["hbm_tb_s"] * 1e12)


def epoch_table(
    worlds,
    batch: int,
    depth: int,
    rate: float,
    mfus: dict[str, float],
    bb: dict,
    passes: tuple[float, float],
    dim: int = 512,
    classes: int = WEBFACE42M_CLASSES,
) -> str:
    """WebFace42M epoch time per engine and MFU: backbone compute at the MFU + the classifier (TF32 logits, lower
    bound) + the collectives, none overlapped (stage 0 and BF16_Optimizer both reduce after backward). ``bb``:
    :func:`backbone_numbers`; ``passes``: :func:`traffic_passes` at ``rate``."""
    psi = bb["params"]
    out = [
        f"WebFace42M epoch ({WEBFACE42M_IMAGES:,} images), iresnet{depth}, batch {batch}/GPU, r = {rate}, H100 SXM",
        "",
        "| W | MFU | backbone ms | classifier ms (TF32) | comm ms stage 0 / ZeRO-1 | step ms stage 0 | steps/epoch | "
        "epoch h stage 0 | epoch h ZeRO-1 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in worlds:
        rows, n = math.ceil(classes / w), batch * w
        s_rows = predicted_classifier_peak(rows, dim, n, rate, world=w)["num_sample"]
        cls = classifier_seconds(*classifier_cost(n, s_rows, rows, dim, passes), H100["tf32"])
        gather, reduce_cls = classifier_comm_bytes(n, dim, w)
        comm = {
            k: comm_seconds(reduce_cls + ar, gather + ag, w, link_gb_s(w))
            for k, (ar, ag) in backbone_comm_bytes(psi).items()
        }
        steps = math.ceil(WEBFACE42M_IMAGES / n)
        for label, mfu in mfus.items():
            backbone = 3 * bb["fwd_flop"] * batch / (H100["bf16"] * 1e12 * mfu)
            step = {k: backbone + cls + c for k, c in comm.items()}
            out.append(
                f"| {w} | {label} | {backbone * 1e3:.1f} | {cls * 1e3:.1f} | {comm['stage0'] * 1e3:.1f} / "
                f"{comm['zero1'] * 1e3:.1f} | {step['stage0'] * 1e3:.1f} | {steps:,} | "
                f"{steps * step['stage0'] / 3600:.2f} | {steps * step['zero1'] / 3600:.2f} |"
            )
    return "\n".join(out)


def table(
    worlds, rates, batch: int, depth: int, bb: dict, passes: dict, dim: int = 512, classes: int = WEBFACE42M_CLASSES
) -> str:
    """The memory and per-step tables. ``bb``: :func:`backbone_numbers`; ``passes``: rate → :func:`traffic_passes`."""
    psi = bb["params"]
    act = bb["act_fixed"] + batch * bb["act_per_image"]
    out = [
        f"WebFace42M: {classes:,} classes, {WEBFACE42M_IMAGES / 1e6:.1f} M images; iresnet{depth} "
        f"({psi / 1e6:.2f} M parameters, {bb['fwd_flop'] / 1e9:.2f} GFLOP forward/image), embedding {dim}, "
        f"batch {batch}/GPU",
        f"backbone activations (saved tensors, bf16, meta-device count): {bb['act_per_image'] / MiB:.1f} MiB/image "
        f"+ {bb['act_fixed'] / MiB:.0f} MiB (bf16 weight copies) -> batch {batch}: {act / GB:.2f} GB",
        "classifier traffic per step (counted op by op on the CPU, each operand streamed once): "
        + "; ".join(
            f"r={r}: {a:.1f} passes over N×S fp32 + {b:.1f} over C/W×D fp32" for r, (a, b) in sorted(passes.items())
        ),
        "",
        "Memory per GPU (GB = 1e9 bytes)",
        "",
        "| W | r | rows C/W | S | weight+momentum | + gradient | one N×S fp32 buffer | classifier peak (at) | "
        "backbone state stage 0 / ZeRO-1 | activations | sum (stage 0) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows_t = []
    for w in worlds:
        rows = math.ceil(classes / w)
        n = batch * w
        states = backbone_state_bytes(psi, w)
        state_bb = states["stage0"]  # the default engine (pipeline/train/engine.py)
        gather, reduce_cls = classifier_comm_bytes(n, dim, w)
        (ar0, _), (ar1, ag1) = backbone_comm_bytes(psi)["stage0"], backbone_comm_bytes(psi)["zero1"]
        comm0 = comm_seconds(reduce_cls + ar0, gather, w, link_gb_s(w))
        comm1 = comm_seconds(reduce_cls + ar1, gather + ag1, w, link_gb_s(w))
        for r in rates:
            p = predicted_classifier_peak(rows, dim, n, r, world=w)
            s = p["num_sample"]
            wm = 2 * rows * dim * 4
            out.append(
                f"| {w} | {r} | {rows:,} | {s:,} | {wm / GB:.3f} | {(wm + rows * dim * 4) / GB:.3f} | "
                f"{n * s * 4 / GB:.3f} | {p['peak_bytes'] / GB:.2f} ({p['peak_at']}) | {state_bb / GB:.3f} / "
                f"{states['zero1'] / GB:.3f} | "
                f"{act / GB:.2f} | {(state_bb + act + p['peak_bytes']) / GB:.2f} |"
            )
            mm, traffic = classifier_cost(n, s, rows, dim, passes[r])
            rows_t.append(
                f"| {w} | {r} | {gather / 1e6:.2f} | {reduce_cls / 1e6:.2f} | {ar0 / 1e6:.0f} / {ar1 / 1e6:.0f} + "
                f"{ag1 / 1e6:.0f} | {comm0 * 1e3:.1f} / {comm1 * 1e3:.1f} | {mm / 1e12:.3f} | {traffic / GB:.1f} | "
                f"{classifier_seconds(mm, traffic, H100['fp32']) * 1e3:.1f} | "
                f"{classifier_seconds(mm, traffic, H100['tf32']) * 1e3:.1f} | "
                f"{3 * bb['fwd_flop'] * batch / 1e12:.2f} | {3 * bb['fwd_flop'] * batch / (H100['bf16'] * 1e12) * 1e3:.1f} |"
            )
    out += [
        "",
        "Per GPU and step on an H100 SXM (lower bounds: peak FLOP/s, peak HBM bandwidth, link bandwidth each way; "
        "W = 8 over NVLink, W = 64 over InfiniBand)",
        "",
        "| W | r | all-gather MB (emb fp32 + labels) | all-reduce MB (cls) | backbone MB: stage 0 fp32 all-reduce / "
        "ZeRO-1 fp32 all-reduce + bf16 all-gather | comm ms stage 0 / ZeRO-1 | classifier TFLOP | classifier traffic GB | classifier ms (fp32 mm) | classifier ms (TF32 mm) | "
        "backbone TFLOP | backbone ms at peak |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows_t,
        "",
        f"expected distinct positives per shard (uniform labels): W=8: "
        f"{expected_positive_rows(math.ceil(classes / 8), batch * 8, 8):.0f}, W=64: "
        f"{expected_positive_rows(math.ceil(classes / 64), batch * 64, 64):.0f} (S = max(ceil(r·C/W), positives))",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------- check against the CPU runs

_HEAD = re.compile(r"batch (\d+)/rank, sample_rate=([0-9.]+)")
_ROW = re.compile(r"^\s*(\d+)\s+(full|W=\d+)\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+[\d.]+\s+([\d.]+)")


def parse(path: Path) -> list[dict]:
    text = path.read_text()
    m = _HEAD.search(text)
    if not m:
        raise SystemExit(f"{path}: not a bench_sharded_classifier.py output (no 'batch N/rank, sample_rate=' line)")
    batch, rate = int(m.group(1)), float(m.group(2))
    rows = []
    for line in text.splitlines():
        r = _ROW.match(line)
        if r and r.group(2) != "full":
            rows.append(
                dict(
                    file=path.name,
                    classes=int(r.group(1)),
                    world=int(r.group(2)[2:]),
                    batch=batch,
                    rate=rate,
                    state_mib=float(r.group(3)),
                    peak_mib=float(r.group(4)),
                    step_s=float(r.group(5)),
                )
            )
    return rows


def check(paths: list[Path], dim: int, cores: int) -> str:
    rows = [r for p in paths for r in parse(p)]
    out = [
        "| file | C | W | batch/rank | r | state MiB meas. / pred. | peak MiB meas. | peak MiB pred. (at) | "
        "peak meas./pred. | step s meas. | step s pred. | step meas./pred. |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    # time model per rank: t = (a·N·S + c_r·C/W) × max(1, W/cores); a and c_1 from the two W=1, r=1 rows
    # with different batches, c_r (r < 1: the dense index backward) from the W=1 row at that rate
    w1 = {(r["classes"], r["batch"], r["rate"]): r for r in rows if r["world"] == 1}
    a = c = None
    full = sorted((k, v) for k, v in w1.items() if k[2] == 1.0)
    if len(full) >= 2:
        (k1, r1), (k2, r2) = full[0], full[-1]
        x1, x2 = k1[1] * k1[0], k2[1] * k2[0]  # N·S at W=1, r=1: batch × C
        if x1 != x2 and k1[0] == k2[0]:
            a = (r2["step_s"] - r1["step_s"]) / (x2 - x1)
            c = (r1["step_s"] - a * x1) / k1[0]
    c_rate = {}
    if a is not None:
        for (C, b, rate), r in w1.items():
            s = predicted_classifier_peak(C, dim, b, rate)["num_sample"]
            c_rate.setdefault(rate, (r["step_s"] - a * b * s) / C) if rate < 1.0 else c_rate.setdefault(rate, c)
    for r in sorted(rows, key=lambda r: (r["rate"], r["batch"] * r["world"], r["world"], r["batch"])):
        local = math.ceil(r["classes"] / r["world"])
        n = r["batch"] * r["world"]
        p = predicted_classifier_peak(local, dim, n, r["rate"], world=r["world"])
        st_pred = p["state_bytes"] / MiB
        t_pred = None
        if a is not None and r["rate"] in c_rate:
            t_pred = (a * n * p["num_sample"] + c_rate[r["rate"]] * local) * max(1.0, r["world"] / cores)
        out.append(
            f"| {r['file']} | {r['classes']:,} | {r['world']} | {r['batch']} | {r['rate']} | "
            f"{r['state_mib']:.1f} / {st_pred:.1f} | {r['peak_mib']:.1f} | {p['peak_bytes'] / MiB:.1f} ({p['peak_at']}) | "
            f"{r['peak_mib'] / (p['peak_bytes'] / MiB):.3f} | {r['step_s']:.2f} | "
            + (f"{t_pred:.2f} | {r['step_s'] / t_pred:.2f} |" if t_pred else "— | — |")
        )
    if a is not None:
        out += [
            "",
            f"time model: a = {a * 1e9:.3f} s per 1e9 logits (N·S), c(r=1) = {c * 1e6:.3f} s per 1e6 rows; "
            + ", ".join(f"c(r={k}) = {v * 1e6:.3f} s per 1e6 rows" for k, v in sorted(c_rate.items()) if k < 1.0)
            + f"; W ranks on {cores} cores: × max(1, W/{cores})",
        ]
    return "\n".join(out)


def trace_check(configs, dim: int = 512) -> str:
    """Live-tensor peak of one step (benchmarks.gpu.classifier.LiveTensorPeak) vs the buffer count, one process."""
    from benchmarks.gpu.classifier import LiveTensorPeak
    from pipeline.losses.margin import CombinedMargin
    from pipeline.losses.sharded_classifier import ShardedMarginClassifier

    out = [
        "| C | N | r | S used (pred.) | live-tensor peak MiB | predicted MiB (at) | measured / predicted |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for classes, batch, rate in configs:
        torch.manual_seed(0)
        clf = ShardedMarginClassifier(classes, dim, CombinedMargin(64.0, 1.0, 0.5, 0.0), sample_rate=rate)
        opt = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        emb, y = torch.randn(batch, dim, requires_grad=True), torch.randint(0, classes, (batch,))

        def step(clf=clf, opt=opt, emb=emb, y=y):
            clf(emb, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            emb.grad = None

        step()
        tracer = LiveTensorPeak()
        tracer.track(clf.weight, emb, y, *(v for st in opt.state.values() for v in st.values()))
        peak = tracer.run(step)
        p = predicted_classifier_peak(classes, dim, batch, rate)
        used = clf.num_local if clf.last_sampled_index is None else clf.last_sampled_index.numel()
        out.append(
            f"| {classes:,} | {batch} | {rate} | {used:,} ({p['num_sample']:,}) | {peak / MiB:.1f} | "
            f"{p['peak_bytes'] / MiB:.1f} ({p['peak_at']}) | {peak / p['peak_bytes']:.3f} |"
        )
    return "\n".join(out)


def _comm_worker(rank: int, world: int, port: int, classes: int, batch: int, out_dir: str) -> None:
    import json
    import os

    import torch.distributed as dist

    from pipeline.losses.margin import CombinedMargin
    from pipeline.losses.sharded_classifier import ShardedMarginClassifier

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counts = {"all_gather": 0, "all_reduce": 0}
    real_gather, real_reduce = dist.all_gather, dist.all_reduce

    def all_gather(tensors, t, *a, **k):  # bytes this rank receives (the whole gathered list)
        counts["all_gather"] += sum(x.numel() * x.element_size() for x in tensors)
        return real_gather(tensors, t, *a, **k)

    def all_reduce(t, *a, **k):  # the payload reduced
        counts["all_reduce"] += t.numel() * t.element_size()
        return real_reduce(t, *a, **k)

    dist.all_gather, dist.all_reduce = all_gather, all_reduce
    torch.manual_seed(rank)
    clf = ShardedMarginClassifier(classes, 512, CombinedMargin(64.0, 1.0, 0.5, 0.0))
    emb, y = torch.randn(batch, 512, requires_grad=True), torch.randint(0, classes, (batch,))
    clf(emb, y).backward()
    Path(out_dir, f"{rank}.json").write_text(json.dumps(counts))
    dist.destroy_process_group()


def comm_check(world: int = 2, classes: int = 1000, batch: int = 64) -> str:
    """Bytes through dist.all_gather / dist.all_reduce in one classifier step of ``world`` gloo ranks vs the
    formulas of the table (all-gather: N·D fp32 + N int64 + W int64; all-reduce: N·D fp32 + 5·N fp32)."""
    import json
    import tempfile

    import torch.multiprocessing as mp

    from pipeline.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_comm_worker, args=(world, free_port(), classes, batch, tmp), nprocs=world, join=True)
        got = json.loads(Path(tmp, "0.json").read_text())
    n = batch * world
    pred = {"all_gather": n * 512 * 4 + n * 8 + world * 8, "all_reduce": n * 512 * 4 + 5 * n * 4}
    return "\n".join(
        [f"| collective (W={world}, N={n}, D=512) | measured bytes | predicted bytes | ratio |", "|---|---:|---:|---:|"]
        + [f"| {k} | {got[k]:,} | {pred[k]:,} | {got[k] / pred[k]:.3f} |" for k in pred]
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--worlds", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.2, 0.1])
    ap.add_argument("--batch", type=int, default=128, help="per GPU")
    ap.add_argument("--depth", type=int, default=100)
    ap.add_argument(
        "--measured-mfu",
        type=float,
        default=0.085,
        help="the r100 b128 bf16 MFU measured on an H100 (BENCHMARKS.md, 2026-11-27: 8.5 %%) for the epoch table",
    )
    ap.add_argument("--epoch-rate", type=float, default=0.2, help="partial-FC rate of the epoch table (wf42m_pfc02)")
    ap.add_argument("--check", type=Path, nargs="*", help="bench_sharded_classifier.py outputs to compare")
    ap.add_argument("--cores", type=int, default=2, help="CPU cores the --check runs shared (time model)")
    ap.add_argument("--verify-meta", action="store_true", help="meta-device activation count == a real CPU forward")
    ap.add_argument("--trace", action="store_true", help="live-tensor peak of one step vs the buffer count (CPU)")
    ap.add_argument("--comm", action="store_true", help="collective bytes of a 2-rank gloo step vs the formulas")
    args = ap.parse_args(argv)
    if args.verify_meta:
        real = saved_activation_bytes(18, 4, device="cpu", width=0.25)
        meta = saved_activation_bytes(18, 4, width=0.25)
        print(f"iresnet18 x0.25 batch 4 bf16 saved bytes: CPU {real / MiB:.2f} MiB, meta {meta / MiB:.2f} MiB")
    if args.trace:
        cfgs = [(20_000, 64, 1.0), (20_000, 4096, 1.0), (20_000, 64, 0.1), (20_000, 8192, 0.1), (100_000, 128, 0.1)]
        print(trace_check(cfgs))
    if args.comm:
        print(comm_check())
    if args.trace or args.comm or args.verify_meta:
        return 0
    if args.check:
        print(check(args.check, 512, args.cores))
        return 0
    bb = backbone_numbers(args.depth)  # once: the meta-device activation count takes seconds
    passes = {r: traffic_passes(r) for r in sorted(set(args.rates) | {1.0, args.epoch_rate})}
    table_passes = {r: passes[r] for r in sorted(set(args.rates) | {1.0})}
    print(table(args.worlds, args.rates, args.batch, args.depth, bb, table_passes))
    print()
    mfus = {f"measured {args.measured_mfu:.1%}": args.measured_mfu, "20 %": 0.20}
    print(epoch_table(args.worlds, args.batch, args.depth, args.epoch_rate, mfus, bb, passes[args.epoch_rate]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
