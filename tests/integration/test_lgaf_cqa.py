"""LGAF and CQA-Face heads (issue 13), each piece against an independent computation (spec lgaf_cqa.md Part C).

LGAF: the worked example of eqs. 6/9/10 (A.3), the EMA update and its order, the EMA all-reduced over two gloo
ranks equal to the statistics of the concatenated batch, no gradient through γ, eval never touching the buffers,
the buffers through ``model.pt`` and ONNX, the spatial LANet map (eq. 11), GAP∘SE = SE∘GAP, the parameter counts of
§A.9. CQA-Face: CAL (eq. 2) and L_D (eq. 3) on hand-made maps (B.3 values), the relation vectors and the whole head
against an explicit loop, the parameter counts of §B.9. Both: config errors and composition by YAML alone.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_lgaf_cqa.py.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.support.lgaf_cqa import lgf, net_for

# --------------------------------------------------------------------------- LGAF: the LGF equations


def _ema_rank(rank: int, port: int, z_all: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        m = lgf(mean=(20.0, 22.0), std=(100.0, 100.0), alpha=0.3).train()
        m(z_all[rank * 5 : (rank + 1) * 5])  # each rank sees its own 5 samples
        out[rank] = (m.ema_mean.clone(), m.ema_std.clone())
    finally:
        torch.distributed.destroy_process_group()


def test_lgf_ema_is_all_reduced_over_ranks_equal_to_the_concatenated_batch():
    z_all = torch.rand(10, 2, generator=torch.Generator().manual_seed(3)) * 30 + 5
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.start_processes(_ema_rank, args=(port, z_all, out), nprocs=2, join=True, start_method="fork")
    single = lgf(mean=(20.0, 22.0), std=(100.0, 100.0), alpha=0.3).train()
    single(z_all)  # one process, the whole global batch
    for rank in (0, 1):
        torch.testing.assert_close(out[rank][0], single.ema_mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(out[rank][1], single.ema_std, atol=1e-5, rtol=0)
    # and that is not what either rank's own half would give
    half = lgf(mean=(20.0, 22.0), std=(100.0, 100.0), alpha=0.3).train()
    half(z_all[:5])
    assert float((half.ema_std - single.ema_std).abs().max()) > 1e-3


# --------------------------------------------------------------------------- LGAF: the head


def _lfw_train_faces(shared_data, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    root = shared_data / "lfw_view1_112"
    rows = [line.split("\t") for line in (root / "train_list.txt").read_text().splitlines()]
    arr = np.stack(
        [np.asarray(Image.open(root / p).convert("RGB").resize((size, size), Image.BILINEAR)) for p, _ in rows]
    )
    # contiguous NCHW (a permuted NHWC view segfaulted torch 2.13's CPU backward here)
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1).contiguous()
    return x, torch.tensor([int(label) for _, label in rows])


def train_cqa_quality(faces, labels, seed: int, steps: int, out_bn: bool, batch: int = 64) -> list[tuple[float, float]]:
    """A CosFace (s 64, m 0.35) + CAL loop over real faces with linear warm-up, as the fidelity recipe; returns
    (mean Ŝ, spread of Ŝ over the batch) per step."""
    torch.manual_seed(seed)
    net = net_for({"kind": "cqa", "embedding_size": 128, "out_bn": out_bn}, width=0.125, input_size=faces.shape[-1])
    classes = int(labels.max()) + 1
    weight = torch.nn.Parameter(torch.randn(classes, 128) * 0.01)
    opt = torch.optim.SGD([*net.parameters(), weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 0.1 * min(1.0, (step + 1) / 56)  # the fidelity spec's 2 warm-up epochs
        idx = torch.randint(0, len(faces), (batch,), generator=gen)
        result = net(faces[idx])
        cos = F.linear(F.normalize(result.embedding), F.normalize(weight))
        logits = 64.0 * (cos - 0.35 * F.one_hot(labels[idx], classes))
        loss = F.cross_entropy(logits, labels[idx]) + sum(result.aux_losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        q = torch.stack([result.monitors[f"cqa/q{i}_mean"] for i in range(4)]).mean()
        spread = torch.stack([result.monitors[f"cqa/q{i}_std"] for i in range(4)]).mean()
        out.append((float(q), float(spread)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cqa_quality_scores_stay_alive_on_real_faces(shared_data, seed):
    """Issue 23 item 2, at the fidelity spec's scale (iresnet18 × 0.125, 72 px, batch 64, 128-d): with the paper's
    head (no out_bn) Ŝ keeps a spread over the samples and its mean stays above 1e-2 through 100 steps. Measured
    (RESULTS.md): over 150 steps the smallest logged spread of a live head is 0.011; with out_bn: true, seed 1's
    q_spread falls from 0.05 to 0.001 by step 150 (the collapse; the 2e-3 floor warns at step ~140)."""
    faces, labels = _lfw_train_faces(shared_data, 72)
    trace = train_cqa_quality(faces, labels, seed, 100, out_bn=False)
    means, spreads = zip(*trace)
    assert min(means) > 1e-2, means
    assert min(spreads) > 2e-3, spreads
