"""Feature-distance losses of LRFR (Ling et al., "Dive into the Resolution Augmentations and
Metrics in Low Resolution Face Recognition"), Sec. 3.2 and eq. 7.

* :func:`l1_distance`      eq. 1:  L1  = 1/D · Σ_i |x_i − y_i|
* :func:`l2_distance`      eq. 2:  L2  = 1/(2D) · Σ_i (x_i − y_i)²
* :func:`logexp_distance`  eq. 5:  L   = 1/(p·D) · log(1 + Σ_i (exp(|x_i − y_i|^p) − 1))
  (eq. 3 is the p = 1 case; its gradient is eq. 4 / eq. 6)
* :func:`logexp_distance_released` the authors' released form (batch inside the log, ÷ p·B, raw features)
* :func:`feature_distance` eq. 7:  the selected distance between the L2-normalised embeddings
  f_HR/‖f_HR‖₂ and f_LR/‖f_LR‖₂.

Every function takes (B, D) tensors and computes one value per sample (D = the embedding size);
``reduction="mean"`` (default) returns the batch mean, ``reduction="none"`` the (B,) values.

Numerical stability of eq. 5. With a_i = |x_i − y_i|^p ≥ 0 the argument of the log is

    S = 1 + Σ_i expm1(a_i)  ≥ 1.

* When m = max_i a_i ≤ ``_DIRECT_MAX`` (always the case for normalised embeddings, where
  |x_i − y_i| ≤ 2, so a_i ≤ 2^p) we evaluate log S = log1p(Σ_i expm1(a_i)): every term is
  non-negative (no cancellation), expm1 keeps the tiny-error regime exact (S − 1 ≈ Σ a_i, where
  the naive exp(a) − 1 loses all digits), and log1p keeps log S accurate when S is close to 1.
* When m is large, exp(a_i) overflows float32 (a ≳ 88.7), so we factor exp(m) out exactly:

      S = exp(m) · (exp(−m) + Σ_i exp(a_i − m) · (−expm1(−a_i)))         [expm1(a) = e^a · (1 − e^−a)]
      log S = m + log(exp(−m) + Σ_i exp(a_i − m) · (−expm1(−a_i)))

  Each summand is a product of two non-negative factors, each accurate to a few ulps and ≤ 1,
  so nothing overflows, nothing cancels, and the log's argument is ≥ 1 (the i = argmax term is
  −expm1(−m) ≈ 1 for m > _DIRECT_MAX). m is treated as a constant (detached), as in logsumexp:
  the identity holds for any m, so the gradient is unchanged.

The branch is chosen per sample with torch.where; the direct branch's input is clamped where it
is not selected so that no inf/NaN can leak into the gradient of the unselected branch.
Reduced-precision inputs (fp16/bf16) are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Above this max exponent the factored form is used. With D ≤ 2^20 and a_i ≤ 30,
# Σ expm1(a_i) ≤ 2^20 · e^30 ≈ 1e19, far inside float32's range (3.4e38).
_DIRECT_MAX = 30.0

DISTANCES = ("logexp", "l1", "l2")


def _check(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(
            f"feature distance expects two (B, D) tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def l1_distance(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Eq. 1: 1/D · Σ_i |x_i − y_i| per sample (batch mean unless ``reduction="none"``)."""
    _check(x, y)
    return _reduce((_upcast(x) - _upcast(y)).abs().mean(dim=1), reduction)


def l2_distance(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Eq. 2: 1/(2D) · Σ_i (x_i − y_i)² per sample (batch mean unless ``reduction="none"``)."""
    _check(x, y)
    return _reduce(0.5 * (_upcast(x) - _upcast(y)).pow(2).mean(dim=1), reduction)


def log_one_plus_sum_expm1(a: torch.Tensor) -> torch.Tensor:
    """log(1 + Σ_j expm1(a_j)) over the last dim, for a ≥ 0, stable for any magnitude (see module doc)."""
    m = a.detach().amax(dim=-1, keepdim=True).clamp_min(0.0)
    direct = m <= _DIRECT_MAX
    # direct branch: log1p(Σ expm1(a)), fed 0 where not selected so it stays finite
    a_direct = torch.where(direct, a, torch.zeros_like(a))
    v_direct = torch.log1p(torch.expm1(a_direct).sum(dim=-1, keepdim=True))
    # factored branch: m + log(e^−m + Σ e^(a−m) · (−expm1(−a)))
    terms = torch.exp(a - m) * (-torch.expm1(-a))
    v_factored = m + torch.log(torch.exp(-m) + terms.sum(dim=-1, keepdim=True))
    return torch.where(direct, v_direct, v_factored).squeeze(-1)


def logexp_distance(x: torch.Tensor, y: torch.Tensor, p: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Eq. 5: 1/(p·D) · log(1 + Σ_i (exp(|x_i − y_i|^p) − 1)) per sample (batch mean unless
    ``reduction="none"``).

    ``p`` ≥ 1 (for p < 1 the gradient of |d|^p is unbounded at d = 0). At x_i = y_i the
    subgradient of |·| is taken as 0 (torch's convention), so eq. 4's (±1) factor is sign(x_i − y_i).
    The inputs are used as given; eq. 7 normalises them first (see :func:`feature_distance`).
    """
    _check(x, y)
    if not p >= 1.0:
        raise ValueError(f"logexp_distance: p must be >= 1, got {p}")
    d = (_upcast(x) - _upcast(y)).abs()
    a = d if p == 1.0 else d.pow(p)
    return _reduce(log_one_plus_sum_expm1(a) / (p * x.shape[1]), reduction)


def logexp_distance_released(x: torch.Tensor, y: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """The LogExp loss as the authors' released code computes it (``ExpDist`` in hurricanelx/LRFR, read for its
    formula): one log over the whole batch, divided by p and the batch size B, with no 1/D,

        L = 1/(p·B) · log(1 + Σ_n Σ_i (exp(|x_ni − y_ni|^p) − 1)),

    applied there to the raw (un-normalised) embeddings. Compared with eq. 5 on normalised features this is a
    different loss, not a rescaling: the sum over the batch sits inside the log. Returns a scalar."""
    _check(x, y)
    if not p >= 1.0:
        raise ValueError(f"logexp_distance_released: p must be >= 1, got {p}")
    d = (_upcast(x) - _upcast(y)).abs()
    a = d if p == 1.0 else d.pow(p)
    return log_one_plus_sum_expm1(a.reshape(1, -1))[0] / (p * x.shape[0])


def feature_distance(
    name: str, x: torch.Tensor, y: torch.Tensor, p: float = 1.0, normalize: bool = True, reduction: str = "mean"
) -> torch.Tensor:
    """Eq. 7's L_dist: distance ``name`` (logexp | l1 | l2) between x/‖x‖₂ and y/‖y‖₂.

    ``p`` is used by ``logexp`` only. ``normalize=False`` applies the distance to the raw vectors.
    """
    if name not in DISTANCES:
        raise ValueError(f"unknown feature distance '{name}' (known: {', '.join(DISTANCES)})")
    _check(x, y)
    if normalize:
        x = F.normalize(_upcast(x), dim=1)
        y = F.normalize(_upcast(y), dim=1)
    if name == "logexp":
        return logexp_distance(x, y, p, reduction)
    if name == "l1":
        return l1_distance(x, y, reduction)
    return l2_distance(x, y, reduction)
