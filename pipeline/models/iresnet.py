"""IResNet (ArcFace's "improved residual" network) as a trunk + the ``fc`` head, with arcface_torch's names.

Structure (arcface_torch ``backbones/iresnet.py``; Deng et al., ArcFace, Sec. 4.1 "LResNet-E-IR";
Duta et al. 2020 for the pre-activation residual unit)::

    trunk:  conv1 (3×3, stride 1) → bn1 → prelu                                   point "stem"
            layer1..layer4: IBasicBlock × [n1, n2, n3, n4], widths 64/128/256/512,  points "layer1".."layer4"
                            each stage stride 2
            bn2                                                                   point "out"
        IBasicBlock: bn1 → conv1 (3×3, s1) → bn2 → prelu → conv2 (3×3, stride s) → bn3
                     [→ inserts at "layerK.branch", last block of stage K only] [→ se] + shortcut
        shortcut: identity, or ``downsample`` = Sequential(conv 1×1 stride s, BatchNorm2d)
    head "fc":  dropout → flatten → fc (512·7·7 → 512) → features (BatchNorm1d, weight frozen at 1)

Inside a :class:`~pipeline.models.network.FaceNetwork` the parameters are ``trunk.<arcface name>`` and
``head.<arcface name>``; :meth:`FaceNetwork.published_names` maps them to arcface_torch's flat names, so its
published ``backbone.pth`` files load strictly (``pipeline.checkpoint.load_network``) at ``width=1``,
no SE, 112 px input.

Options besides arcface_torch's: ``width`` (channel multiplier: every width × ``width``, rounded, at least 8);
``model.conv`` (the kind of every 3×3 convolution: the stem's and both of every block, e.g. SCAN's
scale-attention conv); ``se_`` names: a squeeze-and-excitation unit (Hu et al., reduction 16) after ``bn3``
of every block, named ``se.fc1`` / ``se.fc2``; ``input_size``: the fc input is last_width × s², s =
input_size halved (ceil) four times (7 for 112 px, 9 for 144 px).

Branch inserts sit right after ``bn3`` (the BN of the block's last 3×3 conv, so they see "conv → BN" output,
LCD's F), before SE and before the shortcut addition. :meth:`IResNetTrunk.point_modules` names the modules around
each point (the block, its last conv and BN, the next block's first BN) for the parts that work on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline import registry
from pipeline.config import PartOptions
from pipeline.models.network import (
    ConvKind,
    FaceNetwork,
    Head,
    InsertPoint,
    PointInfo,
    PointModules,
    Trace,
    build_network,
    call,
)

LAYERS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
WIDTHS = (64, 128, 256, 512)

Conv3x3Factory = Callable[[int, int, int], nn.Module]


def scaled(channels: int, width: float) -> int:
    """Channel count under the width multiplier: round(channels × width), at least 8."""
    return max(8, int(round(channels * width)))


def feature_size(input_size: int, stages: int = 4) -> int:
    """Spatial size after ``stages`` stride-2 stages (3×3, pad 1): ceil-halved ``stages`` times."""
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

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        conv3x3: Conv3x3Factory | None = None,
        se: bool = False,
    ):
        super().__init__()
        conv3x3 = conv3x3 or ConvKind().conv3x3
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
        self.branch: InsertPoint | None = None  # inserts at "layerK.branch" (set by the trunk)

    def forward(self, x: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        out = self.bn1(x)
        out = call(self.conv1, out, trace)
        out = self.bn2(out)
        out = self.prelu(out)
        out = call(self.conv2, out, trace)
        out = self.bn3(out)
        if self.branch is not None:
            out = self.branch(out, trace)
        if hasattr(self, "se"):
            out = self.se(out)
        identity = self.downsample(x) if self.downsample is not None else x
        return out + identity


class IResNetTrunk(nn.Module):
    """Stem + four named stages + the final BN; ``forward(x, trace, keep)`` → {point: map} (``"out"`` always)."""

    def __init__(
        self,
        layers,
        width: float = 1.0,
        se: bool = False,
        conv3x3: Conv3x3Factory | None = None,
        inserts: dict[str, InsertPoint] | None = None,
    ):
        super().__init__()
        conv3x3 = conv3x3 or ConvKind().conv3x3
        inserts = dict(inserts or {})
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
        for k in range(1, 5):
            point = inserts.pop(f"layer{k}.branch", None)
            if point is not None:
                getattr(self, f"layer{k}")[-1].branch = point
        # stage-output inserts: ModuleDict keys are the point names ("stem", "layer1", ...)
        self.after = nn.ModuleDict(inserts) if inserts else None
        self.stages = ("layer1", "layer2", "layer3", "layer4")

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

    def _after(self, name: str, x: torch.Tensor, trace: Trace | None) -> torch.Tensor:
        if self.after is not None and name in self.after:
            x = self.after[name](x, trace)
        return x

    def blocks(self) -> list[IBasicBlock]:
        """The residual blocks, in forward order (``model.compile: blocks`` compiles each)."""
        return [block for name in self.stages for block in getattr(self, name)]

    def point_modules(self, at: str) -> PointModules:
        """The modules around the point ``at`` (:class:`PointModules`); KeyError for a name that is not a point.
        ``layerK.branch`` and ``layerK`` lie in / end stage K's last block (its ``conv2`` → ``bn3``; the branch point
        is ``bn3``'s output, the stage point the block's); the BatchNorm after ``layerK`` is ``bn1`` of stage K+1's
        first block (none after ``layer4``: ``bn2`` is the trunk's output BN, not a block's)."""
        if at == "stem":
            return PointModules(source="prelu", conv="conv1", norm="bn1", next_norm=f"{self.stages[0]}.0.bn1")
        if at == "out":
            return PointModules(source="bn2")
        stage, dot, rest = at.partition(".")
        if stage not in self.stages or (dot and rest != "branch"):
            raise KeyError(at)
        last = len(getattr(self, stage)) - 1
        block = f"{stage}.{last}"
        later = self.stages[self.stages.index(stage) + 1 :]
        return PointModules(
            source=f"{block}.bn3" if dot else block,
            block=block,
            conv=f"{block}.conv2",
            norm=f"{block}.bn3",
            shortcut=f"{block}.downsample" if getattr(self, stage)[last].downsample is not None else None,
            next_norm=f"{later[0]}.0.bn1" if later and not dot else None,
        )

    def forward(
        self, x: torch.Tensor, trace: Trace | None = None, keep: frozenset[str] = frozenset()
    ) -> dict[str, torch.Tensor]:
        feats: dict[str, torch.Tensor] = {}
        x = self.prelu(self.bn1(call(self.conv1, x, trace)))
        x = self._after("stem", x, trace)
        if "stem" in keep:
            feats["stem"] = x
        for name in self.stages:
            for block in getattr(self, name):
                x = block(x, trace)
            x = self._after(name, x, trace)
            if name in keep:
                feats[name] = x
        feats["out"] = self.bn2(x)
        return feats


def trunk_points(depth_layers, width: float, input_size: int) -> dict[str, PointInfo]:
    """The named points of an IResNet trunk in forward order, with their channels and spatial size."""
    widths = [scaled(c, width) for c in WIDTHS]
    points = {"stem": PointInfo(widths[0], input_size)}
    for k in range(1, 5):
        info = PointInfo(widths[k - 1], feature_size(input_size, k))
        points[f"layer{k}.branch"] = info
        points[f"layer{k}"] = info
    points["out"] = PointInfo(widths[3], feature_size(input_size, 4))
    return points


def arcface_init(net: FaceNetwork) -> None:
    """arcface_torch's initialisation of the trunk: conv weights N(0, 0.1), BN γ = 1, β = 0.

    Applied after the whole network is built (as arcface_torch does after building its single module), so
    the random stream, and hence the initial weights for a seed, are the same as there."""
    for m in net.trunk.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0, 0.1)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class IResNetBuilder:
    """The registered builder of one IResNet trunk (depth, SE or not)."""

    def __init__(self, depth: int, se: bool):
        self.depth, self.se = depth, se
        self.__doc__ = f"{'SE-' if se else ''}IResNet-{depth} trunk (stages {LAYERS[depth]})."

    def __call__(self, model_cfg, conv_kind: ConvKind, inserts: dict[str, InsertPoint]) -> IResNetTrunk:
        return IResNetTrunk(
            LAYERS[self.depth], width=model_cfg.width, se=self.se, conv3x3=conv_kind.conv3x3, inserts=inserts
        )

    def points(self, model_cfg) -> dict[str, PointInfo]:
        return trunk_points(LAYERS[self.depth], model_cfg.width, model_cfg.input_size)

    init_weights = staticmethod(arcface_init)


for _depth in LAYERS:
    registry.register_backbone(f"iresnet{_depth}")(IResNetBuilder(_depth, se=False))
for _depth in (50, 100):
    registry.register_backbone(f"se_iresnet{_depth}")(IResNetBuilder(_depth, se=True))


# --------------------------------------------------------------------------- the fc head


@dataclass
class FCHeadOptions(PartOptions):
    """``model.head: {kind: fc, embedding_size: 512, dropout: 0.0}``: insightface's output head."""

    RANGES = {
        "embedding_size": "[1, inf)",
        "dropout": "[0, 1)",
    }  # field → valid interval (pipeline.config.check_ranges)

    embedding_size: int = 512
    dropout: float = 0.0


