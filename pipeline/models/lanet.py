"""LANet: the local spatial attention of LS-CNN (Wang et al. 2018), shared by the LGAF and CQA-Face heads.

    conv 1×1 C→max(1, C/r) [→ BN] → ReLU → conv 1×1 →1 [→ BN] → sigmoid        = map (N, 1, H, W) ∈ (0, 1)

LGAF (eq. 11, "two layers of 1x1 convolution … for calculating local spatial attention") and CQA-Face (Fig. 2b,
"the first layer uses the ReLU function and the second layer adopts the Sigmoid function") both cite it. The map is
*spatial*: LGAF's eq. 11 as printed has a GAP before the convs, which would make it a channel attention; the spec
(../shared/specs/lgaf_cqa.md A.7-2) moves that GAP to the projection after the attention, and so do we. The
reduction r = 16 and the two BNs are not from either paper (the public LANet implementation; spec A.7-4, B.7-4).
"""

from __future__ import annotations

import torch
from torch import nn


class LANet(nn.Module):
    """(N, C, H, W) → the spatial attention map (N, 1, H, W), values in (0, 1)."""

    def __init__(self, channels: int, reduction: int = 16, bn: bool = True):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(hidden) if bn else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden, 1, kernel_size=1, bias=not bn)
        self.bn2 = nn.BatchNorm2d(1) if bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


def map_entropy(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Entropy of each map normalised to sum 1 over its positions: (N, 1, H, W) → (N,).
    log(H·W) for a uniform map, 0 for a map on one cell (low = focused, local)."""
    p = maps.flatten(1).float()
    p = p / (p.sum(dim=1, keepdim=True) + eps)
    return -(p * (p + eps).log()).sum(dim=1)
