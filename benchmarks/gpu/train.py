"""The training parts of bench_gpu: ``train`` (the real Trainer's step vs the bare PyTorch loop, images/s and MFU,
one profile) and ``levers`` (the bare loop with each lever, and all of them, vs the default loop)."""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import torch

from benchmarks.gpu.flops import count_flops
from benchmarks.gpu.loops import BareLoop, build_trainer, make_batch
from benchmarks.gpu.timing import Clock, Sizes, free, log, profile_steps, round_robin

# --------------------------------------------------------------------------- train


def part_train(
    args, sz: Sizes, device: torch.device, clock: Clock, shards: Path, tmp: Path, peak: float | None, fl: dict
) -> dict:
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
            variants = _bare_and_trainer(trainer, depth, batch, classes, sz, device)
            t = round_robin(clock, variants, sz, label)
            if not res.get("profile"):  # the first network and batch only: the why, not another timing
                res["profile"] = {"label": label, **profile_steps(variants, label, args.out)}
            row = {"depth": depth, "batch": batch, "classes": classes}
            row.update(_throughput(t, batch, flops[depth]["fwd_flop"], peak))
            row["trainer_over_bare"] = (row["trainer"]["img_s"] / row["bare"]["img_s"]) if trainer else None
            row["trainer_note"] = why
            res["runs"].append(row)
            _log_train_row(label, row, why)
            del trainer, variants
            free()
    return res


def _bare_and_trainer(trainer, depth: int, batch: int, classes: int, sz: Sizes, device: torch.device) -> dict:
    """The round-robin variants: the bare loop's step and (when it built) the trainer's, on one in-memory batch."""
    from pipeline.models.iresnet import build_iresnet

    data = make_batch(batch, min(classes, 111), device)  # labels of real faces (< 111)
    torch.manual_seed(0)
    bare = BareLoop(build_iresnet(depth, width=sz.width, embedding_size=512), classes, data, device)
    variants = {"bare": (bare.step, None)}
    if trainer is not None:

        def trainer_step(trainer=trainer, data=data):
            trainer.train_step(data)

        variants["trainer"] = (trainer_step, None)
    return variants


def _throughput(t: dict, batch: int, fwd: float, peak: float | None) -> dict:
    """Per variant: step time, images/s, TFLOP/s (3 × forward FLOPs per image) and MFU against ``peak``."""
    out = {}
    for name, r in t.items():
        ips = batch / r["median_s"]
        out[name] = {
            "step_s": r["median_s"],
            "img_s": ips,
            "blocks_s": r["blocks_s"],
            "peak_step_mib": r["peak_step_mib"],
            "tflop_s": 3 * fwd * ips / 1e12,
            "mfu": (3 * fwd * ips / 1e12 / peak) if peak else None,
        }
    return out


def _log_train_row(label: str, row: dict, why: str | None) -> None:
    mfu = row["bare"]["mfu"]
    log(
        f"train: {label}: bare {row['bare']['img_s']:.1f} img/s"
        + (f" (MFU {mfu:.1%})" if mfu is not None else "")
        + (
            f", trainer {row['trainer']['img_s']:.1f} img/s, trainer/bare {row['trainer_over_bare']:.3f}"
            if row["trainer_over_bare"] is not None
            else f"; {why}"
        )
    )


# --------------------------------------------------------------------------- levers


def part_levers(args, sz: Sizes, device: torch.device, clock: Clock, tmp: Path) -> dict:
    depth, batch = sz.lever_depth, sz.lever_batch
    data = make_batch(batch, 111, device)
    configs = _lever_configs(_wanted_levers(args, device), sz)
    loops, variants, notes = {}, {}, {}
    for name, c in configs.items():
        loop = _lever_loop(name, c, depth, data, sz, device, clock, notes)
        if loop is None:
            continue
        bench = bool(c.get("cudnn_benchmark"))
        loops[name] = loop
        variants[name] = (loop.step, lambda bench=bench: setattr(torch.backends.cudnn, "benchmark", bench))
    t = round_robin(clock, variants, sz, f"levers iresnet{depth} batch {batch}")
    torch.backends.cudnn.benchmark = False
    res = {
        "depth": depth,
        "batch": batch,
        "compile_backend": sz.compile_backend,
        "all_is": "+".join(configs.get("all", {})),
        "variants": _lever_rows(configs, t, notes, batch),
    }
    del loops, variants, data
    free()
    return res


def _wanted_levers(args, device: torch.device) -> dict[str, bool]:
    """The levers the options switch on (channels_last never on the CPU)."""
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
    return want


def _lever_configs(want: dict[str, bool], sz: Sizes) -> dict[str, dict]:
    """name → the levers it switches on: default (none), each lever alone, and all of them together."""
    on = [k for k, v in want.items() if v]
    configs = {"default": {}}
    for k in on:
        configs[k] = {k: True}
    together = [k for k in on if k != "compile" or sz.all_with_compile]
    if len(together) > 1:
        configs["all"] = dict.fromkeys(together, True)
    return configs


def _lever_loop(name, c: dict, depth: int, data: dict, sz: Sizes, device, clock: Clock, notes: dict):
    """The bare loop with the levers ``c`` (a compiled one takes its first step here, outside the timed blocks),
    or None when it failed (the reason in ``notes[name]``)."""
    from pipeline.models.iresnet import build_iresnet

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
        return None
    return loop


def _lever_rows(configs: dict, t: dict, notes: dict, batch: int) -> dict[str, dict]:
    """Per lever variant: step time, images/s and speed-up over the default loop (None where it failed)."""
    base = t["default"]["median_s"]
    rows = {}
    for name in configs:
        if name not in t:
            rows[name] = {"speedup_vs_default": None, "note": notes.get(name)}
            continue
        rows[name] = {
            "step_s": t[name]["median_s"],
            "img_s": batch / t[name]["median_s"],
            "speedup_vs_default": base / t[name]["median_s"],
            "peak_step_mib": t[name]["peak_step_mib"],
            "note": notes.get(name),
        }
        log(
            f"levers: {name:16s} {batch / t[name]['median_s']:9.1f} img/s   x{base / t[name]['median_s']:.3f} vs default"
        )
    return rows
