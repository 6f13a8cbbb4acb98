"""The arguments ``python -m pipeline.eval`` subcommands share: the model to evaluate and how to run it (every
subcommand), and the pair sets to verify on (``verify``, ``lowres``)."""

from __future__ import annotations

import argparse

from pipeline.core.errors import ConfigError
from pipeline.eval.sets import EvalSet


def add_model_arguments(p: argparse.ArgumentParser, several: bool = False) -> None:
    """The model to evaluate — ``--checkpoint`` or ``--onnx`` (exactly one; with ``several``, each
    repeatable and combinable: checkpoints first, then ONNX models) — the options of a state-dict
    file, and ``--batch-size``, ``--device``, ``--no-progress``, as every subcommand takes them."""
    group = p if several else p.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--checkpoint",
        action="append" if several else "store",
        help="trainer checkpoint dir (config.yaml + model.pt), a run dir (its latest checkpoint), or a state-dict .pth"
        + (" (repeat to compare several)" if several else ""),
    )
    group.add_argument(
        "--onnx",
        action="append" if several else "store",
        metavar="MODEL.onnx",
        help="an exported ONNX model (python -m pipeline.export), run by onnxruntime (CUDA provider when the "
        "device is CUDA and the provider is installed, else CPU); input size read from the model"
        + (" (repeatable)" if several else ""),
    )
    p.add_argument("--backbone", help="registry backbone name for a state-dict file (e.g. iresnet50)")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier for --backbone (default 1.0)")
    p.add_argument("--embedding-size", type=int, default=512, help="embedding size for --backbone (default 512)")
    p.add_argument("--input-size", type=int, default=112, help="input size for --backbone (default 112)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_pair_set_arguments(p: argparse.ArgumentParser, bin_help: str = "insightface .bin file(s)") -> None:
    """``--bin`` files or one ``--pairs`` list with its ``--root`` image folder (and ``--ext``)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bin", nargs="+", help=bin_help)
    src.add_argument("--pairs", help="LFW pairs file ('N' or 'FOLDS N' header); needs --root")
    p.add_argument("--root", help="image folder for --pairs (ROOT/name/name_%%04d.jpg)")
    p.add_argument("--ext", default="jpg", help="image extension for --pairs (default jpg)")


def pair_sets_from_args(args) -> list[EvalSet]:
    """The sets :func:`add_pair_set_arguments` named (nothing is read yet); ``--pairs`` without ``--root`` is a
    ConfigError."""
    if args.pairs and not args.root:
        raise ConfigError("--pairs needs --root (the image folder)")
    if args.bin:
        return [EvalSet.from_bin(b) for b in args.bin]
    return [EvalSet.from_pairs(args.pairs, args.root, args.ext)]
