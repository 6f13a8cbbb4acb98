"""Partial-FC classifier on 1, 2 and 3 gloo processes against a single-process full softmax (float64).

Each spawned rank takes its own slice of one global batch (uneven per-rank sizes) and its shard
of one global weight; the parent recomputes everything with F.cross_entropy on full logits whose
margin is applied by the direct formula below, and compares loss and gradients within 1e-5.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_sharded_classifier.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses.sharded_classifier import shard_range, take_shard
from tests.support.sharded_classifier import EXACT_CASES, SAMPLE_C, TOL, D, global_data, local_rows, reference


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exact_full_softmax(spawned, case):
    world, res = spawned
    c, margin_args = EXACT_CASES[case]
    emb, weight, labels = global_data(c, world, seed=len(case))
    loss, emb_grad, w_grad, acc = reference(emb, weight, labels, margin_args)
    starts = []
    for rank, r in enumerate(res):
        start, end = shard_range(c, rank, world)
        starts.append(start)
        for scale in (1.0, 2.5):
            got = r[(case, scale)]
            assert (got["start"], got["num_local"]) == (start, end - start)
            torch.testing.assert_close(got["loss"], loss, **TOL)
            torch.testing.assert_close(got["emb_grad"], scale * emb_grad[local_rows(rank)], **TOL)
            torch.testing.assert_close(got["w_grad"], w_grad[start:end], **TOL)  # not scaled
            torch.testing.assert_close(got["acc"], acc, **TOL)
    # ⌈C/W⌉ rows on the first C mod W ranks, ⌊C/W⌋ on the rest, covering [0, C)
    sizes = [r[(case, 1.0)]["num_local"] for r in res]
    assert sum(sizes) == c and max(sizes) - min(sizes) <= (1 if c % world else 0)
    assert sizes == sorted(sizes, reverse=True) and starts[0] == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["sample_few", "sample_many"])
def test_sampling(spawned, case):
    world, res = spawned
    rate, pool = {"sample_few": (0.3, 4), "sample_many": (0.05, SAMPLE_C)}[case]
    emb, weight, labels = global_data(SAMPLE_C, world, seed=7, label_pool=pool)
    columns, only_positives = [], []
    for r in (x[case] for x in res):
        idx = r["index"]
        start, n_local = r["start"], r["num_local"]
        assert r["num_sample"] == math.ceil(rate * n_local) < n_local
        positives = torch.unique(labels[(labels >= start) & (labels < start + n_local)] - start)
        assert set(positives.tolist()) <= set(idx.tolist()), "every positive must be sampled"
        # a fixed size known on the host: every positive fits (≤ the global batch), no sync decides it
        assert len(idx) == min(n_local, max(r["num_sample"], len(labels))) and len(set(idx.tolist())) == len(idx)
        assert torch.equal(idx, idx.sort().values) and 0 <= int(idx.min()) and int(idx.max()) < n_local
        only_positives.append(len(positives) > r["num_sample"])
        columns.append(idx + start)
        # rows that were not sampled get exactly zero gradient
        unsampled = torch.ones(n_local, dtype=torch.bool)
        unsampled[idx] = False
        assert torch.count_nonzero(r["w_grad"][unsampled]) == 0
    if case == "sample_many":  # some rank has more positives than num_sample: it keeps them all (and negatives)
        assert any(only_positives)
    else:
        assert not any(only_positives)
    columns = torch.cat(columns)
    loss, emb_grad, w_grad, _ = reference(emb, weight, labels, (64.0, 1.0, 0.5, 0.0), columns=columns)
    for rank, r in enumerate(x[case] for x in res):
        start, end = shard_range(SAMPLE_C, rank, world)
        torch.testing.assert_close(r["loss"], loss, **TOL)
        torch.testing.assert_close(r["emb_grad"], emb_grad[local_rows(rank)], **TOL)
        torch.testing.assert_close(r["w_grad"], w_grad[start:end], **TOL)


def test_full_state_round_trip(spawned):
    world, res = spawned
    weights = [r["full"]["weight_full"] for r in res]
    full_buf = torch.cat([r["full"]["buf"] for r in res])
    new_full = torch.randn(10, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for rank, r in enumerate(x["full"] for x in res):
        assert r["weight_full"].shape == (10, D) and torch.equal(r["weight_full"], weights[0])  # same on every rank
        assert torch.equal(r["buf_full"], full_buf)
        assert torch.equal(take_shard(r["buf_full"], rank, world), r["buf"])
        assert torch.equal(r["own"], take_shard(new_full, rank, world))
        assert torch.equal(r["weight_after"], new_full)
