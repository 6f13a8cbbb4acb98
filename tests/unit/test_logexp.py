"""LRFR feature distances (eqs. 1, 2, 5, 7) against independent references.

References: float64 numpy with the formula exactly as printed, and — where float64 itself
overflows — Python's ``decimal`` at 60 significant digits (no shared code with the module).
"""

from __future__ import annotations

import decimal
import math

import numpy as np
import pytest
import torch

from pipeline.losses.logexp import feature_distance, l1_distance, l2_distance, log_one_plus_sum_expm1, logexp_distance


def ref_logexp_f64(x: np.ndarray, y: np.ndarray, p: float) -> float:
    """Eq. 5 verbatim in float64, per sample, batch mean."""
    a = np.abs(x.astype(np.float64) - y.astype(np.float64)) ** p
    per = np.log(1.0 + np.sum(np.exp(a) - 1.0, axis=1)) / (p * x.shape[1])
    return float(per.mean())


def ref_log_s_decimal(a_row) -> decimal.Decimal:
    """log(1 + Σ (e^a − 1)) with 60-digit decimals (no overflow at any magnitude)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        s = decimal.Decimal(1)
        for v in a_row:
            s += decimal.Decimal(float(v)).exp() - 1
        return s.ln()


def ref_logexp_decimal(x: np.ndarray, y: np.ndarray, p: float) -> float:
    a = np.abs(x.astype(np.float64) - y.astype(np.float64)) ** p
    vals = [float(ref_log_s_decimal(row)) / (p * x.shape[1]) for row in a]
    return float(np.mean(vals))


@pytest.mark.parametrize("dim", [1, 7, 64, 512])
@pytest.mark.parametrize("p", [1.0, 2.0, 1.5])
def test_logexp_value_matches_float64(dim, p):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(6, dim, generator=g)
    y = torch.randn(6, dim, generator=g)
    got = logexp_distance(x, y, p).item()
    ref = ref_logexp_f64(x.numpy(), y.numpy(), p)
    assert got == pytest.approx(ref, rel=2e-6)
    # float64 inputs stay float64 and agree to ~machine precision
    got64 = logexp_distance(x.double(), y.double(), p).item()
    assert got64 == pytest.approx(ref, rel=1e-12)


def test_logexp_on_normalized_embeddings_matches_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(8, 512, generator=g), dim=1)
    y = torch.nn.functional.normalize(x + 0.05 * torch.randn(8, 512, generator=g), dim=1)
    for p in (1.0, 2.0):
        assert logexp_distance(x, y, p).item() == pytest.approx(ref_logexp_f64(x.numpy(), y.numpy(), p), rel=2e-6)


@pytest.mark.parametrize("dim", [16, 512])
def test_logexp_large_errors_finite_where_naive_float32_overflows(dim):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, dim, generator=g)
    y = x.clone()
    # errors of 60..150 in a few dims: exp() overflows float32 beyond ~88.7
    y[:, :3] += torch.tensor([60.0, 95.0, 150.0])
    y[1, 5] -= 120.0
    naive = torch.log(1 + (torch.exp((x - y).abs()) - 1).sum(1)) / dim
    assert torch.isinf(naive).any(), "the test must exercise the float32 overflow regime"
    got = logexp_distance(x, y, 1.0)
    assert torch.isfinite(got)
    ref = ref_logexp_f64(x.numpy(), y.numpy(), 1.0)  # float64 still fine at 150
    assert got.item() == pytest.approx(ref, rel=1e-6)
    # p = 2: a = 150² = 22500 overflows float64 too → decimal reference
    got2 = logexp_distance(x, y, 2.0)
    assert torch.isfinite(got2)
    assert got2.item() == pytest.approx(ref_logexp_decimal(x.numpy(), y.numpy(), 2.0), rel=1e-6)


def test_logexp_mixed_batch_one_sample_large_one_small():
    """Branch selection is per sample: a large-error row must not disturb a small-error row."""
    x = torch.zeros(2, 32)
    y = torch.zeros(2, 32)
    y[0, 0] = 200.0
    y[1] = 1e-3
    per0 = float(ref_log_s_decimal(np.abs(y[0].numpy().astype(np.float64)))) / 32
    per1 = float(ref_log_s_decimal(np.abs(y[1].numpy().astype(np.float64)))) / 32
    assert logexp_distance(x, y, 1.0).item() == pytest.approx((per0 + per1) / 2, rel=1e-6)
    # the small row alone: identical value in both batches
    assert logexp_distance(x[1:], y[1:], 1.0).item() == pytest.approx(per1, rel=1e-6)


def test_logexp_tiny_errors_keep_relative_accuracy():
    """With errors ~1e-9 naive exp(a) − 1 in float32 rounds to 0; expm1/log1p do not."""
    g = torch.Generator().manual_seed(3)
    x = 1e-6 * torch.randn(3, 512, generator=g)
    y = x + 1e-9 * torch.randn(3, 512, generator=g).sign()
    naive = (torch.log(1 + (torch.exp((x - y).abs()) - 1).sum(1)) / 512).mean()
    ref = ref_logexp_decimal(x.numpy(), y.numpy(), 1.0)
    got = logexp_distance(x, y, 1.0).item()
    assert got == pytest.approx(ref, rel=1e-4)
    assert abs(naive.item() - ref) > 0.5 * ref  # the naive form is visibly wrong here


def test_logexp_zero_distance_and_zero_gradient():
    x = torch.randn(3, 16, requires_grad=True)
    loss = logexp_distance(x, x.detach().clone(), 1.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def _eq4_grad(x: np.ndarray, y: np.ndarray, p: float) -> np.ndarray:
    """Eq. 4 (p = 1) and its eq.-5 generalisation, batch-mean: ∂L/∂x_i =
    1/(B·p·D) · sign(d_i) · p·|d_i|^(p−1) · e^{a_i} / S, evaluated as e^{a_i − log S} for range."""
    B, D = x.shape
    d = x.astype(np.float64) - y.astype(np.float64)
    a = np.abs(d) ** p
    log_s = np.array([float(ref_log_s_decimal(row)) for row in a])[:, None]
    inner = np.exp(a - log_s)
    dpow = p * np.abs(d) ** (p - 1) if p != 1 else np.ones_like(d)
    return np.sign(d) * dpow * inner / (B * p * D)


@pytest.mark.parametrize("scale", [0.05, 1.0, 60.0])
def test_logexp_gradient_matches_eq4_p1(scale):
    g = torch.Generator().manual_seed(11)
    x = scale * torch.randn(5, 512, generator=g)
    y = scale * torch.randn(5, 512, generator=g)
    y[:, 0] = x[:, 0]  # exact zero error: subgradient 0 (sign(0) = 0 in eq. 4's ±1)
    xr = x.clone().requires_grad_(True)
    logexp_distance(xr, y, 1.0).backward()
    ref = _eq4_grad(x.numpy(), y.numpy(), 1.0)
    assert torch.all(xr.grad[:, 0] == 0)
    np.testing.assert_allclose(xr.grad.numpy(), ref, rtol=1e-4, atol=1e-12)
    # float64 autograd: tighter
    x64 = x.double().requires_grad_(True)
    logexp_distance(x64, y.double(), 1.0).backward()
    np.testing.assert_allclose(x64.grad.numpy(), ref, rtol=1e-9, atol=1e-18)


def test_logexp_gradient_p2_and_y_side():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 64, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 64, generator=g, dtype=torch.float64, requires_grad=True)
    logexp_distance(x, y, 2.0).backward()
    ref = _eq4_grad(x.detach().numpy(), y.detach().numpy(), 2.0)
    np.testing.assert_allclose(x.grad.numpy(), ref, rtol=1e-9)
    np.testing.assert_allclose(y.grad.numpy(), -ref, rtol=1e-9)


def test_log_one_plus_sum_expm1_both_branches_agree_at_threshold():
    # rows whose max exponent lies just below / above the branch threshold (30)
    a = torch.tensor([[29.999, 1.0, 0.0], [30.001, 1.0, 0.0]], dtype=torch.float64)
    got = log_one_plus_sum_expm1(a)
    ref = [float(ref_log_s_decimal(r)) for r in a.numpy()]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-14)


def test_l1_l2_match_direct_formulas():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 512, generator=g)
    y = torch.randn(7, 512, generator=g)
    xn, yn = x.double().numpy(), y.double().numpy()
    ref1 = np.mean([sum(abs(a - b) for a, b in zip(r, s)) / 512 for r, s in zip(xn, yn)])
    ref2 = np.mean([sum((a - b) ** 2 for a, b in zip(r, s)) / (2 * 512) for r, s in zip(xn, yn)])
    assert l1_distance(x, y).item() == pytest.approx(ref1, rel=1e-6)
    assert l2_distance(x, y).item() == pytest.approx(ref2, rel=1e-6)
    # eq. 2's gradient: (x_i − y_i)/D per sample, /B for the batch mean
    xr = x.double().requires_grad_(True)
    l2_distance(xr, y.double()).backward()
    np.testing.assert_allclose(xr.grad.numpy(), (xn - yn) / (512 * 7), rtol=1e-12)


@pytest.mark.parametrize("name", ["logexp", "l1", "l2"])
def test_feature_distance_normalizes_first_eq7(name):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 128, generator=g)
    y = torch.randn(4, 128, generator=g)
    xn = x.double().numpy()
    yn = y.double().numpy()
    xn = xn / np.sqrt((xn**2).sum(1, keepdims=True))
    yn = yn / np.sqrt((yn**2).sum(1, keepdims=True))
    if name == "logexp":
        ref = ref_logexp_f64(xn, yn, 2.0)
    elif name == "l1":
        ref = float(np.mean(np.abs(xn - yn).sum(1) / 128))
    else:
        ref = float(np.mean(((xn - yn) ** 2).sum(1) / 256))
    assert feature_distance(name, x, y, p=2.0).item() == pytest.approx(ref, rel=2e-6)
    # scale invariance: only directions matter after eq. 7's normalisation
    assert feature_distance(name, 5.0 * x, 0.1 * y, p=2.0).item() == pytest.approx(ref, rel=2e-6)
    # without normalisation it is a different number
    assert feature_distance(name, 5.0 * x, y, p=2.0, normalize=False).item() != pytest.approx(ref, rel=1e-3)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown feature distance"):
        feature_distance("cos", torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="same shape"):
        logexp_distance(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="p must be"):
        logexp_distance(torch.zeros(2, 3), torch.zeros(2, 3), 0.5)


def test_half_precision_inputs_computed_in_float32():
    x = torch.randn(2, 512).half()
    y = torch.randn(2, 512).half()
    got = logexp_distance(x, y, 1.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref_logexp_f64(x.float().numpy(), y.float().numpy(), 1.0), rel=1e-5)
    assert math.isfinite(got.item())


@pytest.mark.parametrize("name", ["logexp", "l1", "l2"])
def test_reduction_none_gives_per_sample_values(name):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 32, generator=g)
    y = torch.randn(5, 32, generator=g)
    per = feature_distance(name, x, y, p=1.0, reduction="none")
    assert per.shape == (5,)
    for i in range(5):
        assert per[i].item() == pytest.approx(
            feature_distance(name, x[i : i + 1], y[i : i + 1], p=1.0).item(), rel=1e-6
        )
    assert per.mean().item() == pytest.approx(feature_distance(name, x, y, p=1.0).item(), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        feature_distance(name, x, y, reduction="sum")


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_released_form_matches_float64_and_relates_to_eq5(p):
    from pipeline.losses.logexp import logexp_distance_released

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    a = np.abs(x.double().numpy() - y.double().numpy()) ** p
    ref = math.log(1 + np.expm1(a).sum()) / (p * 6)
    assert abs(float(logexp_distance_released(x, y, p)) - ref) <= 1e-6 * ref
    # one sample: the batch log is eq. 5's log, without eq. 5's 1/D
    one = float(logexp_distance_released(x[:1], y[:1], p))
    assert one == pytest.approx(float(logexp_distance(x[:1], y[:1], p)) * 32, rel=1e-6)
