"""CombinedMargin against a direct, element-by-element evaluation of the formulas (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.losses.margin import CombinedMargin


def direct_target(c: float, m1: float, m2: float, m3: float) -> float:
    """cos(m1·θ + m2) − m3 written out with math.* for one cosine, with the documented extensions."""
    theta = math.acos(c)
    if m1 == 1.0:
        if theta + m2 > math.pi:  # insightface: linear penalty cos θ − sin(π − m2)·m2
            return c - math.sin(math.pi - m2) * m2 - m3
        return math.cos(theta + m2) - m3
    phi = m1 * theta + m2
    k = math.floor(phi / math.pi)  # SphereFace ψ: (−1)^k cos φ − 2k
    return (-1) ** k * math.cos(phi) - 2 * k - m3


def direct_logits(cos: torch.Tensor, labels: torch.Tensor, s, m1, m2, m3) -> torch.Tensor:
    out = [[s * float(v) for v in row] for row in cos]
    for i, y in enumerate(labels.tolist()):
        if y >= 0:
            out[i][y] = s * direct_target(float(cos[i, y]), m1, m2, m3)
    return torch.tensor(out, dtype=torch.float64)


MARGINS = [  # (s, m1, m2, m3)
    (64.0, 1.0, 0.5, 0.0),  # ArcFace
    (64.0, 1.0, 0.0, 0.35),  # CosFace
    (48.0, 1.0, 0.3, 0.2),  # combined
    (30.0, 1.35, 0.0, 0.0),  # SphereFace-style multiplicative
    (64.0, 1.2, 0.3, 0.1),  # all three
    (64.0, 4.0, 0.0, 0.0),  # SphereFace m=4: k up to 3
    (64.0, 1.0, 0.0, 0.0),  # plain normalised softmax
]


@pytest.mark.parametrize("s,m1,m2,m3", MARGINS)
def test_matches_direct_formula(s, m1, m2, m3):
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(40, 7, generator=g, dtype=torch.float64) * 2 - 1
    cos[0, 3] = -0.999  # deep in the θ + m2 > π region
    cos[1, 2] = 0.9999
    labels = torch.randint(0, 7, (40,), generator=g)
    labels[5:9] = -1  # positives on another shard: no margin in this block
    labels[0], labels[1] = 3, 2
    cos_before = cos.clone()
    got = CombinedMargin(s, m1, m2, m3)(cos, labels)
    torch.testing.assert_close(got, direct_logits(cos, labels, s, m1, m2, m3), rtol=0, atol=1e-9)
    assert torch.equal(cos, cos_before), "the input must not be modified"
    # rows whose positive is elsewhere are the plain scaled cosine
    torch.testing.assert_close(got[5:9], s * cos[5:9], rtol=0, atol=0)


@pytest.mark.parametrize("m1,m2", [(1.0, 0.5), (1.35, 0.2), (4.0, 0.0)])
def test_target_is_monotonic_and_continuous(m1, m2):
    """The extension keeps the positive's target decreasing in θ over [0, π] (the reason it exists)."""
    theta = torch.linspace(1e-3, math.pi - 1e-3, 20001, dtype=torch.float64)
    t = CombinedMargin(1.0, m1, m2, 0.0).target(torch.cos(theta))
    assert (t[1:] <= t[:-1] + 1e-12).all()
    if m1 != 1.0:  # SphereFace's ψ is continuous; insightface's linear fallback is not (a known small jump)
        assert (t[:-1] - t[1:]).max() < 1e-2


def test_arcface_value_by_hand():
    # θ = 60°, m2 = 0.5: cos(π/3 + 0.5) = 0.5·cos 0.5 − (√3/2)·sin 0.5
    got = CombinedMargin(64.0, 1.0, 0.5, 0.0)(torch.tensor([[0.5, 0.1]], dtype=torch.float64), torch.tensor([0]))
    want = 64 * (0.5 * math.cos(0.5) - math.sqrt(3) / 2 * math.sin(0.5))
    assert abs(got[0, 0].item() - want) < 1e-12 and abs(got[0, 1].item() - 6.4) < 1e-12


@pytest.mark.parametrize("s,m1,m2,m3", MARGINS)
def test_gradcheck(s, m1, m2, m3):
    g = torch.Generator().manual_seed(1)
    # keep away from the non-differentiable points (θ + m2 = π, φ = kπ) and from |cos| = 1
    cos = torch.rand(6, 5, generator=g, dtype=torch.float64) * 1.6 - 0.8
    labels = torch.tensor([0, 4, -1, 2, 1, 3])
    margin = CombinedMargin(s, m1, m2, m3)
    pos = cos[torch.arange(6)[labels >= 0], labels[labels >= 0]]
    phi = m1 * torch.acos(pos) + m2
    assert ((phi / math.pi - torch.round(phi / math.pi)).abs() > 1e-3).all()
    cos.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: margin(c, labels), (cos,), eps=1e-6, atol=1e-6)


def test_low_precision_and_edges_are_finite():
    m = CombinedMargin(64.0, 1.0, 0.5, 0.0)
    cos = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], requires_grad=True)
    out = m(cos, torch.tensor([0, 0]))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(cos.grad).all()
    half = m(torch.tensor([[0.3, 0.2]], dtype=torch.bfloat16), torch.tensor([0]))
    assert half.dtype == torch.bfloat16
    assert abs(half[0, 0].item() - 64 * math.cos(math.acos(0.3) + 0.5)) < 0.5


@pytest.mark.parametrize("kw", [dict(s=0.0), dict(m1=0.0), dict(m2=-0.1), dict(m2=3.2), dict(m3=-1.0)])
def test_bad_parameters(kw):
    args = dict(s=64.0, m1=1.0, m2=0.5, m3=0.0) | kw
    with pytest.raises(ConfigError, match="margin\\."):
        CombinedMargin(**args)
