"""The arguments every ``python -m pipeline.eval`` subcommand shares: the model to evaluate and how to run it."""

from __future__ import annotations

import argparse


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
