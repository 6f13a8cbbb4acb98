"""Composable face models: trunk + conv kind + inserts + head, trained by any procedure (issue 8).

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_compose.py.
"""

from __future__ import annotations

import pytest
import torch

from pipeline import registry
from pipeline.config import ConfigError, load_config
from pipeline.models.network import build_network
from tests.helpers import REPO
from tests.support.compose import tiny


def images(n=4, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------- the network object


def test_forward_returns_aux_and_monitors_as_values_and_keeps_no_state():
    net = build_network(tiny().model).train()
    x1, x2 = images(seed=1), images(seed=2) * 3
    out1 = net(x1)
    assert out1.embedding.shape == (4, 64) and net.embedding_size == 64
    assert set(out1.aux_losses) == {"probe"}
    assert set(out1.monitors) >= {"probe/stem/mean_abs", "probe/layer3.branch/mean_abs", "probe/pooled_norm"}
    # each call reports its own values: probe = Σ_inserts weight · mean(input²), recomputed from hooks
    seen = []
    for m in net.modules():
        if type(m).__name__ == "ProbeGain":
            m.register_forward_hook(lambda mod, inp, out: seen.append(mod.weight * inp[0].detach().pow(2).mean()))
    for x in (x1, x2):
        seen.clear()
        got = net(x).aux_losses["probe"].detach()
        assert len(seen) == 2
        torch.testing.assert_close(got, torch.stack(seen).sum(), rtol=1e-6, atol=0)
    assert not torch.equal(net(x1).aux_losses["probe"], net(x2).aux_losses["probe"])
    # nothing was left on a module after the calls (no tensor attribute holding a graph)
    for m in net.modules():
        assert not any(torch.is_tensor(v) and v.grad_fn is not None for v in vars(m).values()), type(m).__name__
    # the aux loss is differentiable into the network
    out1.aux_losses["probe"].backward()
    assert net.trunk.conv1.weight.grad is not None
    # eval mode, or no grad: the embedding only
    net.eval()
    assert not net(x1).aux_losses and not net(x1).monitors
    torch.testing.assert_close(net.embed(x1), net.embedder()(x1))


def test_insert_sits_exactly_at_its_named_point():
    """A layer3.branch insert acts inside the last block of stage 3, after bn3 and before the shortcut:
    its input equals bn3's output there, and with a nonzero gain the block's output is
    bn3_out · (1 + g) + shortcut (checked by recomputing the block by hand)."""
    net = build_network(tiny().model).eval()
    block = net.trunk.layer3[-1]
    insert = block.branch.inserts[0]
    with torch.no_grad():
        insert.gain.copy_(torch.linspace(-0.5, 0.5, insert.gain.numel()))
    seen = {}
    block.bn3.register_forward_hook(lambda m, i, o: seen.__setitem__("bn3", o))
    block.register_forward_hook(lambda m, i, o: seen.__setitem__("block", (i[0], o)))
    with torch.no_grad():
        net(images())
        x_in, y = seen["block"]
        expected = seen["bn3"] * (1 + insert.gain.view(1, -1, 1, 1)) + x_in  # identity shortcut (stride 1)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    # sized from the point: stage 3 has 256·width channels (min 8) → 16 at width 0.0625
    assert insert.gain.numel() == 16
    assert net.trunk.after["stem"].inserts[0].gain.numel() == 8
    # no insert anywhere else
    assert [i for i, b in enumerate(net.trunk.layer3) if b.branch is not None] == [len(net.trunk.layer3) - 1]


def test_head_reads_the_points_it_asks_for_and_sets_the_classifier_width():
    cfg = tiny("model.head.embedding_size=24", "model.head.extra=layer2")
    recipe = registry.build_recipe(cfg)
    assert recipe.embedding_size == 24 == recipe.net.head.proj.out_features
    # out (128 ch at width 0.0625 → 32) + layer2 (128·0.0625 → 8)
    assert recipe.net.head.proj.in_features == 32 + 8
    with pytest.raises(ConfigError, match="model.head.extra"):
        registry.build_recipe(tiny("model.head.extra=layer9"))


def test_unknown_points_kinds_and_renamed_keys_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"model.inserts\[0\].at: 'layer5' is not a point of iresnet18"):
        build_network(tiny("model.inserts=[{kind: probe_gain, at: layer5}]").model)
    with pytest.raises(ConfigError, match=r"model.inserts\[0\].kind.*unknown insert 'nope'"):
        tiny("model.inserts=[{kind: nope, at: layer3}]")
    with pytest.raises(ConfigError, match="unknown head 'nohead'"):
        tiny("model.head.kind=nohead")
    with pytest.raises(ConfigError, match=r"model.inserts\[0\].weight"):
        tiny("model.inserts=[{kind: probe_gain, at: layer3, weight: -1}]")
    renamed = {
        "model: {embedding_size: 64}": "model.head.embedding_size",
        "model: {dropout: 0.1}": "model.head.dropout",
        "model: {options: {lsc: false}}": "model.conv",
        "recipe: scan": "model.conv: {kind: scan",
        "model: {backbone: scan_iresnet50}": "iresnet50 with model.conv: {kind: scan}",
        "method: {init_backbone: x}": "model.init_from",
    }
    for text, new in renamed.items():
        p = tmp_path / "old.yaml"
        p.write_text(text + "\n")
        with pytest.raises(ConfigError) as exc:
            load_config([p])
        msg = str(exc.value)
        assert "\n" not in msg and new in msg and str(p) in msg, msg
    with pytest.raises(ConfigError, match="plugins.*cannot import 'no_such_plugin'"):
        tiny("plugins=[no_such_plugin]")


