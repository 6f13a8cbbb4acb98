"""Low-resolution and cross-resolution verification of a checkpoint on ``.bin`` / pairs sets.

For each set and each size s (default 7, 14, 20 px, the LRFR paper's resolutions, Sec. 3.1):

* **clean**:  the set as stored (HR vs HR);
* **LR s px**: both images of every pair degraded — bicubic down to s×s and back up at the size the image is
  stored at (:func:`pipeline.faces.degrade.degrade_image`, what ``data_prep.bin degrade`` writes and ``verify --degrade
  lr:S`` applies: one implementation; the synthetic LR of LRFR Sec. 3.1 / the "synthesized LFW" of its Fig. 3a),
  re-quantised to 8 bits like a stored LR image, then resized to the model's input;
* **cross s px**: only the second image of every pair degraded (one side HR, one side LR, the
  setting of cross-resolution benchmarks such as XQLFW / SCface).

Verification uses :mod:`pipeline.eval.verify`'s insightface 10-fold protocol unchanged (flip-sum
embeddings, squared L2, thresholds 0..4 step 0.01, KFold 10), through
:func:`pipeline.eval.run.evaluate`: each distinct image is embedded once clean and once per size; the
cross setting pairs the clean first image with the degraded second image (each image is embedded independently in
eval mode, so this equals embedding a half-degraded copy).

    python -m pipeline.eval lowres --checkpoint runs/lrfr --bin lfw.bin [--sizes 7 14 20] [--json out.json]
    python -m pipeline.eval lowres --onnx lrfr.onnx --bin lfw.bin    (an exported model, through onnxruntime)
    python -m pipeline.eval.lowres ...   (the same, without the subcommand)

Prints a markdown table (accuracy ± std of the 10 folds, %) and writes all metrics to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from data_prep.manifest import DataError
from pipeline.config import ConfigError
from pipeline.core.device import resolve_device
from pipeline.core.errors import print_error
from pipeline.eval.arguments import add_model_arguments, add_pair_set_arguments, pair_sets_from_args
from pipeline.eval.degradations import CLEAN, Degradation
from pipeline.eval.run import evaluate
from pipeline.eval.sets import EvalSet

DEFAULT_SIZES = (7, 14, 20)
MODES = ("clean", "lr", "cross")
_KEEP = ("accuracy", "std", "accuracy_noflip", "std_noflip", "threshold", "auc", "tar_at_far", "xnorm", "num_pairs")


def _slim(res: dict) -> dict:
    return {k: res[k] for k in _KEEP if k in res}


def evaluate_lowres(
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    sets: list[EvalSet],
    sizes=DEFAULT_SIZES,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    image_size: int = 112,
    progress: bool = False,
) -> list[dict]:
    """Rows ``{"set", "mode" (clean|lr|cross), "size" (px, None for clean), accuracy, std, ...}`` of every pair set,
    through the one front-end (:func:`pipeline.eval.run.evaluate`, as ``pipeline.eval verify --degrade lr:S cross:S``
    and ``data_prep.bin degrade``'s copies): each image degraded at its stored size (bicubic down to S px and back
    up), then resized to the model's input — the same pixels and the same numbers whatever size the set is stored at
    (issue 20 item 4)."""
    for s in sizes:
        if int(s) < 1:
            raise ConfigError(f"--sizes: resolution must be a positive number of px, got {s}")
    degradations = [CLEAN]
    for s in sizes:
        degradations += [Degradation("lr", int(s)), Degradation("lr", int(s), True)]
    res = evaluate(embed_fn, sets, degradations, image_size, batch_size, device, progress)
    rows = []
    for r in res["results"]:
        mode = "clean" if r["kind"] == "clean" else ("cross" if r["cross"] else "lr")
        rows.append({"set": r["set"], "mode": mode, "size": None if mode == "clean" else int(r["level"]), **_slim(r)})
    return rows


def evaluate_lowres_bin(
    embed_fn,
    bin_path: str | Path,
    sizes=DEFAULT_SIZES,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    image_size: int = 112,
    progress: bool = False,
) -> list[dict]:
    """:func:`evaluate_lowres` on an insightface ``.bin`` (name = file stem)."""
    return evaluate_lowres(embed_fn, [EvalSet.from_bin(bin_path)], sizes, batch_size, device, image_size, progress)


def markdown_table(rows: list[dict], label: str | None = None) -> str:
    """Two lines per set — LR (both images degraded) and cross (second image degraded) — and one
    column per resolution, plus the clean (HR) accuracy; cells are 10-fold accuracy ± std in %.
    ``label`` adds a leading "model" column (for comparing runs)."""
    sizes = sorted({r["size"] for r in rows if r["size"] is not None})
    lead = ["model"] if label is not None else []
    lines = [
        "| " + " | ".join(lead + ["set", "pairs", "setting", "HR (clean)"] + [f"{s} px" for s in sizes]) + " |",
        "|" + "---|" * (len(lead) + 4 + len(sizes)),
    ]

    def cell(r):
        return f"{100 * r['accuracy']:.2f} ± {100 * r['std']:.2f}" if r else "—"

    for name in dict.fromkeys(r["set"] for r in rows):
        by = {(r["mode"], r["size"]): r for r in rows if r["set"] == name}
        clean = by.get(("clean", None))
        pairs = str(clean["num_pairs"]) if clean and "num_pairs" in clean else "—"
        for mode, title, hr in (("lr", "LR (both)", cell(clean)), ("cross", "cross (one HR)", "—")):
            cells = [cell(by.get((mode, s))) for s in sizes]
            lines.append(
                "| " + " | ".join(([label] if label is not None else []) + [name, pairs, title, hr] + cells) + " |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def add_lowres_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``lowres`` on the ``python -m pipeline.eval`` sub-parsers; returns the parser."""
    p = subparsers.add_parser(
        "lowres",
        help="verification on low-resolution and cross-resolution copies of .bin sets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)  # --checkpoint | --onnx, state-dict options, --batch-size, --device, --no-progress
    add_pair_set_arguments(p, bin_help="insightface .bin file(s), e.g. lfw.bin")
    p.add_argument(
        "--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="LR resolutions in px (default: 7 14 20)"
    )
    p.add_argument("--json", help="write the table's numbers (and AUC, TAR@FAR, thresholds) to this JSON file")


def run_lowres(args) -> list[dict]:
    """Run the ``lowres`` subcommand; prints the markdown table, returns the rows."""
    from pipeline.eval.checkpoint import embedder_from_args

    sets = pair_sets_from_args(args)
    if any(s < 1 for s in args.sizes):
        raise ConfigError(f"--sizes: resolutions must be positive px, got {args.sizes}")
    device = resolve_device(args.device)
    net, info = embedder_from_args(args, device)
    size = info["input_size"]
    rows = evaluate_lowres(net, sets, args.sizes, args.batch_size, device, size, progress=not args.no_progress)
    print(markdown_table(rows), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**info, "sizes": list(args.sizes), "results": rows}, indent=1) + "\n")
        print(f"JSON: {args.json}")
    return rows


def main(argv=None) -> int:
    """``python -m pipeline.eval.lowres ...`` = ``python -m pipeline.eval lowres ...`` (same arguments, exit codes)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.eval.lowres")
    add_lowres_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["lowres", *(sys.argv[1:] if argv is None else argv)])
    try:
        run_lowres(args)
    except (ConfigError, DataError) as exc:
        print_error(exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
