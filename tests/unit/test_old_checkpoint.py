"""A checkpoint of an earlier release (tests/fixtures/ckpt_01e6669: written by the trainer at commit 01e6669, before
the engine / core / SCAN changes of 2026-12-05) still loads in eval and export and still resumes (issue 20 item 3).

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_old_checkpoint.py.
"""

from __future__ import annotations

import torch

from tests.support.old_checkpoint import STEP


def test_old_checkpoint_loads_for_evaluation():
    from pipeline.checkpoint import load_network, verify

    assert verify(STEP) is None  # its checksums still hold (no file changed since 01e6669 wrote it)
    net, model_cfg, path = load_network(STEP)
    assert path == STEP / "model.pt" and model_cfg.backbone == "iresnet18"
    with torch.no_grad():
        emb = net.eval().embed(torch.rand(3, 3, 32, 32) * 2 - 1)
    assert emb.shape == (3, 16) and torch.isfinite(emb).all()
