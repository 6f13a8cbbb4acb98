"""LCD's parts that know nothing of the trunk: the channel mask (eqs. 3-4), the channel locality of spec §8, SAM
(eq. 7) with its constant control, and the masked BatchNorm of eq. 6.

The insert that puts them together, and the reasons behind every choice marked [C], are in
:mod:`pipeline.models.lcd` (its docstring); the probes that measure a trained network in
:mod:`pipeline.models.lcd_probes`. Spec: ``../shared/specs/lcd.md`` ("spec §").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GATES",
    "MaskedBatchNorm2d",
    "SpatialAttention",
    "channel_keep_mask",
    "constant_gate",
    "drop_count",
    "locality_stats",
]

GATES = ("sigmoid", "2sigmoid", "constant")
THETA_BAR_INIT = 0.5  # sam_gate: constant at initialisation: sigmoid's centre (trained sigmoid gates: 0.41–0.46)


def drop_count(fraction: float, channels: int) -> int:
    """⌊fraction·c⌋ (γ as a channel count, spec §1.3), robust to float round-off (0.29·100 → 29, not 28)."""
    return int(math.floor(fraction * channels + 1e-9))


# --------------------------------------------------------------------------- eqs. 3-4: the channel mask


def channel_keep_mask(
    n: int,
    channels: int,
    gamma_min: int,
    gamma_max: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 3-4's mask M per sample: (keep (n, c) bool, γ (n,) int64).

    γ_t ~ U{gamma_min, …, gamma_max} (integers, inclusive); exactly γ_t channels of row t are dropped, every
    γ_t-subset equally likely (the ranks of i.i.d. uniforms are a uniform random permutation; drop the ranks < γ_t).
    Draws from ``generator`` (on its device) or torch's global RNG, then moves to ``device``."""
    if not 0 <= gamma_min <= gamma_max <= channels:
        raise ValueError(
            f"channel_keep_mask: need 0 <= gamma_min <= gamma_max <= c, got {gamma_min}, {gamma_max}, {channels}"
        )
    where = generator.device if generator is not None else device
    gamma = torch.randint(gamma_min, gamma_max + 1, (n,), device=where, generator=generator)
    rank = torch.rand(n, channels, device=where, generator=generator).argsort(dim=1).argsort(dim=1)
    keep = rank >= gamma[:, None]
    return keep.to(device), gamma.to(device)


def locality_stats(features: torch.Tensor, top_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel locality (spec §8), per (sample, channel), float32, no gradient:

    - normalised spatial entropy of p = relu(f)/Σ relu(f) over the h·w positions (1 = spread evenly, 0 = one
      position); NaN where a channel has no positive response;
    - the share of the channel's energy f² in its top ``top_fraction`` positions (at least one)."""
    with torch.no_grad():
        x = features.detach().float().flatten(2)
        hw = x.shape[-1]
        positive = x.clamp_min(0)
        mass = positive.sum(-1, keepdim=True)
        p = positive / mass.clamp_min(1e-30)
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1) / math.log(max(hw, 2))
        entropy = entropy.masked_fill(mass.squeeze(-1) <= 0, float("nan"))
        energy = x.pow(2)
        k = max(1, math.ceil(top_fraction * hw))
        top = energy.topk(k, dim=-1).values.sum(-1) / energy.sum(-1).clamp_min(1e-30)
    return entropy, top


# --------------------------------------------------------------------------- eq. 7: SAM


