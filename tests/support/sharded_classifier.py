"""Shared by tests/unit/test_sharded_classifier.py and tests/integration/test_sharded_classifier.py: fixtures and helpers of both halves."""

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
from pipeline.losses.sharded_classifier import ShardedMarginClassifier

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
