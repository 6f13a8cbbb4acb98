"""Verification: the insightface 10-fold protocol by hand, against scikit-learn, and on real LFW pairs.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_verify.py.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.eval import run as ER
from pipeline.eval import sets as ES
from pipeline.eval import verify as V

# --------------------------------------------------------------------------- protocol by hand


def pixel_embed(x: torch.Tensor) -> torch.Tensor:
    """A trivial embedding: 8×8 grey thumbnail minus its mean."""
    g = F.avg_pool2d(x.mean(1, keepdim=True), 14).flatten(1)
    return g - g.mean(1, keepdim=True)


def test_bin_and_pairs_give_same_result(lfw_bin, shared_data):
    root = shared_data / "lfw_view1_112"
    r_bin = ER.evaluate_bin(pixel_embed, lfw_bin, batch_size=250)
    images, issame = ES.load_pairs(root / "pairsDevTest.txt", root / "devtest_112")
    bin_images, bin_issame = ES.load_bin(lfw_bin)
    assert torch.equal(images, bin_images) and np.array_equal(issame, bin_issame)
    r_pairs = V.evaluate_images(pixel_embed, images, issame, "pairsDevTest", batch_size=250)
    assert r_bin["name"] == "lfw_devtest_112" and r_bin["num_pairs"] == 1000
    assert r_pairs["fold_accuracies"] == r_bin["fold_accuracies"]
    assert r_pairs["accuracy"] == r_bin["accuracy"]
    assert 0.55 < r_bin["accuracy"] < 0.8, r_bin["accuracy"]  # above chance, far from a face model
    assert ES.EvalSet.from_bin(lfw_bin).decoded() is ES.EvalSet.from_bin(lfw_bin).decoded()  # decoded once


def test_random_tiny_iresnet_on_lfw(lfw_bin):
    from pipeline.models.iresnet import build_iresnet

    torch.manual_seed(0)
    net = build_iresnet(18, width=0.0625, embedding_size=64).embedder().eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = ER.evaluate_bin(net, lfw_bin, batch_size=200)
    finally:
        torch.set_num_threads(threads)
    assert 0.4 <= r["accuracy"] <= 0.7, r["accuracy"]
    assert len(r["fold_accuracies"]) == 10 and r["std"] > 0


# --------------------------------------------------------------------------- bad input
