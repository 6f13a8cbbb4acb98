"""The two training steps the parts compare, and their input: the bare PyTorch loop (``BareLoop``), the real
Trainer (``build_trainer``, one rank), and an in-memory batch (``make_batch``)."""

from __future__ import annotations

import importlib.util
import os
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import REPO
from benchmarks.gpu.timing import Sizes


class BareLoop:
    """The bare PyTorch training step: network (bf16 autocast) → fp32 embedding → cosine classifier with the
    ArcFace margin → CE; SGD with momentum and weight decay over the network and the class centres."""

    def __init__(
        self,
        net,
        classes: int,
        batch: dict,
        device: torch.device,
        channels_last=False,
        fused=False,
        compile_backend=None,
    ):
        from pipeline.losses.margin import CombinedMargin

        self.net = net.to(device).train()
        self.weight = torch.nn.Parameter(torch.randn(classes, net.embedding_size, device=device) * 0.01)
        self.margin = CombinedMargin(64.0, 1.0, 0.5, 0.0)
        self.x, self.y = batch["image"], batch["label"]
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.forward = self._forward
        if compile_backend:  # model.compile: blocks — each residual block compiled in place (one graph per shape)
            self.net.compile_regions("blocks", backend=compile_backend)
        params = [{"params": list(self.net.parameters())}, {"params": [self.weight]}]
        self.opt = torch.optim.SGD(
            params, lr=0.1, momentum=0.9, weight_decay=5e-4, **({"fused": True} if fused else {})
        )
        self.device = device

    def _forward(self, x):
        out = self.net(x)
        return out.embedding, out.aux_losses

    def step(self):
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            emb, aux = self.forward(self.x)
        cos = F.linear(F.normalize(emb.float()), F.normalize(self.weight))
        loss = F.cross_entropy(self.margin(cos, self.y), self.y)
        for v in aux.values():
            loss = loss + v.float()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def make_batch(n: int, classes: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": (torch.rand(n, 3, 112, 112, generator=g) * 2 - 1).to(device),
        "label": torch.randint(0, classes, (n,), generator=g).to(device),
    }


def build_trainer(
    depth: int, batch: int, sz: Sizes, device: torch.device, shards: Path, tmp: Path, data: tuple[str, ...] = ()
):
    """The real Trainer (as bench_trainer.py builds it), bf16, one rank, or (None, reason). ``data``: overrides
    of its loader (default: the torch loader, never iterated: batches come from memory)."""
    if importlib.util.find_spec("deepspeed") is None:
        return None, "deepspeed is not installed: bare loop only"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    from pipeline.config import load_config
    from pipeline.train import Trainer

    cfg = load_config(
        [REPO / "configs/arcface_r50.yaml"],
        [
            f"model.backbone=iresnet{depth}",
            f"model.width={sz.width}",
            f"data.train={shards}",
            f"data.batch_size={batch}",
            f"output.dir={tmp / (f'run_r{depth}_b{batch}' + ('_dali' if data else ''))}",  # one run per folder
            f"device={'cuda' if device.type == 'cuda' else 'cpu'}",
            *(data or ("data.loader=torch", "data.num_workers=0")),  # never iterated: the cheapest to build
            f"deepspeed.precision={sz.trainer_precision}",
            "classifier.sample_rate=1.0",
        ],
    )
    try:
        return Trainer(cfg), None
    except Exception as e:  # reported (with the reason), the bare loop is still measured
        traceback.print_exc()
        return None, f"Trainer failed to build: {type(e).__name__}: {e}"