def test_parts_register_themselves():
    assert {"plain", "scan"} <= set(registry.names("conv"))
    assert "fc" in registry.names("head") and {"margin", "lrfr"} <= set(registry.names("recipe"))
    assert {"iresnet18", "se_iresnet100"} <= set(registry.names("backbone"))
    # every module of the model and recipe packages is imported by discovery, not by a hand-kept list
    src = (REPO / "pipeline" / "registry.py").read_text()
    assert "pipeline.models.iresnet" not in src and "pipeline.models.scan" not in src
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("head", "fc")(lambda *a: None)


def test_trainer_eval_and_export_never_branch_on_part_names():
    """`git grep` for names of recipes, trunks, conv kinds and heads in the trainer, eval and export."""
    names = set(registry.names("recipe")) | set(registry.names("conv")) | set(registry.names("head"))
    names |= set(registry.names("backbone")) | {"scan", "lcd", "lgaf", "cqa"}
    files = [
        *(REPO / "pipeline" / "train").glob("*.py"),
        *(REPO / "pipeline" / "checkpoint").glob("*.py"),
        REPO / "pipeline" / "export.py",
        *(REPO / "pipeline" / "eval").glob("*.py"),
    ]
    for f in files:
        for line_no, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#")[0]
            for n in names:
                for quote in ('"', "'"):
                    assert f"{quote}{n}{quote}" not in code, f"{f.name}:{line_no} names '{n}': {line.strip()}"


def test_published_fc_state_dict_gives_bit_identical_embeddings():
    """An arcface_torch-format (flat names) state dict loads strictly into iresnet + fc head and the
    embedding equals an independent functional forward of that state dict, bit for bit."""
    import torch.nn.functional as F

    from pipeline.checkpoint import load_state_strict
    from pipeline.models.iresnet import build_iresnet

    net = build_iresnet(18, width=0.125, embedding_size=32, input_size=32)
    g = torch.Generator().manual_seed(0)
    flat = {}
    for k, v in net.state_dict().items():
        name = k.split(".", 1)[1]
        if name.endswith("num_batches_tracked"):
            flat[name] = torch.tensor(3)
        elif name.endswith("running_var"):
            flat[name] = torch.rand(v.shape, generator=g) + 0.5
        else:
            flat[name] = torch.randn(v.shape, generator=g) * 0.2
    assert "conv1.weight" in flat and "fc.weight" in flat and "features.running_mean" in flat
    load_state_strict(net, flat, "published.pth", "iresnet18")
    net.eval()

    def bn(x, p):
        return F.batch_norm(
            x,
            flat[p + ".running_mean"],
            flat[p + ".running_var"],
            flat[p + ".weight"],
            flat[p + ".bias"],
            False,
            0.0,
            1e-5,
        )

    def reference(x):  # arcface_torch IResNet.forward, written from the flat state dict
        x = F.prelu(bn(F.conv2d(x, flat["conv1.weight"], padding=1), "bn1"), flat["prelu.weight"])
        for li, n in enumerate((2, 2, 2, 2), start=1):
            for b in range(n):
                p = f"layer{li}.{b}"
                stride = 2 if b == 0 else 1
                out = bn(x, p + ".bn1")
                out = F.conv2d(out, flat[p + ".conv1.weight"], padding=1)
                out = F.prelu(bn(out, p + ".bn2"), flat[p + ".prelu.weight"])
                out = bn(F.conv2d(out, flat[p + ".conv2.weight"], stride=stride, padding=1), p + ".bn3")
                sc = x if b else bn(F.conv2d(x, flat[p + ".downsample.0.weight"], stride=stride), p + ".downsample.1")
                x = out + sc
        x = torch.flatten(bn(x, "bn2"), 1)
        x = F.linear(x, flat["fc.weight"], flat["fc.bias"])
        return F.batch_norm(
            x,
            flat["features.running_mean"],
            flat["features.running_var"],
            flat["features.weight"],
            flat["features.bias"],
            False,
            0.0,
            1e-5,
        )

    x = images(3, 32)
    with torch.no_grad():
        assert torch.equal(net.embed(x), reference(x))
    with pytest.raises(ConfigError, match="first mismatching key"):
        load_state_strict(net, {k: v for k, v in flat.items() if k != "fc.bias"}, "cut.pth", "iresnet18")


# --------------------------------------------------------------------------- end to end (real faces)
