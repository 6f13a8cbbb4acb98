"""The scan part of bench_gpu: SCAN-iresnet's training step / the plain iresnet's (goal <= 1.3, with a profile of
both), and folded SCAN inference / plain inference (goal <= 1.02, equal parameter counts)."""

from __future__ import annotations

import torch

from benchmarks.gpu.loops import BareLoop, make_batch
from benchmarks.gpu.timing import Clock, Sizes, free, log, profile_steps, round_robin


def part_scan(args, sz: Sizes, device: torch.device, clock: Clock) -> dict:
    from pipeline.models.iresnet import build_iresnet
    from pipeline.models.scan import build_scan_iresnet

    depth, batch = sz.scan_depth, sz.scan_batch
    data = make_batch(batch, 111, device)
    torch.manual_seed(0)
    plain = BareLoop(build_iresnet(depth, width=sz.width, embedding_size=512), sz.train_classes, data, device)
    scan = BareLoop(build_scan_iresnet(depth, width=sz.width, embedding_size=512), sz.train_classes, data, device)
    res = _train_ratio(args, sz, clock, plain, scan)
    res.update(_infer_ratio(sz, device, clock, plain, scan))
    del plain, scan, data
    free()
    return res


def _train_ratio(args, sz: Sizes, clock: Clock, plain: BareLoop, scan: BareLoop) -> dict:
    """The two training steps timed round-robin, their ratio against the goal, and a profile of each."""
    depth, batch = sz.scan_depth, sz.scan_batch
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
    return res


def _infer_ratio(sz: Sizes, device: torch.device, clock: Clock, plain: BareLoop, scan: BareLoop) -> dict:
    """The trained SCAN network folded, its inference timed against the plain network's, parameters compared."""
    scan_net = scan.net.eval()
    folded, n_folded = scan_net.folded()
    plain_net = plain.net.eval()
    folded = folded.to(device).eval()
    res = {
        "folded_convs": n_folded,
        "params_plain": sum(p.numel() for p in plain_net.parameters()),
        "params_folded": sum(p.numel() for p in folded.parameters()),
    }
    x = make_batch(sz.infer_batch, 111, device, seed=1)["image"]
    log(f"scan: inference, folded SCAN vs plain, batch {sz.infer_batch}")
    isz = Sizes(**{**sz.__dict__, "steps": sz.steps * 2, "repeats": max(sz.repeats, 7) if device.type == "cuda" else 1})
    variants = {"plain": (_embed_step(plain_net, x, device), None), "folded": (_embed_step(folded, x, device), None)}
    ti = round_robin(clock, variants, isz, "scan infer")
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
    return res


def _embed_step(net, x: torch.Tensor, device: torch.device):
    """One inference call of ``net`` on ``x``: no grad, bf16 autocast."""

    def run():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            net.embed(x)

    return run
