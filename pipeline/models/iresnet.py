"""IResNet (ArcFace's "improved residual" network), with insightface arcface_torch's exact names.

Structure (arcface_torch ``backbones/iresnet.py``; Deng et al., ArcFace, Sec. 4.1 "LResNet-E-IR";
Duta et al. 2020 for the pre-activation residual unit)::

    conv1 (3×3, stride 1) → bn1 → prelu
    layer1..layer4: IBasicBlock × [n1, n2, n3, n4], widths 64/128/256/512, each stage stride 2
        IBasicBlock: bn1 → conv1 (3×3, s1) → bn2 → prelu → conv2 (3×3, stride s) → bn3 [→ se] + shortcut
        shortcut: identity, or ``downsample`` = Sequential(conv 1×1 stride s, BatchNorm2d)
    bn2 → flatten → dropout → fc (512·7·7 → 512) → features (BatchNorm1d, weight frozen at 1)

Parameter and buffer names and shapes match arcface_torch, so its published ``backbone.pth``
files load with ``strict=True`` (at ``width=1``, ``se=False``, 112 px input).

Extras for this project (none changes the names above):
- ``width``: channel multiplier (every width × ``width``, rounded, at least 8) for tiny tests;
- ``conv3x3``: factory ``conv3x3(in_planes, out_planes, stride) -> nn.Module`` used for every
  3×3 convolution (the stem and both convs of every block), so SCAN can swap in its
  scale-attention convolution;
- ``se``: a squeeze-and-excitation unit (Hu et al., reduction 16) after ``bn3`` of every block,
  named ``se.fc1`` / ``se.fc2`` (1×1 convs without bias), for SE-IResNet 50/100;
- ``input_size``: the fc input is last_width × s², s = input_size halved (ceil) four times
  (7 for 112 px, 9 for 144 px).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pipeline import registry

LAYERS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
WIDTHS = (64, 128, 256, 512)

Conv3x3Factory = Callable[[int, int, int], nn.Module]


def plain_conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Module:
    """The default 3×3 convolution: padding 1, no bias (arcface_torch ``conv3x3``)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def scaled(channels: int, width: float) -> int:
    """Channel count under the width multiplier: round(channels × width), at least 8."""
    return max(8, int(round(channels * width)))


def feature_size(input_size: int, stages: int = 4) -> int:
    """Spatial size after the four stride-2 stages (3×3, pad 1): ceil-halved ``stages`` times."""
    s = input_size
    for _ in range(stages):
        s = (s + 1) // 2
    return s


class SEModule(nn.Module):
    """Squeeze-and-excitation: x · σ(W2 δ(W1 avgpool(x))), reduction r = 16 (Hu et al., Eq. 2-3)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * w


class IBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 conv3x3: Conv3x3Factory = plain_conv3x3, se: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes, 1)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        if se:
            self.se = SEModule(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        if hasattr(self, "se"):
            out = self.se(out)
        identity = self.downsample(x) if self.downsample is not None else x
        return out + identity


class IResNet(nn.Module):
    def __init__(self, layers, width: float = 1.0, embedding_size: int = 512, dropout: float = 0.0,
                 input_size: int = 112, se: bool = False, conv3x3: Conv3x3Factory | None = None):
        super().__init__()
        conv3x3 = conv3x3 or plain_conv3x3
        widths = [scaled(c, width) for c in WIDTHS]
        self.inplanes = widths[0]
        self.conv1 = conv3x3(3, self.inplanes, 1)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(widths[0], layers[0], 2, conv3x3, se)
        self.layer2 = self._make_layer(widths[1], layers[1], 2, conv3x3, se)
        self.layer3 = self._make_layer(widths[2], layers[2], 2, conv3x3, se)
        self.layer4 = self._make_layer(widths[3], layers[3], 2, conv3x3, se)
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-05)
        self.dropout = nn.Dropout(p=dropout)
        self.fc_scale = feature_size(input_size) ** 2
        self.fc = nn.Linear(widths[3] * self.fc_scale, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-05)
        # arcface_torch initialisation: conv weights N(0, 0.1), BN γ=1 β=0, and the embedding BN's
        # scale fixed at 1 (not trained).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _make_layer(self, planes: int, blocks: int, stride: int, conv3x3: Conv3x3Factory, se: bool):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-05),
            )
        mods = [IBasicBlock(self.inplanes, planes, stride, downsample, conv3x3=conv3x3, se=se)]
        self.inplanes = planes
        mods += [IBasicBlock(planes, planes, conv3x3=conv3x3, se=se) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The stage-4 feature map after ``bn2`` (N, C, s, s), before flatten and fc."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.bn2(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.forward_features(x), 1)
        x = self.dropout(x)
        x = self.fc(x)
        return self.features(x)


def build_iresnet(depth: int, width: float = 1.0, embedding_size: int = 512, dropout: float = 0.0,
                  input_size: int = 112, se: bool = False, conv3x3: Conv3x3Factory | None = None) -> IResNet:
    """IResNet-``depth`` (18/34/50/100/200) with arcface_torch's names; see the module docstring."""
    if depth not in LAYERS:
        raise ValueError(f"iresnet depth {depth} not one of {sorted(LAYERS)}")
    return IResNet(LAYERS[depth], width=width, embedding_size=embedding_size, dropout=dropout,
                   input_size=input_size, se=se, conv3x3=conv3x3)


def _from_cfg(depth: int, se: bool):
    def build(model_cfg) -> IResNet:
        return build_iresnet(depth, width=model_cfg.width, embedding_size=model_cfg.embedding_size,
                             dropout=model_cfg.dropout, input_size=model_cfg.input_size, se=se)
    build.__name__ = f"{'se_' if se else ''}iresnet{depth}"
    build.__doc__ = f"{'SE-' if se else ''}IResNet-{depth} from a ModelConfig (width, embedding_size, dropout, input_size)."
    return build


for _depth in LAYERS:
    registry.register_backbone(f"iresnet{_depth}")(_from_cfg(_depth, se=False))
for _depth in (50, 100):
    registry.register_backbone(f"se_iresnet{_depth}")(_from_cfg(_depth, se=True))