class SpatialAttention(nn.Module):
    """θ ∈ R^c per sample (eq. 7): 1×1 conv → BN → PReLU → flatten → FC → PReLU → FC → gate (sizes: [C]).

    No global pooling: FC1 reads the whole flattened c_r×h×w map, so θ depends on *where* the response is.
    ``forward(x, update_stats=False)`` in training mode uses batch statistics without updating the running ones
    (the clean-feature pass of the ``lcd/eq8_mse_insert`` monitor)."""

    def __init__(self, channels: int, spatial: int, reduced: int = 16, hidden: int = 64, gate: str = "sigmoid"):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"SpatialAttention: gate must be one of {GATES}, got {gate!r}")
        self.channels, self.spatial, self.gate = channels, spatial, gate
        if gate == "constant":
            # The control of spec §7.1: a per-channel θ̄ that ignores the input (frozen: a buffer, no gradient).
            # It scales the branch as a sigmoid gate does, without seeing which channels were dropped.
            self.register_buffer("theta_bar", torch.full((channels,), THETA_BAR_INIT))
            return
        self.reduce = nn.Conv2d(channels, reduced, kernel_size=1, bias=False)
        self.reduce_bn = nn.BatchNorm2d(reduced, eps=1e-05)
        self.reduce_act = nn.PReLU(reduced)
        self.fc1 = nn.Linear(reduced * spatial * spatial, hidden)
        self.fc1_act = nn.PReLU(hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor, update_stats: bool = True) -> torch.Tensor:
        if not torch.jit.is_tracing() and x.shape[-2:] != (self.spatial, self.spatial):  # (ONNX export traces)
            raise ValueError(
                f"SAM was built for {self.spatial}×{self.spatial} maps (model.input_size), got {tuple(x.shape[-2:])}"
            )
        if self.gate == "constant":
            return self.theta_bar.to(x.dtype).expand(x.shape[0], -1)
        y = self.reduce(x)
        if update_stats or not self.training:
            y = self.reduce_bn(y)
        else:
            bn = self.reduce_bn
            y = F.batch_norm(y, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        y = self.reduce_act(y)
        z = self.fc2(self.fc1_act(self.fc1(torch.flatten(y, 1))))
        theta = torch.sigmoid(z)
        return 2 * theta if self.gate == "2sigmoid" else theta


def constant_gate(sam: SpatialAttention, theta_bar: torch.Tensor) -> SpatialAttention:
    """A ``constant`` SAM applying ``theta_bar`` (C,) to every sample: the post-hoc control of a trained gate
    (θ̄ = its per-channel mean θ over a set of faces, see :func:`freeze_sam_to_mean`)."""
    frozen = SpatialAttention(sam.channels, sam.spatial, gate="constant").to(theta_bar.device)
    frozen.theta_bar.copy_(theta_bar.detach().float())
    return frozen


# --------------------------------------------------------------------------- eq. 6: BN over the kept samples


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics skip dropped channels: LCD's eq. 6 (spec §1.2). For channel i the mean
    and the variance run over the (n − η_i)·h·w values of the samples whose channel i is not all zero (η_i = the
    samples whose channel i was dropped); the running statistics are updated from them (the variance unbiased, as
    ``nn.BatchNorm2d``), a channel dropped in every sample is normalised with its running statistics and leaves
    them unchanged. Every value is then normalised with those statistics (a dropped channel's zeros too: eq. 6
    corrects the statistics only). Eval mode, parameters and buffers: ``nn.BatchNorm2d``'s (checkpoints and ONNX
    export are unchanged). A channel that is exactly zero over a whole map without dropout is taken as dropped."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.track_running_stats:
            return super().forward(x)
        xf = x.float()
        kept = xf.flatten(2).ne(0).any(dim=2)  # (n, c): channel i of sample t was not dropped
        weight = kept.to(xf.dtype)[:, :, None, None]
        count = kept.sum(0).to(xf.dtype) * (x.shape[2] * x.shape[3])  # (n - η_i)·h·w
        seen = count > 0
        mean = (xf * weight).sum((0, 2, 3)) / count.clamp_min(1)
        var = ((xf - mean[None, :, None, None]).pow(2) * weight).sum((0, 2, 3)) / count.clamp_min(1)
        mean = torch.where(seen, mean, self.running_mean.float())
        var = torch.where(seen, var, self.running_var.float())
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.float()
            unbiased = var * count / (count - 1).clamp_min(1)
            self.running_mean.copy_(
                torch.where(seen, torch.lerp(self.running_mean.float(), mean, factor), self.running_mean.float())
            )
            self.running_var.copy_(
                torch.where(seen, torch.lerp(self.running_var.float(), unbiased, factor), self.running_var.float())
            )
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight.float()[None, :, None, None] + self.bias.float()[None, :, None, None]
        return y.to(x.dtype)
