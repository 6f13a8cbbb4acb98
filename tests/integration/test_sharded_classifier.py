"""Partial-FC classifier on 1, 2 and 3 gloo processes against a single-process full softmax (float64).

Each spawned rank takes its own slice of one global batch (uneven per-rank sizes) and its shard
of one global weight; the parent recomputes everything with F.cross_entropy on full logits whose
margin is applied by the direct formula below, and compares loss and gradients within 1e-5.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.distributed import free_port
from pipeline.losses.margin import CombinedMargin
from pipeline.losses.sharded_classifier import ShardedMarginClassifier, shard_range, take_shard

D = 8
BATCH = [5, 3, 4]  # per-rank batch sizes (rank r takes BATCH[r])
EXACT_CASES = {  # name: (num_classes, (s, m1, m2, m3))
    "arcface": (10, (64.0, 1.0, 0.5, 0.0)),
    "combined": (7, (32.0, 1.2, 0.3, 0.1)),
    "cosface": (11, (64.0, 1.0, 0.0, 0.35)),
}
SAMPLE_C = 41
TOL = dict(rtol=0, atol=1e-5)


def global_data(num_classes: int, world: int, seed: int, label_pool: int | None = None):
    g = torch.Generator().manual_seed(seed)
    n = sum(BATCH[:world])
    emb = torch.randn(n, D, generator=g, dtype=torch.float64)
    weight = torch.randn(num_classes, D, generator=g, dtype=torch.float64)
    pool = num_classes if label_pool is None else label_pool
    labels = torch.randint(0, pool, (n,), generator=g) * (num_classes // pool)
    if label_pool is None:
        labels[0], labels[-1] = 0, num_classes - 1  # first and last shard both hold positives
    return emb, weight, labels


def local_rows(rank: int):
    start = sum(BATCH[:rank])
    return slice(start, start + BATCH[rank])


def direct_margin_logits(cos, labels, s, m1, m2, m3):
    """s·cos with s·(cos(m1θ+m2) − m3) at the positives (insightface fallback for m1 = 1, SphereFace ψ otherwise)."""
    idx = torch.arange(cos.shape[0])
    c = cos[idx, labels]
    theta = torch.acos(c)
    if m1 == 1.0:
        t = torch.where(theta + m2 > math.pi, c - math.sin(math.pi - m2) * m2, torch.cos(theta + m2))
    else:
        phi = m1 * theta + m2
        k = torch.floor(phi / math.pi)
        t = (-1.0) ** k * torch.cos(phi) - 2 * k
    mask = F.one_hot(labels, cos.shape[1]).bool()
    return torch.where(mask, (s * (t - m3))[:, None].expand_as(cos), s * cos)


def reference(emb, weight, labels, margin_args, columns=None):
    """Loss and gradients of the full (or column-restricted) softmax CE, in one process."""
    emb = emb.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    w = weight if columns is None else weight[columns]
    y = labels if columns is None else torch.searchsorted(columns, labels)
    cos = F.normalize(emb) @ F.normalize(w).T
    loss = F.cross_entropy(direct_margin_logits(cos, y, *margin_args), y)
    loss.backward()
    acc = (cos.argmax(1) == y).double().mean()
    return loss.detach(), emb.grad, weight.grad, acc


def run_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        rows = local_rows(rank)
        for name, (c, margin_args) in EXACT_CASES.items():
            emb, weight, labels = global_data(c, world, seed=len(name))
            for scale in (1.0, 2.5):
                clf = ShardedMarginClassifier(c, D, CombinedMargin(*margin_args), embedding_grad_scale=scale).double()
                assert (clf.rank, clf.world_size) == (rank, world)  # taken from the process group
                clf.load_full_(weight)
                x = emb[rows].clone().requires_grad_(True)
                loss = clf(x, labels[rows])
                loss.backward()
                results[(name, scale)] = dict(
                    loss=loss.detach(),
                    emb_grad=x.grad,
                    w_grad=clf.weight.grad.clone(),
                    acc=clf.last_accuracy,
                    start=clf.class_start,
                    num_local=clf.num_local,
                )
        # sampling: few distinct positives (count = ceil(rate·num_local)) and many (count = #positives)
        for name, rate, pool in (("sample_few", 0.3, 4), ("sample_many", 0.05, SAMPLE_C)):
            emb, weight, labels = global_data(SAMPLE_C, world, seed=7, label_pool=pool)
            torch.manual_seed(100 + rank)
            clf = ShardedMarginClassifier(SAMPLE_C, D, CombinedMargin(64.0, 1.0, 0.5, 0.0), sample_rate=rate).double()
            clf.load_full_(weight)
            x = emb[rows].clone().requires_grad_(True)
            loss = clf(x, labels[rows])
            loss.backward()
            results[name] = dict(
                loss=loss.detach(),
                emb_grad=x.grad,
                w_grad=clf.weight.grad.clone(),
                index=clf.last_sampled_index,
                start=clf.class_start,
                num_local=clf.num_local,
                num_sample=clf.num_sample,
            )
        # full-state round trip: weight and a (rows, D, 2) per-row buffer with the same row split
        clf = ShardedMarginClassifier(10, D, CombinedMargin()).double()
        buf = torch.arange(clf.num_local * D * 2, dtype=torch.float64).reshape(clf.num_local, D, 2) + 1000 * rank
        new_full = torch.randn(10, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        state = clf.full_state_dict()
        clf.load_full_state_dict({"weight": new_full})
        results["full"] = dict(
            weight_full=state["weight"],
            own=clf.weight.detach().clone(),
            buf_full=clf.gather_full(buf),
            buf=buf,
            weight_after=clf.full_state_dict()["weight"],
        )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[1, 2, 3])
def spawned(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"w{world}")
    mp.spawn(run_rank, args=(world, free_port(), str(out)), nprocs=world, join=True)
    return world, [torch.load(out / f"rank{r}.pt") for r in range(world)]


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
