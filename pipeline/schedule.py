"""Learning-rate schedules stated in epochs, as the papers state them.

``lr_factor(cfg, epoch)`` is the multiplier of the base lr at a (fractional) epoch: a linear
warm-up over ``warmup_epochs``, then ``step`` (× gamma at each milestone epoch, or × ``factors[i]`` at
milestone i), ``poly``
((1 - progress)^power, arcface_torch's default) or ``cosine`` decay to 0 at ``epochs``.
"""

from __future__ import annotations

import bisect
import math

from pipeline.config import ScheduleConfig


def lr_factor(cfg: ScheduleConfig, epoch: float) -> float:
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return (epoch + 1e-12) / cfg.warmup_epochs if epoch > 0 else 1.0 / max(1.0, 1000.0 * cfg.warmup_epochs)
    if cfg.kind == "step":
        passed = bisect.bisect_right(list(cfg.milestones), epoch)
        if cfg.factors:
            return math.prod(cfg.factors[:passed])
        return cfg.gamma**passed
    span = cfg.epochs - cfg.warmup_epochs
    progress = min(1.0, max(0.0, (epoch - cfg.warmup_epochs) / span))
    if cfg.kind == "poly":
        return (1.0 - progress) ** cfg.power
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(cfg: ScheduleConfig, steps_per_epoch: int) -> int:
    steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return min(steps, cfg.max_steps) if cfg.max_steps > 0 else steps
