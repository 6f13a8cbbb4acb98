"""SCAN-CNN: SAC kernel (eqs. 2, 4) vs scipy, LSC (eq. 8), RMO (eq. 6) and its efficient gradient
(App. E), folding (eq. 5) against the plain IResNet, and the recipe's contract.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_scan.py.
"""

from __future__ import annotations

import torch

# --------------------------------------------------------------------------- SAC kernel


def test_scan_step_launches_at_most_twice_plain():
    """The host work of an r100 SCAN training step (forward, backward, SGD) in launching aten ops, counted on the
    meta device: ≤ 2× the plain iresnet100's (issue 21 item 3; 7,479 = 8.0× before kernels were batched)."""
    from pipeline.dispatch_count import count_ops
    from pipeline.models.iresnet import build_iresnet

    def launches(conv: dict) -> int:
        with torch.device("meta"):
            net = build_iresnet(100, embedding_size=512, conv=conv).train()
            x = torch.empty(2, 3, 112, 112)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, foreach=True)

        def step():
            out = net(x)
            (out.embedding.float().pow(2).mean() + sum(out.aux_losses.values())).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # momentum buffers exist from here on
        counts = count_ops(step)
        assert counts.syncing == []
        return counts.launches

    plain, scan = launches({"kind": "plain"}), launches({"kind": "scan"})
    print(f"launching ops per r100 step: plain {plain}, SCAN {scan} ({scan / plain:.2f}×)")
    assert scan <= 2 * plain, (plain, scan)
