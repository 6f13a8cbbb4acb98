"""torch 2.13 CPU: one forward + backward of an iresnet18 (width 0.125, 72 px, fc head) on a channels-last input batch
aborted with glibc heap corruption ("corrupted size vs. prev_size") in 2 of 4 runs on the 2-core VM (2026-12-05);
the same with a contiguous NCHW input never did. Kept for issue 21 (channels-last input): on the CPU the trainer must
keep NCHW. Run a few times:  .venv/bin/python scripts/repro/channels_last_cpu_abort.py fc
"""

import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from pipeline.config import load_config
from pipeline.models.network import build_network

head = sys.argv[1]
cfg = load_config(
    [str(__import__("pathlib").Path(__file__).resolve().parents[2] / "configs/cosface_r50.yaml")],
    [
        "model.backbone=iresnet18",
        "model.width=0.125",
        "model.input_size=72",
        f"model.head.kind={head}",
        "model.head.embedding_size=128",
    ],
)
net = build_network(cfg.model)
x = torch.rand(64, 3, 72, 72).contiguous(memory_format=torch.channels_last)
out = net(x)
out.embedding.float().pow(2).sum().backward()
print(head, "ok")
