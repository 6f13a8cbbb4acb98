"""IResNet trunk + fc head: arcface_torch names/shapes (strict load of a published flat state dict),
parameter counts, width/SE/conv kind/input_size, the named points."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from pipeline import registry
from pipeline.checkpoint import load_state_strict
from pipeline.config import load_config
from pipeline.models.iresnet import IResNetTrunk, build_iresnet
from pipeline.models.network import build_network


def published(model) -> dict[str, tuple]:
    """The network's state-dict table under arcface_torch's flat names, in order."""
    names = model.published_names()
    return {names[k]: tuple(v.shape) for k, v in model.state_dict().items()}


def _bn2d(prefix: str, c: int) -> list[tuple[str, tuple]]:
    return [
        (f"{prefix}.weight", (c,)),
        (f"{prefix}.bias", (c,)),
        (f"{prefix}.running_mean", (c,)),
        (f"{prefix}.running_var", (c,)),
        (f"{prefix}.num_batches_tracked", ()),
    ]


def arcface_torch_table(layers, widths=(64, 128, 256, 512), emb=512, spatial=7) -> OrderedDict:
    """The state-dict table of arcface_torch's IResNet, written from its description (not our code)."""
    t = [("conv1.weight", (widths[0], 3, 3, 3))] + _bn2d("bn1", widths[0]) + [("prelu.weight", (widths[0],))]
    cin = widths[0]
    for li, (n, c) in enumerate(zip(layers, widths), start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            t += _bn2d(f"{p}.bn1", cin)
            t += [(f"{p}.conv1.weight", (c, cin, 3, 3))]
            t += _bn2d(f"{p}.bn2", c)
            t += [(f"{p}.prelu.weight", (c,))]
            t += [(f"{p}.conv2.weight", (c, c, 3, 3))]
            t += _bn2d(f"{p}.bn3", c)
            if b == 0:  # every stage starts with stride 2 → a projection shortcut
                t += [(f"{p}.downsample.0.weight", (c, cin, 1, 1))] + _bn2d(f"{p}.downsample.1", c)
            cin = c
    t += _bn2d("bn2", widths[-1])
    t += [("fc.weight", (emb, widths[-1] * spatial * spatial)), ("fc.bias", (emb,))]
    t += _bn2d("features", emb)
    return OrderedDict(t)


def closed_form_params(layers, widths=(64, 128, 256, 512), emb=512, spatial=7) -> int:
    """Parameter count by formula: conv k·k·in·out, BN 2c (γ, β), PReLU c, fc in·out + out."""
    n = 27 * widths[0] + 3 * widths[0]
    cin = widths[0]
    for nb, c in zip(layers, widths):
        for b in range(nb):
            n += 2 * cin + 9 * cin * c + 2 * c + c + 9 * c * c + 2 * c
            if b == 0:
                n += cin * c + 2 * c
            cin = c
    return n + 2 * widths[-1] + widths[-1] * spatial**2 * emb + emb + 2 * emb


def test_iresnet50_strict_load_of_arcface_torch_names():
    table = arcface_torch_table((3, 4, 14, 3))
    model = build_iresnet(50)
    got = published(model)
    assert list(got) == list(table)  # same names, same order
    assert got == dict(table)
    g = torch.Generator().manual_seed(0)
    sd = {
        k: (torch.randint(0, 5, s, generator=g) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g))
        for k, s in table.items()
    }
    load_state_strict(model, sd, "backbone.pth", "iresnet50")
    assert torch.equal(model.trunk.layer3[13].conv2.weight, sd["layer3.13.conv2.weight"])
    assert torch.equal(model.head.fc.weight, sd["fc.weight"])
    model.eval()
    with torch.no_grad():
        out = model.embed(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512)


@pytest.mark.parametrize(
    "depth,layers", [(18, (2, 2, 2, 2)), (34, (3, 4, 6, 3)), (100, (3, 13, 30, 3)), (200, (6, 26, 60, 6))]
)
def test_other_depths_match_table(depth, layers):
    assert published(build_iresnet(depth)) == dict(arcface_torch_table(layers))


def test_parameter_counts():
    counts = {d: sum(p.numel() for p in build_iresnet(d).parameters()) for d in (18, 34, 50, 100)}
    # exact, against the closed form written above
    assert counts[18] == closed_form_params((2, 2, 2, 2)) == 24_025_600
    assert counts[34] == closed_form_params((3, 4, 6, 3)) == 34_139_328
    assert counts[50] == closed_form_params((3, 4, 14, 3)) == 43_590_848
    assert counts[100] == closed_form_params((3, 13, 30, 3)) == 65_156_160
    # published cross-check (same LResNet-E-IR architecture, MXNet originals): OpenVINO Open Model
    # Zoo lists face-recognition-resnet100-arcface-onnx at 65.1320 MParams and
    # face-recognition-resnet34-arcface (LResNet34E-IR) at 34.129 MParams
    # (docs.openvino.ai/2021.4/omz_models_model_face_recognition_resnet100_arcface_onnx.html).
    assert abs(counts[100] - 65.132e6) / 65.132e6 < 1e-3
    assert abs(counts[34] - 34.129e6) / 34.129e6 < 1e-3