class FCHead(Head):
    """dropout → flatten → fc → BatchNorm1d (γ frozen at 1) on the trunk's final map (``"out"``, after bn2)."""

    def __init__(self, channels: int, spatial: int, embedding_size: int = 512, dropout: float = 0.0):
        super().__init__()
        self.embedding_size = embedding_size
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(channels * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # arcface_torch: the embedding BN's scale is not trained

    def forward(self, feats: dict[str, torch.Tensor], trace: Trace | None = None) -> torch.Tensor:
        x = torch.flatten(feats["out"], 1)
        return self.features(self.fc(self.dropout(x)))


@registry.register("head", "fc", FCHeadOptions)
def build_fc_head(opts: FCHeadOptions, points: dict[str, PointInfo], model_cfg=None) -> FCHead:
    out = points["out"]
    return FCHead(out.channels, out.spatial, opts.embedding_size, opts.dropout)


# --------------------------------------------------------------------------- direct construction


def build_iresnet(
    depth: int,
    width: float = 1.0,
    embedding_size: int = 512,
    dropout: float = 0.0,
    input_size: int = 112,
    se: bool = False,
    conv: dict | None = None,
) -> FaceNetwork:
    """IResNet-``depth`` (18/34/50/100/200) with the ``fc`` head, as a FaceNetwork (tests, benchmarks).

    ``conv``: a ``model.conv`` block, e.g. ``{"kind": "scan", "lsc": False}`` (default plain)."""
    from pipeline.config import ModelConfig, resolve_model

    if depth not in LAYERS:
        raise ValueError(f"iresnet depth {depth} not one of {sorted(LAYERS)}")
    cfg = ModelConfig(
        backbone=f"{'se_' if se else ''}iresnet{depth}",
        width=width,
        input_size=input_size,
        conv=dict(conv or {"kind": "plain"}),
        head={"kind": "fc", "embedding_size": embedding_size, "dropout": dropout},
    )
    resolve_model(cfg, {})
    return build_network(cfg)
