"""``python -m pipeline.eval verify|lowres|identify|tarfar|ijb``: evaluation of a checkpoint.

``verify`` runs the 10-fold protocol on .bin sets or an LFW pairs file; ``lowres`` runs it on
low-resolution (7/14/20 px) and cross-resolution copies of a set and prints one table;
``identify`` gives closed-set rank-k accuracy and the CMC (lists, TinyFace, SCface); ``tarfar``
gives TAR at FAR 1e-1 … 1e-6 over all pairs of a labelled image set, for one or more checkpoints;
``ijb`` runs the IJB-B / IJB-C 1:1 template protocol (TAR at FAR 1e-6 … 1e-1), distributed under
torchrun. Every subcommand takes ``--onnx MODEL.onnx`` (an exported model, run by onnxruntime)
instead of ``--checkpoint``.

Examples::

    # a trainer checkpoint (or a run directory: its latest checkpoint) on .bin sets
    python -m pipeline.eval verify --checkpoint runs/demo --bin ../shared/data/lfw_view1_112/lfw_devtest_112.bin
    # LFW pairs.txt + image folder
    python -m pipeline.eval verify --checkpoint runs/demo \\
        --pairs ../shared/data/lfw_view1_112/pairsDevTest.txt --root ../shared/data/lfw_view1_112/devtest_112
    # clean, blurred, low-resolution and cross-resolution benchmarks in one call (one table)
    python -m pipeline.eval verify --checkpoint runs/demo --bin lfw.bin cfp_fp.bin \\
        --degrade clean blur:1 blur:2 lr:7 lr:14 lr:20 cross:7 cross:14 cross:20
    # real low-resolution pairs: XQLFW ships an LFW-format pairs file and an image folder
    python -m pipeline.eval verify --checkpoint runs/demo --pairs xqlfw_pairs.txt --root xqlfw_aligned_112
    # an insightface arcface_torch backbone.pth
    python -m pipeline.eval verify --checkpoint ms1mv3_r50/backbone.pth --backbone iresnet50 --bin lfw.bin
    # identification: gallery / probe (/ distractor) lists or identity folders, or --tinyface / --scface ROOT
    python -m pipeline.eval identify --checkpoint runs/demo --gallery gallery.txt --probe probe.txt --cmc cmc.png
    # TAR@FAR over all pairs of the LFW dev-test images, two checkpoints on one ROC
    python -m pipeline.eval tarfar --checkpoint runs/a --checkpoint runs/b \\
        --images ../shared/data/lfw_view1_112/devtest_112 --roc roc.png
    # IJB-C 1:1 (meta/ + loose_crop/ of insightface's IJB release), 8 GPUs, resumable feature caches in --out
    torchrun --nproc_per_node 8 -m pipeline.eval ijb --checkpoint runs/r50 --root /data/IJBC --out ijbc_r50
    # an exported ONNX model instead of a checkpoint (any subcommand)
    python -m pipeline.eval verify --onnx r50.onnx --bin ../shared/data/lfw_view1_112/lfw_devtest_112.bin
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from data_prep.manifest import DataError
from pipeline.config import ConfigError
from pipeline.core.device import resolve_device
from pipeline.core.errors import print_error
from pipeline.eval.arguments import add_model_arguments, add_pair_set_arguments, pair_sets_from_args
from pipeline.eval.degradations import CLEAN, DEGRADE_HELP, parse_degradations
from pipeline.eval.identify import add_identify_parser, run_identify
from pipeline.eval.ijb import add_ijb_parser, run_ijb
from pipeline.eval.lowres import add_lowres_parser, run_lowres
from pipeline.eval.run import evaluate, metrics_of
from pipeline.eval.tables import degraded_table, norms_table
from pipeline.eval.tarfar_cli import add_tarfar_parser, run_tarfar
from pipeline.eval.verify import plot_roc


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser(
        "verify",
        help="10-fold verification accuracy on .bin sets or an LFW pairs file",
        description="Prints 'NAME: accuracy MEAN ± STD' per set (insightface 10-fold protocol).",
    )
    add_model_arguments(v)
    add_pair_set_arguments(v)
    v.add_argument("--json", help="write all results to this JSON file")
    v.add_argument("--roc", help="write the ROC curves to this PNG (default: beside --json)")
    v.add_argument(
        "--degrade",
        nargs="+",
        metavar="SPEC",
        help="evaluate every set under each of these degradations, applied on the fly, each distinct image "
        f"embedded once per degradation; one table sets × degradations. SPEC: {DEGRADE_HELP}. "
        "Real low-resolution pair sets need no --degrade: XQLFW ships an LFW-format pairs file and an image "
        "folder, so it runs as 'verify --checkpoint RUN --pairs xqlfw_pairs.txt --root xqlfw_aligned_112'",
    )
    v.add_argument(
        "--norms", action="store_true", help="with --degrade: also the embedding L2 norm per degradation level"
    )
    add_lowres_parser(sub)
    add_identify_parser(sub)
    add_tarfar_parser(sub)
    add_ijb_parser(sub)
    return ap


def verify(args) -> dict:
    """``verify``: every set (``--bin`` files or one ``--pairs`` list) under every ``--degrade`` setting (default:
    as stored) through :func:`pipeline.eval.run.evaluate`; a line per set, or one table with ``--degrade``."""
    from pipeline.eval.checkpoint import embedder_from_args

    sets = pair_sets_from_args(args)
    if args.norms and not args.degrade:
        raise ConfigError("--norms needs --degrade (the degradation levels)")
    degradations = parse_degradations(args.degrade) if args.degrade else [CLEAN]
    device = resolve_device(args.device)
    net, info = embedder_from_args(args, device)
    out = evaluate(
        net,
        sets,
        degradations,
        info["input_size"],
        args.batch_size,
        device,
        progress=not args.no_progress,  # a bar on a terminal, periodic lines in a log
        norms=args.norms,
        keep_distances=True,
    )
    dists = [np.asarray(r.pop("distances")) for r in out["results"]]
    if args.degrade:
        print(degraded_table(out["results"]), flush=True)
        if args.norms:
            print("\nembedding L2 norm (mean ± sd over the distinct images, no flip):")
            print(norms_table(out["norms"]), flush=True)
    else:
        for row in out["results"]:
            print(set_line(row), flush=True)
    issames = [s.decoded().target for s in sets for _ in degradations]
    _write_outputs(args, info, out, degradations, issames, dists)
    return out


def set_line(row: dict) -> str:
    """``NAME: accuracy MEAN ± STD  (threshold, no-flip, AUC, TAR@FAR)`` of one clean pair set."""
    tars = ", ".join(f"TAR@FAR={k}: {v:.4f}" for k, v in row["tar_at_far"].items() if v is not None)
    auc = f", AUC {row['auc']:.4f}" if row["auc"] is not None else ""  # None: one kind of pair only
    return (
        f"{row['set']}: accuracy {row['accuracy']:.4f} ± {row['std']:.4f}  "
        f"(threshold {row['threshold']:.2f}, no-flip {row['accuracy_noflip']:.4f}{auc}"
        f"{', ' + tars if tars else ''})"
    )


def _write_outputs(
    args, info: dict, out: dict, degradations: list, issames: list[np.ndarray], dists: list[np.ndarray]
) -> None:
    """The ROC PNG (``--roc``, default beside ``--json``) and the JSON (``--json``) of ``verify``."""
    named = [
        {**r, "name": r["set"] if not args.degrade else f"{r['set']} [{r['degradation']}]"} for r in out["results"]
    ]
    roc = args.roc or (str(Path(args.json).with_suffix("")) + "_roc.png" if args.json else None)
    if roc:
        Path(roc).parent.mkdir(parents=True, exist_ok=True)
        plot_roc(named, issames, dists, roc)
        print(f"ROC: {roc}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        if args.degrade:
            payload = {**info, "degradations": [d.label for d in degradations], **out}
        else:  # one row per set, named as before --degrade existed
            payload = {**info, "results": [{"name": r["set"], **metrics_of(r)} for r in out["results"]]}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"JSON: {args.json}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    commands = {"verify": verify, "lowres": run_lowres, "identify": run_identify, "tarfar": run_tarfar, "ijb": run_ijb}
    try:
        commands[args.cmd](args)
    except (ConfigError, DataError) as exc:
        print_error(exc)
        return 2
    return 0
