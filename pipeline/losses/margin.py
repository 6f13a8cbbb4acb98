"""Combined angular margin: SphereFace (m1), ArcFace (m2), CosFace (m3), scaled by s.

ArcFace (Deng et al., CVPR 2019), Eq. 4 — the combined margin: for the positive class y of a
sample, the logit is

    s · (cos(m1·θ_y + m2) − m3),     θ_y = arccos(cos θ_y),

and every other class keeps s·cos θ_j. ArcFace is (m1, m2, m3) = (1, 0.5, 0); CosFace
(Wang et al., CVPR 2018, Eq. 4, "LMCL") is (1, 0, 0.35..0.4) with s = 64; SphereFace
(Liu et al., CVPR 2017) uses the multiplicative m1.

The positive's target function must decrease monotonically in θ ∈ [0, π], otherwise a sample
far from its centre (θ close to π) is pushed the wrong way. cos(m1·θ + m2) stops decreasing once
m1·θ + m2 > π. Two standard fixes are used:

* m1 == 1 (ArcFace/CosFace, what everyone trains): insightface's rule (arcface_torch
  ``CombinedMarginLoss``/``ArcFace``, ``easy_margin=False``): where θ + m2 > π, i.e.
  cos θ ≤ cos(π − m2), the target is the linear penalty cos θ − m2·sin(m2) instead of
  cos(θ + m2) (``sinmm = sin(π − m2)·m2``).
* m1 != 1: SphereFace's monotonic extension ψ (Liu et al. 2017, Sec. 3.2): with
  φ = m1·θ + m2 and k = ⌊φ/π⌋, ψ = (−1)^k·cos φ − 2k, which is continuous and decreasing.

m3 is subtracted in both cases. cos θ is clamped to [−1+ε, 1−ε] before arccos / sin so that the
gradient stays finite (d arccos(x)/dx = −1/√(1−x²) diverges at ±1); at the clamp the gradient
is zero, which only happens for an embedding exactly on (or opposite to) its class centre.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import MarginConfig, check

_CLAMP_EPS = 1e-7


class CombinedMargin(nn.Module):
    """``margin(cosine, labels) -> logits``.

    ``cosine``: (N, C) cosine similarities (of one classifier shard, or of all classes);
    ``labels``: (N,) int64, the column of the sample's positive class in ``cosine``, or −1
    when the positive is not among these columns (another rank's shard). Returns s·cosine with
    the margin applied at the positives. Differentiable; ``cosine`` is not modified.
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0):
        super().__init__()
        check(MarginConfig(s, m1, m2, m3), "margin.")  # the rules live with the config type
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.cos_m, self.sin_m = math.cos(self.m2), math.sin(self.m2)
        self.threshold = math.cos(math.pi - self.m2)  # θ + m2 > π  ⇔  cos θ < threshold
        self.sinmm = math.sin(math.pi - self.m2) * self.m2

    def extra_repr(self) -> str:
        return f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}"

    def target(self, cos: torch.Tensor) -> torch.Tensor:
        """cos(m1·θ + m2) − m3 (with the monotonic extension above) for positive cosines."""
        dtype = cos.dtype
        if dtype in (torch.float16, torch.bfloat16):
            cos = cos.float()
        if self.m1 == 1.0 and self.m2 == 0.0:
            out = cos
        elif self.m1 == 1.0:
            c = cos.clamp(-1.0 + _CLAMP_EPS, 1.0 - _CLAMP_EPS)
            sin = torch.sqrt(1.0 - c * c)
            cos_theta_m = c * self.cos_m - sin * self.sin_m  # cos(θ + m2)
            out = torch.where(cos > self.threshold, cos_theta_m, cos - self.sinmm)
        else:
            c = cos.clamp(-1.0 + _CLAMP_EPS, 1.0 - _CLAMP_EPS)
            phi = self.m1 * torch.acos(c) + self.m2
            k = torch.floor(phi.detach() / math.pi)
            sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (−1)^k
            out = sign * torch.cos(phi) - 2.0 * k
        if self.m3 != 0.0:
            out = out - self.m3
        return out.to(dtype)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if cosine.dim() != 2 or labels.shape != cosine.shape[:1]:
            raise ValueError(
                f"CombinedMargin: expected cosine (N, C) and labels (N,), got "
                f"{tuple(cosine.shape)} and {tuple(labels.shape)}"
            )
        logits = cosine * self.s
        if self.m1 == 1.0 and self.m2 == 0.0 and self.m3 == 0.0:
            return logits
        # gather / where / scatter at a clamped column instead of boolean indexing: no op here needs the number
        # of positive rows on the host (nonzero would sync with the device every step); rows without a positive
        # write their own column-0 logit back unchanged
        has = labels >= 0
        cols = labels.clamp(min=0).unsqueeze(1)
        margin_logit = self.target(cosine.gather(1, cols).squeeze(1)) * self.s
        new = torch.where(has, margin_logit, logits.gather(1, cols).squeeze(1))
        return logits.scatter(1, cols, new.unsqueeze(1))
