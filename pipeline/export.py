"""Export a trained embedding network to ONNX, folding SCAN's scale attention first (eq. 5, 8).

    python -m pipeline.export --checkpoint runs/scan_r101/checkpoints/step_0100000 --out scan_r101.onnx --fold
    python -m pipeline.export --checkpoint runs/scan_r101 --out scan_r101.onnx --fold --save-folded plain_r101.pt

``--checkpoint`` is a checkpoint directory (``config.yaml`` + ``model.pt``, as the trainer writes
them) or a run directory (its ``checkpoints/latest`` is used). The whole network (trunk, inserts,
head) is rebuilt from ``config.yaml``, ``model.pt`` is loaded (strict), and the network is put in
eval mode. ``--fold`` puts every convolution in its inference form (SCAN: one plain 3×3 conv holding
k_u = k_s + k_i), so the exported graph of a SCAN-IResNet is a plain IResNet (same size and speed).
``--save-folded`` also writes the folded ``state_dict``, which loads with ``strict=True`` into the
same network with ``model.conv: {kind: plain}``.

The ONNX model has input ``image`` (N, 3, H, W) float32 in [-1, 1] (N dynamic) and output
``embedding`` (N, D). After export, onnxruntime's output on a random batch is compared with
PyTorch's: max |Δ| ≤ atol · max(1, max |embedding|) (``--atol``, default 1e-4), else exit 1.

Bad input is one ``error:`` line and exit 2, before any work: a truncated/empty ``model.pt``, a garbage
``config.yaml``, an ``--out`` / ``--save-folded`` that cannot be written (a directory, a parent that is a
file, a read-only place).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import describe
from pipeline.config import ConfigError
from pipeline.core.errors import print_error


def load_for_export(checkpoint: str | Path):
    """(eval-mode FaceNetwork with model.pt loaded, its model config, checkpoint dir)."""
    from pipeline.eval.checkpoint import load_network_checked

    try:
        net, model_cfg, path = load_network_checked(checkpoint)
    except ConfigError as exc:
        raise ConfigError(f"--checkpoint: {exc}") from None
    return net.eval(), model_cfg, path.parent


def check_writable(path: str | Path, key: str) -> Path:
    """Fail early (one-line ConfigError naming ``key``) when a file cannot be written at ``path``:
    it is a directory, an existing ancestor is a file, or the nearest existing directory refuses a
    file (checked by creating and removing one: permission bits say nothing for root, nor for
    read-only file systems)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{key}: {path} is a directory (give a file name)")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{key}: cannot write {path}: the file is read-only")
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(f"{key}: cannot write {path}: {anc} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write {path}: {anc} is not writable ({exc.strerror})") from None
    return path


def _write_error(key: str, path, exc: OSError) -> ConfigError:
    return ConfigError(f"{key}: cannot write {exc.filename or path} ({exc.strerror or type(exc).__name__})")


def export_onnx(model: torch.nn.Module, out: str | Path, input_size: int, opset: int = 17) -> Path:
    """torch.onnx.export with the TorchScript exporter (dynamo=False: no onnxscript needed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(2, 3, input_size, input_size)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(out),
            input_names=["image"],
            output_names=["embedding"],
            dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return out


def check_onnx(
    model: torch.nn.Module, onnx_path: str | Path, input_size: int, batch: int = 4, seed: int = 0
) -> tuple[float, float]:
    """(max |onnxruntime − PyTorch|, max |PyTorch|) on a random batch in [-1, 1]."""
    import onnxruntime as ort

    x = torch.rand(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(["embedding"], {"image": x.numpy()})[0]
    return float(np.abs(got - ref).max()), float(np.abs(ref).max())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.export",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir (config.yaml + model.pt) or run dir")
    parser.add_argument("--out", required=True, help="output .onnx path")
    parser.add_argument("--fold", action="store_true", help="fold SCAN layers into plain convs before export")
    parser.add_argument("--save-folded", metavar="PT", help="also save the folded state_dict (needs --fold)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17; default 17)")
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="max allowed |onnxruntime - torch| per unit of embedding scale (default 1e-4)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.opset < 17:
            raise ConfigError(f"--opset: must be >= 17, got {args.opset}")
        if args.save_folded and not args.fold:
            raise ConfigError("--save-folded: needs --fold")
        check_writable(args.out, "--out")
        if args.save_folded:
            check_writable(args.save_folded, "--save-folded")
        net, model_cfg, path = load_for_export(args.checkpoint)
        return _export(args, net, model_cfg, path)
    except ConfigError as exc:
        print_error(exc)
        return 2


def _export(args: argparse.Namespace, net, model_cfg, path: Path) -> int:
    """Fold, write, check (after :func:`main` validated the arguments); write failures → ConfigError."""
    if args.fold:
        net, n = net.folded()
        net.eval()
        print(
            f"[export] folded {n} convolution layers into their inference form; {describe(model_cfg)} now has "
            f"plain convolutions only ({sum(p.numel() for p in net.parameters()):,} parameters)"
        )
        if args.save_folded:
            try:
                Path(args.save_folded).parent.mkdir(parents=True, exist_ok=True)
                torch.save(net.state_dict(), args.save_folded)
            except OSError as exc:
                raise _write_error("--save-folded", args.save_folded, exc) from None
            print(f"[export] folded state_dict → {args.save_folded}")
    model = net.embedder().eval()
    size = model_cfg.input_size
    try:
        out = export_onnx(model, args.out, size, args.opset)
    except OSError as exc:
        raise _write_error("--out", args.out, exc) from None
    print(f"[export] {path} → {out} (opset {args.opset}, input {size}×{size})")
    if not args.no_check:
        diff, scale = check_onnx(model, out, size)
        # atol on the embedding's scale: |Δ| ≤ atol · max(1, max|embedding|) (an untrained or barely
        # trained net can emit huge embeddings; float32 differences grow with them)
        allowed = args.atol * max(1.0, scale)
        print(
            f"[export] onnxruntime vs PyTorch: max abs diff {diff:.3g} (allowed {allowed:.3g} = atol {args.atol:g} "
            f"× max(1, max|embedding| = {scale:.3g}))"
        )
        if not diff <= allowed:
            print(f"error: onnxruntime output differs from PyTorch by {diff:.3g} > {allowed:.3g}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
