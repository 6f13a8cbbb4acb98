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
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import describe, load_network
from pipeline.config import ConfigError


def load_for_export(checkpoint: str | Path):
    """(eval-mode FaceNetwork with model.pt loaded, its model config, checkpoint dir)."""
    try:
        net, model_cfg, path = load_network(checkpoint)
    except ConfigError as exc:
        raise ConfigError(f"--checkpoint: {exc}") from None
    return net.eval(), model_cfg, path.parent


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
        net, model_cfg, path = load_for_export(args.checkpoint)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.fold:
        net, n = net.folded()
        net.eval()
        print(
            f"[export] folded {n} convolution layers into their inference form; {describe(model_cfg)} now has "
            f"plain convolutions only ({sum(p.numel() for p in net.parameters()):,} parameters)"
        )
        if args.save_folded:
            Path(args.save_folded).parent.mkdir(parents=True, exist_ok=True)
            torch.save(net.state_dict(), args.save_folded)
            print(f"[export] folded state_dict → {args.save_folded}")
    model = net.embedder().eval()
    size = model_cfg.input_size
    out = export_onnx(model, args.out, size, args.opset)
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
