"""Feature-level dropout baselines of LCD's Tables III/IV: DropBlock, spatial dropout, WCD.

LCD (He et al., IEEE TIP; ``pipeline/models/lcd.py``) compares against Cutout (image level, not here), DropBlock
[37] and WCD [38], and gives none of their hyper-parameters or positions. Here each is an insert, placed by default
at the *same tensor* as LCD (``at: layer3.branch``: stage 3's last block, after ``bn3``), identity in eval mode,
with defaults matched to LCD's expected dropped fraction E[γ]/c = 0.3 (spec ``../shared/specs/lcd.md`` §6.2).
Every default below is therefore **not from the LCD paper** ([C]); values from the methods' own papers are marked.
Masks use torch's global RNG (the trainer reseeds it per step and rank).

``dropblock`` (Ghiasi, Lin, Le, "DropBlock", NeurIPS 2018, Algorithm 1): block centres ("seeds") ~ Bernoulli(γ)
only where a whole block_size² square fits, γ = (1-keep_prob)/block_size² · h·w/((h-block_size+1)(w-block_size+1))
(their eq. 1); every seed zeroes the square around it; the output is rescaled by count(M)/count_ones(M) over the
whole mask. [C]: ``shared_mask: true`` — one spatial mask for all channels of a sample, as LCD describes DropBlock
("zeroing out continuous activations of all channels"); ``false`` draws one per channel (Ghiasi et al.'s reference
code). ``keep_prob: 0.7`` (drop 0.3), ``block_size: 3`` (odd only; 14×14 maps at 112 px; Ghiasi et al. use 7 on
ImageNet ResNet-50). Scheduled DropBlock (their Sec. 3, keep_prob decreased linearly from 1): ``ramp_steps`` > 0
ramps it over that many *training forward calls*, counted in a buffer (``calls``, saved in the state dict, so a
resumed run continues the ramp; with grad accumulation a step is several calls); 0 = constant.

``spatial_dropout`` (Tompson et al. 2015; ``nn.Dropout2d`` semantics): each channel of each sample zeroed with
probability p, the kept ones × 1/(1-p). ``p: 0.3`` [C].

``wcd`` (Hou & Wang, "Weighted Channel Dropout", AAAI 2019), per sample:

1. Rating channels: score_i = GAP(relu(F_i)) (global average pooling; WCD assumes non-negative post-ReLU maps,
   the IR branch feature is signed, so relu first [C, spec §6.2]).
2. Weighted random selection (WRS): key_i = r_i^{1/score_i}, r_i ~ U(0, 1); the M = ⌊wrs_ratio·c⌋ channels with
   the largest keys are selected (Efraimidis-Spirakis sampling without replacement, a channel's chance ∝ its
   score; computed as log(r_i)/score_i, the same order; score 0 → never chosen before a positive one).
3. Random number generator (RNG): each WRS-selected channel is kept with probability ``rng_keep`` (q), dropped
   otherwise (a Bernoulli per selected channel). [C] This reading of the RNG step and of the rescaling below
   follows a third-party re-implementation; the text of [38] was not available to check it.
4. Rescaling: the kept channels × α, α = Σ_i score_i / Σ_{i kept} score_i (the score mass is preserved).
   [C] α uses the final (post-RNG) mask; 1 where nothing positive is kept.

``wrs_ratio: 0.8`` and ``rng_keep: 0.9`` [C: not verified against [38]]: E[dropped] = 1 - 0.8·0.9 = 0.28 ≈ LCD's 0.3.

Monitors (training forward with a trace): ``dropblock/drop_frac``, ``dropblock/keep_prob``,
``spatial_dropout/drop_frac``, ``wcd/drop_frac``, ``wcd/alpha_mean``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline import registry
from pipeline.config import InsertOptions, Invalid
from pipeline.models.network import Insert, PointInfo, Trace

__all__ = [
    "DropBlockOptions",
    "DropBlock",
    "dropblock_seed_rate",
    "SpatialDropoutOptions",
    "SpatialDropout",
    "WCDOptions",
    "WeightedChannelDropout",
    "wcd_keep_mask",
]


def _reporting(module: Insert, trace: Trace | None) -> bool:
    return trace is not None and module.training and not trace.probing


# --------------------------------------------------------------------------- DropBlock


@dataclass
class DropBlockOptions(InsertOptions):
    """``{kind: dropblock, at, keep_prob, block_size, shared_mask, ramp_steps}`` (all [C] for LCD's tables)."""

    RANGES = {
        "keep_prob": "(0, 1]",
        "block_size": "[1, inf)",
        "ramp_steps": "[0, inf)",
    }  # field → valid interval (pipeline.config.check_ranges)

    at: str = "layer3.branch"  # the same tensor as LCD
    keep_prob: float = 0.7  # 1 - LCD's expected dropped fraction (0.3)
    block_size: int = 3  # odd; square blocks
    shared_mask: bool = True  # one spatial mask for all channels of a sample (LCD's description)
    ramp_steps: int = 0  # Scheduled DropBlock: keep_prob 1 → keep_prob linearly over this many training calls

    def validate(self):
        if self.block_size < 1 or self.block_size % 2 != 1:
            raise Invalid("block_size", f"must be an odd integer >= 1, got {self.block_size}")


def dropblock_seed_rate(keep_prob: float, block_size: int, height: int, width: int) -> float:
    """γ of DropBlock's eq. 1 (generalised to h×w): (1-keep_prob)/b² · h·w / ((h-b+1)(w-b+1))."""
    return (1.0 - keep_prob) / block_size**2 * (height * width) / ((height - block_size + 1) * (width - block_size + 1))


class DropBlock(Insert):
    """DropBlock (Ghiasi et al. 2018, Algorithm 1); identity in eval mode."""

    def __init__(self, channels: int, opts: DropBlockOptions):
        super().__init__()
        self.channels, self.at = channels, opts.at
        self.keep_prob, self.block_size = opts.keep_prob, opts.block_size
        self.shared_mask, self.ramp_steps = opts.shared_mask, opts.ramp_steps
        if self.ramp_steps > 0:
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"at={self.at}, keep_prob={self.keep_prob}, block_size={self.block_size}, "
            f"shared_mask={self.shared_mask}, ramp_steps={self.ramp_steps}"
        )

    def current_keep_prob(self) -> float:
        """keep_prob now: Scheduled DropBlock's linear ramp from 1 over ``ramp_steps`` training calls."""
        if self.ramp_steps <= 0:
            return self.keep_prob
        progress = min(1.0, float(self.calls) / self.ramp_steps)
        return 1.0 - progress * (1.0 - self.keep_prob)

    def mask(self, x: torch.Tensor, keep_prob: float) -> torch.Tensor:
        """M ∈ {0,1}, (n, 1 or c, h, w): 1 - max-pool(seeds) with seeds only at valid block centres."""
        n, c, h, w = x.shape
        b = min(self.block_size, h, w)  # a block never larger than the map ...
        b -= 1 - b % 2  # ... and odd
        gamma = dropblock_seed_rate(keep_prob, b, h, w)
        half = b // 2
        valid = torch.zeros(h, w, dtype=torch.bool, device=x.device)
        valid[half : h - half, half : w - half] = True  # centres whose whole block lies inside the map
        shape = (n, 1 if self.shared_mask else c, h, w)
        seeds = (torch.rand(shape, device=x.device) < gamma) & valid
        dropped = F.max_pool2d(seeds.float(), kernel_size=b, stride=1, padding=half)
        return 1.0 - dropped

    def forward(self, x: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        if not self.training:
            return x
        keep_prob = self.current_keep_prob()
        if self.ramp_steps > 0:
            self.calls += 1
        if _reporting(self, trace):
            trace.monitor("dropblock/keep_prob", torch.tensor(keep_prob))
        if keep_prob >= 1.0:
            return x
        m = self.mask(x, keep_prob)
        ones = m.sum()
        scale = m.numel() / ones.clamp_min(1.0)  # count(M) / count_ones(M) (Algorithm 1, step 6)
        if _reporting(self, trace):
            trace.monitor("dropblock/drop_frac", 1.0 - ones.detach() / m.numel())
        return x * (m * scale).to(x.dtype)


@registry.register("insert", "dropblock", DropBlockOptions)
def build_dropblock(opts: DropBlockOptions, point: PointInfo) -> DropBlock:
    return DropBlock(point.channels, opts)


# --------------------------------------------------------------------------- spatial dropout


@dataclass
class SpatialDropoutOptions(InsertOptions):
    """``{kind: spatial_dropout, at, p}``: nn.Dropout2d at the insert's point."""

    RANGES = {"p": "[0, 1)"}  # field → valid interval (pipeline.config.check_ranges)

    at: str = "layer3.branch"
    p: float = 0.3  # [C] LCD's expected dropped fraction


class SpatialDropout(Insert):
    """Whole channels zeroed i.i.d. with probability p per sample, kept ones × 1/(1-p) (``nn.Dropout2d``)."""

    def __init__(self, opts: SpatialDropoutOptions):
        super().__init__()
        self.p, self.at = opts.p, opts.at

    def extra_repr(self) -> str:
        return f"at={self.at}, p={self.p}"

    def forward(self, x: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty(x.shape[0], x.shape[1], 1, 1, dtype=x.dtype, device=x.device).bernoulli_(1.0 - self.p)
        if _reporting(self, trace):
            trace.monitor("spatial_dropout/drop_frac", 1.0 - keep.detach().float().mean())
        return x * (keep / (1.0 - self.p))


@registry.register("insert", "spatial_dropout", SpatialDropoutOptions)
def build_spatial_dropout(opts: SpatialDropoutOptions, point: PointInfo) -> SpatialDropout:
    return SpatialDropout(opts)


# --------------------------------------------------------------------------- WCD


@dataclass
class WCDOptions(InsertOptions):
    """``{kind: wcd, at, wrs_ratio, rng_keep, rescale}`` (Hou & Wang 2019; values [C], see the module docstring)."""

    RANGES = {"wrs_ratio": "(0, 1]", "rng_keep": "(0, 1]"}  # field → valid interval (pipeline.config.check_ranges)

    at: str = "layer3.branch"
    wrs_ratio: float = 0.8  # r: fraction of channels WRS selects, M = ⌊r·c⌋
    rng_keep: float = 0.9  # q: probability that the RNG step keeps a WRS-selected channel
    rescale: bool = True  # kept channels × Σ score / Σ_kept score


def wcd_keep_mask(scores: torch.Tensor, selected: int, rng_keep: float) -> torch.Tensor:
    """WCD's WRS + RNG on (n, c) non-negative scores → keep (n, c) bool: the ``selected`` channels with the largest
    keys r^{1/score} (as log r / score), each then kept with probability ``rng_keep``."""
    u = torch.rand(scores.shape, device=scores.device).clamp_min(torch.finfo(torch.float32).tiny)
    keys = torch.log(u) / scores  # monotone in r^{1/s}; s = 0 → -inf (chosen last)
    top = keys.topk(selected, dim=1).indices
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, top, True)
    if rng_keep < 1.0:
        keep &= torch.rand(scores.shape, device=scores.device) < rng_keep
    return keep


class WeightedChannelDropout(Insert):
    """WCD (Hou & Wang 2019): rating (GAP) → weighted random selection → RNG → rescale; identity in eval mode."""

    def __init__(self, channels: int, opts: WCDOptions):
        super().__init__()
        self.channels, self.at = channels, opts.at
        self.wrs_ratio, self.rng_keep, self.rescale = opts.wrs_ratio, opts.rng_keep, opts.rescale
        self.selected = max(1, int(opts.wrs_ratio * channels + 1e-9))

    def extra_repr(self) -> str:
        return f"at={self.at}, M={self.selected}/{self.channels}, rng_keep={self.rng_keep}, rescale={self.rescale}"

    def forward(self, x: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        if not self.training:
            return x
        with torch.no_grad():
            scores = F.relu(x.detach().float()).mean(dim=(2, 3))  # rating: GAP of relu(F)
            keep = wcd_keep_mask(scores, self.selected, self.rng_keep)
            factor = keep.float()
            if self.rescale:
                kept_mass = (scores * factor).sum(dim=1)
                alpha = torch.where(kept_mass > 0, scores.sum(dim=1) / kept_mass.clamp_min(1e-30), 1.0)
                factor = factor * alpha[:, None]
        if _reporting(self, trace):
            trace.monitor("wcd/drop_frac", 1.0 - keep.float().mean())
            if self.rescale:
                trace.monitor("wcd/alpha_mean", alpha.mean())
        return x * factor.to(x.dtype)[:, :, None, None]


@registry.register("insert", "wcd", WCDOptions)
def build_wcd(opts: WCDOptions, point: PointInfo) -> WeightedChannelDropout:
    return WeightedChannelDropout(point.channels, opts)
