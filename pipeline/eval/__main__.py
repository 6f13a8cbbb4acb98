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
import sys
from pathlib import Path

import numpy as np

from data_prep.manifest import DataError
from pipeline.config import ConfigError
from pipeline.core.device import resolve_device
from pipeline.eval.identify import add_identify_parser, add_model_arguments, run_identify
from pipeline.eval.ijb import add_ijb_parser, run_ijb
from pipeline.eval.lowres import add_lowres_parser, run_lowres
from pipeline.eval.tarfar_cli import add_tarfar_parser, run_tarfar
from pipeline.eval.verify import DEGRADE_HELP, parse_degradations


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
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--bin", nargs="+", help="insightface .bin file(s)")
    src.add_argument("--pairs", help="LFW pairs file ('N' or 'FOLDS N' header); needs --root")
    v.add_argument("--root", help="image folder for --pairs (ROOT/name/name_%%04d.jpg)")
    v.add_argument("--ext", default="jpg", help="image extension for --pairs (default jpg)")
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


def verify(args) -> list[dict]:
    from pipeline.eval.checkpoint import embedder_from_args
    from pipeline.eval.verify import evaluate_images, load_bin, load_pairs, plot_roc

    if args.pairs and not args.root:
        raise ConfigError("--pairs needs --root (the image folder)")
    if args.norms and not args.degrade:
        raise ConfigError("--norms needs --degrade (the degradation levels)")
    degradations = parse_degradations(args.degrade) if args.degrade else None
    device = resolve_device(args.device)
    net, info = embedder_from_args(args, device)
    size = info["input_size"]
    if degradations is not None:
        return verify_degraded(args, net, info, degradations, device)
    sets = (
        [(Path(b).stem, lambda b=b: load_bin(b, size)) for b in args.bin]
        if args.bin
        else [(Path(args.pairs).stem, lambda: load_pairs(args.pairs, args.root, size, args.ext))]
    )
    results, issames, dists = [], [], []
    for name, load in sets:
        images, issame = load()
        res = evaluate_images(
            net, images, issame, name, args.batch_size, device, progress=not args.no_progress, keep_distances=True
        )
        dists.append(np.asarray(res.pop("distances")))
        issames.append(issame)
        results.append(res)
        tars = ", ".join(f"TAR@FAR={k}: {v:.4f}" for k, v in res["tar_at_far"].items() if v is not None)
        auc = f", AUC {res['auc']:.4f}" if res["auc"] is not None else ""  # None: one kind of pair only
        print(
            f"{name}: accuracy {res['accuracy']:.4f} ± {res['std']:.4f}  "
            f"(threshold {res['threshold']:.2f}, no-flip {res['accuracy_noflip']:.4f}{auc}"
            f"{', ' + tars if tars else ''})",
            flush=True,
        )
    roc = args.roc or (str(Path(args.json).with_suffix("")) + "_roc.png" if args.json else None)
    if roc:
        Path(roc).parent.mkdir(parents=True, exist_ok=True)
        plot_roc(results, issames, dists, roc)
        print(f"ROC: {roc}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        slim = [{k: v for k, v in r.items() if k not in ("roc_tpr", "roc_fpr")} for r in results]
        Path(args.json).write_text(json.dumps({**info, "results": slim}, indent=1) + "\n")
        print(f"JSON: {args.json}")
    return results


def verify_degraded(args, net, info: dict, degradations, device) -> dict:
    """``verify --degrade``: every set under every degradation, one table (and the norms with --norms)."""
    from pipeline.eval.verify import (
        bin_source,
        degraded_table,
        evaluate_degraded,
        norms_table,
        pairs_source,
        plot_roc,
    )

    sources = [bin_source(b) for b in args.bin] if args.bin else [pairs_source(args.pairs, args.root, args.ext)]
    out = evaluate_degraded(
        net,
        sources,
        degradations,
        info["input_size"],
        args.batch_size,
        device,
        progress=not args.no_progress,  # a bar on a terminal, periodic lines in a log
        norms=args.norms,
        keep_distances=True,
    )
    dists = [np.asarray(r.pop("distances")) for r in out["results"]]
    print(degraded_table(out["results"]), flush=True)
    if args.norms:
        print("\nembedding L2 norm (mean ± sd over the distinct images, no flip):")
        print(norms_table(out["norms"]), flush=True)
    roc = args.roc or (str(Path(args.json).with_suffix("")) + "_roc.png" if args.json else None)
    if roc:
        Path(roc).parent.mkdir(parents=True, exist_ok=True)
        named = [{**r, "name": f"{r['set']} [{r['degradation']}]"} for r in out["results"]]
        issames = [src[2] for src in sources for _ in degradations]
        plot_roc(named, issames, dists, roc)
        print(f"ROC: {roc}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = {**info, "degradations": [d.label for d in degradations], **out}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"JSON: {args.json}")
    return out


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    commands = {"verify": verify, "lowres": run_lowres, "identify": run_identify, "tarfar": run_tarfar, "ijb": run_ijb}
    try:
        commands[args.cmd](args)
    except (ConfigError, DataError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever the message
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
