"""A test insert and a test head, registered from outside the package (``plugins: [tests.plugins.probe]``).

They exist to prove the composition mechanism, with behaviour simple enough to check by hand:

- ``probe_gain`` insert: y = x · (1 + g) with a learnable per-channel gain g (zero-initialised, so a fresh
  network is unchanged), reporting the aux loss ``probe`` = weight · mean(x²) of its *input* and the monitor
  ``probe/<at>/mean_abs`` = mean |x|. Sized from the point it sits at (channels).
- ``probe_pool`` head: global-average-pools the trunk's final map and one extra point it asks for
  (``needs``), concatenates, and projects with a linear layer to ``embedding_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline import registry
from pipeline.config import InsertOptions, Invalid, PartOptions
from pipeline.models.network import Head, Insert, PointInfo, Trace


@dataclass
class ProbeGainOptions(InsertOptions):
    weight: float = 0.1

    def validate(self):
        if self.weight < 0:
            raise Invalid("weight", f"must be >= 0, got {self.weight}")


class ProbeGain(Insert):
    def __init__(self, channels: int, at: str, weight: float):
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(channels))
        self.at, self.weight = at, weight

    def forward(self, x: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        if trace is not None:
            trace.add_loss("probe", self.weight * x.float().pow(2).mean())
            trace.monitor(f"probe/{self.at}/mean_abs", x.detach().abs().mean())
        return x * (1 + self.gain.view(1, -1, 1, 1))

    def histograms(self) -> dict[str, torch.Tensor]:
        return {f"probe/{self.at}/gain": self.gain.detach()}


@registry.register("insert", "probe_gain", ProbeGainOptions)
def build_probe_gain(opts: ProbeGainOptions, point: PointInfo) -> ProbeGain:
    return ProbeGain(point.channels, opts.at, opts.weight)


@dataclass
class ProbePoolOptions(PartOptions):
    embedding_size: int = 32
    extra: str = "layer3"  # the trunk point pooled besides "out"


class ProbePool(Head):
    def __init__(self, channels: int, embedding_size: int, extra: str):
        super().__init__()
        self.needs = (extra,)
        self.extra = extra
        self.embedding_size = embedding_size
        self.proj = nn.Linear(channels, embedding_size)

    def forward(self, feats: dict[str, torch.Tensor], trace: Trace | None = None) -> torch.Tensor:
        pooled = torch.cat([feats["out"].mean(dim=(2, 3)), feats[self.extra].mean(dim=(2, 3))], dim=1)
        if trace is not None:
            trace.monitor("probe/pooled_norm", pooled.detach().norm(dim=1).mean())
        return self.proj(pooled)


@registry.register("head", "probe_pool", ProbePoolOptions)
def build_probe_pool(opts: ProbePoolOptions, points: dict[str, PointInfo], model_cfg=None) -> ProbePool:
    if opts.extra not in points:
        from pipeline.config import ConfigError

        raise ConfigError(f"model.head.extra: '{opts.extra}' is not a trunk point (known: {', '.join(points)})")
    return ProbePool(points["out"].channels + points[opts.extra].channels, opts.embedding_size, opts.extra)
