"""FLOPs for the MFU: iresnet's FLOPs per image counted on the meta device, checked against the published
iresnet100 figure, and the cards' dense bf16 peaks."""

from __future__ import annotations

import torch

from benchmarks.gpu.timing import log

# Dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s, matched against torch.cuda.get_device_name in this
# order. Sources: NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100: BF16 1,979 SXM / 1,513 PCIe /
# 1,671 NVL TFLOP/s "with sparsity", i.e. twice the dense figure), NVIDIA H200 datasheet
# (nvidia.com/en-us/data-center/h200: 1,979 SXM / 1,671 NVL with sparsity), glennklockwood.com/garden/
# processors/h100 (BF16 matrix 989.4 dense, 1978.9 sparse), NVIDIA A100 datasheet (312 dense).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),  # "NVIDIA H100 80GB HBM3" = SXM5
    ("A100", 312.0),
)
# iresnet100 (LResNet100E-IR, ArcFace) at 112×112: 24.2115 GFLOPs, 65.132 M parameters — OpenVINO Open Model
# Zoo, models/public/face-recognition-resnet100-arcface-onnx/README.md; OMZ counts 2 FLOPs per multiply-add
# (its resnet-50 is listed at 8.2 GFLOPs = 2 × 4.1 GMACs).
PUBLISHED_R100_GFLOP = 24.2115
PUBLISHED_R100_MPARAMS = 65.132


def peak_tflops(name: str) -> tuple[float | None, str]:
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"{key}: {value} TFLOP/s dense bf16 (datasheet)"
    return None, f"unknown card '{name}': pass --peak-tflops"


def count_flops(depth: int, width: float, input_size: int = 112, scan: bool = False) -> dict:
    """Forward and forward+backward FLOPs per image (FlopCounterMode: 2 per multiply-add), on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models.iresnet import build_iresnet
    from pipeline.models.scan import build_scan_iresnet

    build = build_scan_iresnet if scan else build_iresnet
    with torch.device("meta"):
        net = build(depth, width=width, embedding_size=512, input_size=input_size)
    x = torch.empty(1, 3, input_size, input_size, device="meta")
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net.embed(x)
    fwd = fc.get_total_flops()
    net.train()
    with FlopCounterMode(display=False) as fc:
        out = net(torch.empty(2, 3, input_size, input_size, device="meta"))
        loss = out.embedding.sum() + sum(out.aux_losses.values(), torch.zeros((), device="meta"))
        loss.backward()
    params = sum(p.numel() for p in net.parameters())
    return {"fwd_flop": fwd, "train_flop_counted": fc.get_total_flops() / 2, "params": params}


def flops_section(device: torch.device, depths: tuple[int, ...]) -> dict:
    """The run's FLOPs section: always the published check at full width; on the GPU the measured depths too
    (the MFU needs them)."""
    fl = {}
    for d in sorted({100, *depths}) if device.type == "cuda" else [100]:  # the MFU needs them on the GPU
        fl[f"iresnet{d}"] = count_flops(d, 1.0)
    fl["r100_vs_published"] = fl["iresnet100"]["fwd_flop"] / 1e9 / PUBLISHED_R100_GFLOP
    fl["r100_params_vs_published"] = fl["iresnet100"]["params"] / 1e6 / PUBLISHED_R100_MPARAMS
    fl["convention"] = "FlopCounterMode: 2 FLOPs per multiply-add (published figure: the same convention)"
    log(
        f"FLOPs: iresnet100 forward {fl['iresnet100']['fwd_flop'] / 1e9:.3f} GFLOP/image "
        f"(published {PUBLISHED_R100_GFLOP}: ratio {fl['r100_vs_published']:.4f}); "
        f"counted fwd+bwd = {fl['iresnet100']['train_flop_counted'] / fl['iresnet100']['fwd_flop']:.2f} x fwd"
    )
    return fl
