"""``python -m pipeline.eval tarfar``: 1:1 verification over all pairs of a labelled image set — TAR at FAR
1e-1 … 1e-6 (:func:`pipeline.eval.tarfar.tar_at_far`, the definition), a table, a ROC PNG and a JSON.

Every unordered pair of distinct images is scored (cosine similarity of the L2-normalised flip-summed embeddings):
a pair of one identity is genuine, of two identities an impostor. The LFW View-1 dev-test images (1,549 images of
963 people) give 983 genuine and 1,197,943 impostor pairs.

Example::

    python -m pipeline.eval tarfar --checkpoint runs/a --checkpoint runs/b --images devtest_112/ --roc roc.png
    python -m pipeline.eval tarfar --checkpoint runs/a --onnx a.onnx --images devtest_112/   # PyTorch vs ONNX
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data_prep.manifest import DataError
from pipeline.config import ConfigError
from pipeline.eval.tarfar import (
    DEFAULT_BLOCK,
    FARS,
    TarAtFar,
    count_pairs,
    format_table,
    pair_scores,
    plot_roc,
    tar_at_far,
)


def add_tarfar_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``tarfar`` on the ``python -m pipeline.eval`` sub-parsers; returns the parser."""
    from pipeline.eval.arguments import add_model_arguments

    p = subparsers.add_parser(
        "tarfar",
        help="TAR at FAR 1e-1…1e-6 over all genuine/impostor pairs of a labelled image set; ROC PNG",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p, several=True)
    p.add_argument(
        "--images",
        required=True,
        help="labelled images: a list of '<image path> <label>' lines or an <identity>/ folder",
    )
    p.add_argument("--fars", type=float, nargs="+", default=list(FARS), help="default: 1e-1 … 1e-6")
    p.add_argument("--block", type=int, default=DEFAULT_BLOCK, help="rows of the score matrix at a time (memory)")
    p.add_argument(
        "--keep-duplicates",
        action="store_true",
        help="keep images byte-identical to an earlier image of the set (default: counted, reported, left out)",
    )
    p.add_argument("--roc", help="write the ROC curves of all checkpoints to this PNG (default: beside --json)")
    p.add_argument("--json", help="write TAR, threshold and achieved FAR per checkpoint and FAR to this JSON file")
    return p


def run_tarfar(args) -> list[dict]:
    """Run the ``tarfar`` subcommand; prints the table, returns one result per checkpoint."""
    from pipeline.core.device import resolve_device
    from pipeline.eval.checkpoint import embedder_from_args
    from pipeline.eval.embed import embed_paths

    models = [(c, None) for c in args.checkpoint or []] + [(None, o) for o in getattr(args, "onnx", None) or []]
    if not models:
        raise ConfigError("give at least one --checkpoint or --onnx model")
    if any(not 0 < f < 1 for f in args.fars):
        raise ConfigError(f"--fars must lie in (0, 1), got {args.fars}")
    if args.block < 1:
        raise ConfigError(f"--block must be ≥ 1, got {args.block}")
    images, duplicates = read_without_duplicates(args.images, args.keep_duplicates)
    labels = np.asarray(images.labels)
    n_genuine, n_impostor = count_pairs(labels)
    if not n_genuine or not n_impostor:
        raise DataError(
            f"{images.source}: {n_genuine} genuine and {n_impostor} impostor pairs; "
            "TAR@FAR needs both (≥ 2 images of some identity and ≥ 2 identities)"
        )
    print(
        f"{images.source}: {len(images)} images, {len(set(images.labels))} identities: "
        f"{n_genuine} genuine, {n_impostor} impostor pairs",
        flush=True,
    )
    device = resolve_device(args.device)
    results, curves = [], []
    for checkpoint, onnx in models:
        net, info = embedder_from_args(args, device, checkpoint, onnx)
        feats = embed_paths(net, images.paths, info["input_size"], args.batch_size, device, not args.no_progress)
        genuine, impostor = pair_scores(feats, labels, args.block, device)
        points = tar_at_far(genuine, impostor, args.fars)
        results.append({**info, "points": [asdict(p) for p in points]})
        curves.append((f"[{len(curves) + 1}] {info['checkpoint']}", genuine, impostor))
    names = [r["checkpoint"] for r in results]
    print(format_table(names, [[TarAtFar(**p) for p in r["points"]] for r in results], n_impostor), flush=True)
    roc = args.roc or (str(Path(args.json).with_suffix("")) + "_roc.png" if args.json else None)
    if roc:
        plot_roc(curves, roc, Path(images.source).name)
        print(f"ROC: {roc}")
    if args.json:
        summary = {
            "images": images.source,
            "genuine_pairs": n_genuine,
            "impostor_pairs": n_impostor,
            "duplicates": duplicates,
            "duplicates_excluded": 0 if args.keep_duplicates else duplicates,
        }
        write_json(args.json, {**summary, "results": results})
    return results


def read_without_duplicates(source: str, keep_duplicates: bool):
    """(the labelled image set, how many of its files are byte-identical to an earlier one); those are left out
    unless ``keep_duplicates`` (an image paired with its own copy scores 1 by construction)."""
    from data_prep.manifest import sha256_file
    from pipeline.eval.sets import ImageSet, read_image_set

    images = read_image_set(source)
    seen: set[str] = set()
    first = [not (d in seen or seen.add(d)) for d in map(sha256_file, images.paths)]  # first copy of each file
    duplicates = len(first) - sum(first)
    if duplicates:
        what = "kept (--keep-duplicates)" if keep_duplicates else "excluded (--keep-duplicates keeps them)"
        print(f"{images.source}: {duplicates} image(s) byte-identical to an earlier image of the set: {what}")
        if not keep_duplicates:
            keep = [i for i, f in enumerate(first) if f]
            images = ImageSet([images.paths[i] for i in keep], [images.labels[i] for i in keep], images.source)
    return images, duplicates


def write_json(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
    print(f"JSON: {path}")
