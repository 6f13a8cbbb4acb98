"""``model.compile`` (issue 21 item 1): every network the configs compose traces into one graph (no graph break,
Trace and SCAN's per-call state included), and a compiled network computes what the eager one does.

On the CPU the tests compile with the ``aot_eager`` backend: Dynamo's capture and AOT autograd's forward/backward
graphs (what inductor receives on a GPU) without generating kernels, so a test takes seconds, not minutes.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_compile.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo

from pipeline.checkpoint import describe
from pipeline.config import load_config
from pipeline.models.network import build_network
from tests.helpers import REPO

SMALL = ["model.width=0.0625", "model.backbone=iresnet18"]
CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs" / "compose").glob("*.yaml")) + [
    "configs/arcface_r50.yaml",
    "configs/scan_r18_casia.yaml",
    "configs/lcd_r50.yaml",
    "configs/lgaf_r100.yaml",
    "configs/cqa_r100.yaml",
    "configs/lrfr_r34_casia.yaml",
]


def _distinct_networks() -> dict[str, str]:
    """describe(model) → the first config with that network (the recipes' networks repeat the compose ones)."""
    out: dict[str, str] = {}
    for path in CONFIGS:
        cfg = load_config([REPO / path], SMALL)
        out.setdefault(describe(cfg.model) + str(cfg.model.conv) + str(cfg.model.head), path)
    return out


NETWORKS = sorted(set(_distinct_networks().values()))


@pytest.mark.parametrize("path", NETWORKS)
def test_training_forward_has_no_graph_break(path):
    cfg = load_config([REPO / path], SMALL)
    net = build_network(cfg.model).train()
    size = cfg.model.input_size
    dynamo.reset()
    explained = dynamo.explain(net)(torch.rand(4, 3, size, size) * 2 - 1)
    reasons = [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, (path, reasons)


def _step(net, x, seed):
    torch.manual_seed(seed)  # the same random draws (LCD's feature dropout) in both
    net.zero_grad(set_to_none=True)
    out = net(x)
    loss = (out.embedding**2).mean() + sum(out.aux_losses.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return out.embedding.detach(), loss.detach(), grads


@pytest.mark.parametrize("mode", ["blocks", "full"])
@pytest.mark.parametrize("path", ["configs/compose/scan_fc.yaml", "configs/compose/lcd_lgaf.yaml"])
def test_compiled_equals_eager(path, mode):
    """Two training steps' embeddings, losses and gradients, compiled (aot_eager) vs eager: equal within 1e-5
    relative (measured: 0.0, bit for bit — aot_eager runs the same aten ops; the bound leaves room for another
    backend's fusion), parameter names unchanged."""
    cfg = load_config([REPO / path], SMALL)
    torch.manual_seed(0)
    eager = build_network(cfg.model).train()
    compiled = copy.deepcopy(eager)
    dynamo.reset()
    n = compiled.compile_regions(mode, backend="aot_eager")
    assert n == (1 if mode == "full" else len(compiled.trunk.blocks()))
    assert [k for k, _ in compiled.named_parameters()] == [k for k, _ in eager.named_parameters()]
    size = cfg.model.input_size
    worst = 0.0
    for seed in (1, 2):
        x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        (ea, la, ga), (eb, lb, gb) = _step(eager, x, seed), _step(compiled, x, seed)
        assert ga.keys() == gb.keys()
        for a, b in [(ea, eb), (la, lb), *((ga[k], gb[k]) for k in ga)]:
            worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)))
        with torch.no_grad():  # an SGD step, so that step 2 runs on changed weights
            for p in list(eager.parameters()) + list(compiled.parameters()):
                if p.grad is not None:
                    p -= 0.01 * p.grad
    print(f"{path} {mode}: worst relative difference {worst:.1e}")
    assert worst <= 1e-5, worst