def test_features_bn_scale_frozen_and_init():
    m = build_iresnet(18, width=0.125)
    assert not m.head.features.weight.requires_grad
    assert torch.all(m.head.features.weight == 1)
    assert abs(m.trunk.layer2[0].conv1.weight.std().item() - 0.1) < 0.02


def test_width_multiplier_and_forward():
    m = build_iresnet(50, width=0.0625, embedding_size=32)
    assert m.trunk.conv1.weight.shape == (8, 3, 3, 3)  # 64·0.0625 = 4 → min 8
    assert m.trunk.layer4[0].conv2.weight.shape == (32, 32, 3, 3)  # 512·0.0625
    assert m.head.fc.weight.shape == (32, 32 * 49)
    m.eval()
    assert m.embed(torch.randn(2, 3, 112, 112)).shape == (2, 32)
    m.train()
    out = m(torch.randn(2, 3, 112, 112))
    assert not out.aux_losses  # a plain iresnet reports no aux loss
    out.embedding.sum().backward()
    assert m.trunk.conv1.weight.grad is not None


def test_input_size_144():
    m = build_iresnet(18, width=0.125, input_size=144)
    assert m.head.fc.in_features == 64 * 9 * 9
    m.eval()
    assert m.embed(torch.randn(1, 3, 144, 144)).shape == (1, 512)


def test_conv3x3_factory_used_for_every_3x3():
    calls = []

    class Marked(nn.Conv2d):
        pass

    def factory(cin, cout, stride):
        calls.append((cin, cout, stride))
        return Marked(cin, cout, 3, stride=stride, padding=1, bias=False)

    m = IResNetTrunk((2, 2, 2, 2), width=0.125, conv3x3=factory)
    n3x3 = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d) and mod.kernel_size == (3, 3)]
    assert len(calls) == 1 + 2 * 8 == len(n3x3)
    assert all(isinstance(c, Marked) for c in n3x3)
    assert calls[0] == (3, 8, 1)  # the stem
    # strides: the second conv of the first block of every stage
    assert [c[2] for c in calls].count(2) == 4
    # names unchanged
    assert {f"trunk.{k}" for k in m.state_dict()} == {
        k for k in build_iresnet(18, width=0.125).state_dict() if k.startswith("trunk.")
    }


def test_se_block_matches_formula():
    m = build_iresnet(50, width=0.125, se=True)
    blk = m.trunk.layer3[2]
    assert blk.se.fc1.weight.shape == (32 // 16, 32, 1, 1)
    x = torch.randn(2, 32, 7, 7)
    # Hu et al.: s = σ(W2 ReLU(W1 z)), z = global average; output x·s (per channel)
    z = x.mean(dim=(2, 3))
    s = torch.sigmoid(torch.relu(z @ blk.se.fc1.weight[:, :, 0, 0].T) @ blk.se.fc2.weight[:, :, 0, 0].T)
    torch.testing.assert_close(blk.se(x), x * s[:, :, None, None], rtol=1e-5, atol=1e-6)
    base = {k for k in build_iresnet(50, width=0.125).state_dict()}
    extra = set(m.state_dict()) - base
    assert extra and all(".se.fc" in k for k in extra)
    assert len(extra) == 2 * 24  # two 1×1 convs in each of the 3+4+14+3 blocks


def test_registry_builders():
    names = registry.backbone_names()
    for n in ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "se_iresnet50", "se_iresnet100"):
        assert n in names
    cfg = load_config(
        [],
        ["model.backbone=se_iresnet50", "model.width=0.0625", "model.head.embedding_size=64", "model.head.dropout=0.2"],
    )
    m = build_network(cfg.model)
    assert m.head.fc.out_features == 64 and m.head.dropout.p == 0.2 and hasattr(m.trunk.layer1[0], "se")
    m = build_network(
        load_config([], ["model.backbone=iresnet100", "model.width=0.0625", "model.input_size=144"]).model
    )
    assert len(m.trunk.layer2) == 13 and m.head.fc.in_features == 32 * 81


def test_points_are_where_the_spec_says():
    """Named points of the trunk: channels and spatial size of what flows there (LCD spec §1.1 table)."""
    from pipeline.models.iresnet import trunk_points

    pts = trunk_points((3, 4, 14, 3), 1.0, 112)
    assert list(pts) == [
        "stem",
        "layer1.branch",
        "layer1",
        "layer2.branch",
        "layer2",
        "layer3.branch",
        "layer3",
        "layer4.branch",
        "layer4",
        "out",
    ]
    assert (pts["layer3.branch"].channels, pts["layer3.branch"].spatial) == (256, 14)
    assert (pts["layer2"].channels, pts["layer2"].spatial) == (128, 28)
    assert (pts["out"].channels, pts["out"].spatial) == (512, 7)
    assert trunk_points((3, 4, 14, 3), 1.0, 144)["layer3"].spatial == 18
    # and the real trunk produces exactly these shapes
    m = build_iresnet(50, width=0.0625, input_size=112).eval()
    with torch.no_grad():
        feats = m.trunk(torch.randn(1, 3, 112, 112), None, frozenset({"stem", "layer2", "layer3"}))
    small = trunk_points((3, 4, 14, 3), 0.0625, 112)
    for name, f in feats.items():
        assert tuple(f.shape[1:]) == (small[name].channels, small[name].spatial, small[name].spatial), name
