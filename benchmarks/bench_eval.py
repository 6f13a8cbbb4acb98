"""Feature-extraction speed of the evaluation path (issue 12, item 8).

Times ``pipeline.eval.embed.embed_images`` (what verify / lowres / identify / tarfar / ijb / report use: uint8
batches → model input → embedding, plus the flipped pass, copied back to the host) against a plain PyTorch loop over
the same decoded tensors (normalise, forward, flip, forward), alternating the two in one process and reporting the
median of ``--repeats`` rounds, as images/s (each image embedded twice: plain + flipped) and as the ratio
pipeline / plain. Also times decoding the ``.bin`` (JPEG → uint8 tensor), which both share.

    .venv/bin/python -m benchmarks.bench_eval                      # LFW dev-test .bin, iresnet18 ×0.25, 112 px, CPU
    .venv/bin/python -m benchmarks.bench_eval --depth 50 --width 1 --device cuda --json bench_eval.json

``make gpu-check`` runs the second form on a lent GPU (its ``bench_eval`` step, docs/gpu-check.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # run as a file: its imports need the repository root, which `python -m` puts on sys.path
    raise SystemExit(f"run it from the repository root: python -m benchmarks.{Path(__file__).stem}")

import torch

from benchmarks.common import REPO


def default_bin() -> Path:
    env = os.environ.get("LOWQ_SHARED")
    root = Path(env) if env else REPO.parent / "shared"
    return root / "data" / "lfw_view1_112" / "lfw_devtest_112.bin"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", type=Path, default=default_bin())
    ap.add_argument("--depth", type=int, default=18)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--input-size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--images", type=int, default=512, help="images timed per round (default 512)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    from pipeline.eval.embed import embed_images, to_model_input
    from pipeline.eval.sets import load_bin
    from pipeline.models.iresnet import build_iresnet

    device = torch.device(args.device)
    t = time.perf_counter()
    images, _issame = load_bin(args.bin, args.input_size)
    decode_s = time.perf_counter() - t
    decoded = len(images)
    images = images[: args.images]
    net = build_iresnet(args.depth, width=args.width, embedding_size=512, input_size=args.input_size)
    net = net.to(device).eval()
    embed = net.embedder()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @torch.inference_mode()
    def pipeline_path():
        embed_images(embed, images, args.batch, device)

    @torch.inference_mode()
    def plain_loop():
        out = []
        for s in range(0, len(images), args.batch):
            x = (images[s : s + args.batch].permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(device)
            out.append(net.embed(x).cpu())
            out.append(net.embed(torch.flip(x, dims=[3])).cpu())
        return torch.cat(out)

    # the two must compute the same thing for the ratio to mean anything
    with torch.inference_mode():
        x = to_model_input(images[:4]).to(device)
        ref = (images[:4].permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(device)
        assert torch.allclose(x, ref, atol=1e-6), "to_model_input differs from the plain loop's normalisation"
    times = {"pipeline": [], "plain": []}
    for fn in (pipeline_path, plain_loop):
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("pipeline", pipeline_path), ("plain", plain_loop)):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(images)
    print(
        f"device {device} ({torch.get_num_threads()} threads), iresnet{args.depth} ×{args.width}, {args.input_size} px, "
        f"batch {args.batch}, {n} images × 2 (flip), median of {args.repeats}"
    )
    print(f"decode {args.bin.name}: {decode_s:.2f} s ({decoded / decode_s:.0f} img/s)")
    for k in ("pipeline", "plain"):
        print(f"{k:9s}: {n / med[k]:8.1f} img/s ({med[k]:.2f} s)")
    print(f"pipeline / plain: {med['plain'] / med['pipeline']:.3f} (speed ratio; 1.0 = no overhead)")
    if args.json:
        figures = {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "model": f"iresnet{args.depth} x{args.width}",
            "input_size": args.input_size,
            "batch": args.batch,
            "images": n,
            "repeats": args.repeats,
            "decode_img_per_s": decoded / decode_s,
            "pipeline_img_per_s": n / med["pipeline"],
            "plain_img_per_s": n / med["plain"],
            "pipeline_over_plain": med["plain"] / med["pipeline"],
            "seconds": times,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
