"""LGAF and CQA-Face heads (issue 13), each piece against an independent computation (spec lgaf_cqa.md Part C).

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_lgaf_cqa.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import registry
from pipeline.config import ConfigError, ModelConfig, load_config, resolve_model
from pipeline.models.cqa import cal_loss, ld_loss, quality_scores, relation_vectors
from pipeline.models.lgaf import LocalGlobalFusion, MSNetHead, quality_score
from pipeline.models.network import Trace, build_network
from tests.helpers import REPO
from tests.support.lgaf_cqa import lgf, net_for

SMOKE = REPO / "configs" / "smoke.yaml"


def images(n=6, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------- LGAF: the LGF equations


def test_lgf_worked_example_eqs_6_9():
    """A.3: μ_l 20, σ_l 10, μ_g 25, σ_g 5, Z_l = [10, 20, 30], Z_g = 25 → Ẑ_l = [0.667, 1, 1.333], γ_l = Ẑ_l/(Ẑ_l + 1)."""
    z = torch.tensor([[10.0, 25.0], [20.0, 25.0], [30.0, 25.0]])
    gamma, zhat, _ = lgf().eval()(z)
    np.testing.assert_allclose(zhat[:, 0].numpy(), [0.667, 1.0, 1.333], atol=1e-6)
    np.testing.assert_allclose(zhat[:, 1].numpy(), [1.0, 1.0, 1.0], atol=1e-6)
    # exactly 0.667/1.667 and 1.333/2.333; the spec prints 0.40008 and 0.57135, off by 4e-5 (its arithmetic slip)
    np.testing.assert_allclose(gamma[:, 0].numpy(), [0.667 / 1.667, 0.5, 1.333 / 2.333], atol=1e-6)
    np.testing.assert_allclose(gamma[:, 0].numpy(), [0.40008, 0.5, 0.57135], atol=5e-5)
    np.testing.assert_allclose(gamma.sum(1).numpy(), 1.0, atol=1e-6)
    # the default σ + 1e-3 (AdaFace) moves these by < 1e-4
    gamma_eps, _, _ = lgf(std_eps=1e-3).eval()(z)
    assert float((gamma_eps - gamma).abs().max()) < 1e-4
    # clip at |h·z| = 1 (|z| ≥ 3.003) and both Ẑ = 0 (A.7-6): γ = 0.5 / 0.5, finite
    far = torch.tensor([[100.0, 25.0], [-20.0, -10.0]])
    gamma_far, zhat_far, _ = lgf().eval()(far)
    assert zhat_far[0, 0] == 2.0 and zhat_far[1].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(gamma_far[1].numpy(), [0.5, 0.5], atol=1e-6)


def test_lgf_ema_update_then_normalise():
    """Eqs. 7–8: μ ← 0.01·batch + 0.99·μ (μ 20, batch mean 30 → 20.1); σ with the unbiased batch std; the
    training forward normalises with the *updated* statistics (AdaFace's order)."""
    m = lgf(mean=(20.0, 20.0), std=(10.0, 10.0)).train()
    z = torch.tensor([[28.0, 20.0], [30.0, 20.0], [32.0, 20.0]])
    gamma, _, hz = m(z)
    assert m.ema_mean.tolist() == pytest.approx([20.1, 20.0], abs=1e-5)
    batch_std = float(torch.tensor([28.0, 30.0, 32.0]).std())  # 2.0 (unbiased)
    assert m.ema_std.tolist() == pytest.approx([0.99 * 10 + 0.01 * batch_std, 0.99 * 10], abs=1e-5)
    expected_hz = 0.333 * (z[:, 0] - 20.1) / (0.99 * 10 + 0.01 * batch_std)
    np.testing.assert_allclose(hz[:, 0].numpy(), expected_hz.numpy(), atol=1e-6)


def test_kappa_is_eq10_and_no_gradient_flows_through_gamma():
    net = net_for({"kind": "lgaf", "embedding_size": 16, "heads": 4}).train()
    head = net.head
    f_loc = (torch.randn(5, 16, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    f_glob = (torch.randn(5, 16, generator=torch.Generator().manual_seed(1)) * 5).requires_grad_()
    before = (head.lgf.ema_mean.clone(), head.lgf.ema_std.clone())
    kappa = head.fuse(f_loc, f_glob)
    # independent γ: the same eqs. with the updated buffers, in numpy
    mu = 0.99 * before[0].numpy() + 0.01 * np.array([f_loc.norm(dim=1).mean().item(), f_glob.norm(dim=1).mean().item()])
    z = np.stack([f_loc.detach().norm(dim=1).numpy(), f_glob.detach().norm(dim=1).numpy()], 1)
    sd = 0.99 * before[1].numpy() + 0.01 * z.std(axis=0, ddof=1)
    zhat = np.clip(0.333 * (z - mu) / (sd + 1e-3), -1, 1) + 1
    g = zhat / zhat.sum(1, keepdims=True)
    expected = g[:, :1] * f_loc.detach().numpy() + g[:, 1:] * f_glob.detach().numpy()
    np.testing.assert_allclose(kappa.detach().numpy(), expected, atol=1e-5)
    # d(Σκ)/d f_loc = γ_l exactly: γ is a per-sample constant (detached Z)
    kappa.sum().backward()
    np.testing.assert_allclose(f_loc.grad.numpy(), np.repeat(g[:, :1], 16, 1), atol=1e-6)
    # with detach_quality: false the norm's gradient reaches f_loc through γ too
    net2 = net_for({"kind": "lgaf", "embedding_size": 16, "heads": 4, "detach_quality": False}).train()
    f2 = f_loc.detach().clone().requires_grad_()
    net2.head.fuse(f2, f_glob.detach()).sum().backward()
    assert float((f2.grad - f_loc.grad).abs().max()) > 1e-4


def test_eval_never_touches_the_buffers_and_training_does():
    net = net_for({"kind": "lgaf", "embedding_size": 16, "heads": 2})
    buffers = lambda: torch.cat([net.head.lgf.ema_mean, net.head.lgf.ema_std]).clone()  # noqa: E731
    start = buffers()
    net.eval()
    with torch.no_grad():
        a = net.embed(images())
        b = net.embed(images())
    assert torch.equal(buffers(), start) and torch.equal(a, b)
    net.train()
    out = net(images())
    assert not torch.equal(buffers(), start)
    assert {"lgaf/gamma_l_mean", "lgaf/ema_mu_l", "lgaf/cos_loc_glob", "lgaf/lanet_scale3_entropy"} <= set(out.monitors)
    assert out.histograms["lgaf/gamma_l"].shape == (6,) and not out.aux_losses  # LGAF has no auxiliary loss


def test_buffers_round_trip_through_model_pt_and_onnx(tmp_path):
    import onnxruntime as ort

    from pipeline.export import export_onnx

    net = net_for({"kind": "lgaf", "embedding_size": 16, "heads": 2})
    net.train()
    for seed in range(3):  # move the EMA away from its init
        net(images(seed=seed))
    net.eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    fresh = net_for({"kind": "lgaf", "embedding_size": 16, "heads": 2})
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    fresh.eval()
    assert torch.equal(fresh.head.lgf.ema_mean, net.head.lgf.ema_mean)
    x = images(seed=9)
    with torch.no_grad():
        ref = net.embed(x)
        torch.testing.assert_close(fresh.embed(x), ref, rtol=0, atol=0)
    export_onnx(net.embedder(), tmp_path / "lgaf.onnx", 32)
    sess = ort.InferenceSession(str(tmp_path / "lgaf.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["embedding"], {"image": x.numpy()})[0]
    assert np.abs(got - ref.numpy()).max() < 1e-4 * max(1.0, float(ref.abs().max()))
    # the buffers are in the graph: other statistics give another embedding
    with torch.no_grad():
        net.head.lgf.ema_mean.add_(5.0)
        assert float((net.embed(x) - ref).abs().max()) > 1e-3


def test_lanet_map_is_spatial_and_gap_se_equals_se_gap():
    torch.manual_seed(0)
    head = MSNetHead(32, 8, (1, 3, 5), 4, lanet_reduction=4, lanet_bn=True, se_reduction=4, factorize=False).eval()
    x = torch.randn(3, 32, 7, 7)
    out, maps, gates = head(x)
    assert all(m.shape == (3, 1, 7, 7) for m in maps)  # eq. 11 as a *spatial* map
    assert all(float(m.detach().std(dim=(2, 3)).min()) > 0 for m in maps)  # not constant over positions
    # reference: SE on the concatenated (N, |K|·c_s, H, W) map, then GAP, then the projection (the order of Fig. 2)
    l_maps = torch.cat([conv(x) * lanet(conv(x)) for conv, lanet in zip(head.scales, head.lanets)], dim=1)
    squeeze = l_maps.mean(dim=(2, 3))
    gate_ref = torch.sigmoid(head.se(squeeze))
    se_map = l_maps * gate_ref[:, :, None, None]
    ref = head.bn(head.proj(se_map.mean(dim=(2, 3))))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gates, gate_ref)


def test_entropy_quality_is_the_gaussian_entropy():
    f = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)) * torch.tensor([[0.5], [1.0], [2.0], [4.0]])
    var = f.double().var(dim=1).numpy()
    np.testing.assert_allclose(quality_score(f, "entropy").numpy(), 0.5 * np.log(2 * math.pi * math.e * var), rtol=1e-5)
    np.testing.assert_allclose(quality_score(f, "norm").numpy(), f.norm(dim=1).numpy(), rtol=1e-6)


# --------------------------------------------------------------------------- CQA-Face: the losses on the maps


def test_cal_on_hand_made_maps_b3_values():
    """B.3: identical maps → 1 − t = 0.8; maps apart by δ everywhere → k = exp(−δ²/σ); the hinge is off beyond
    δ* = √(σ·ln(1/t)) = 0.1269."""
    ones = torch.full((2, 4, 7, 7), 0.5)
    assert float(cal_loss(ones)) == pytest.approx(0.8, abs=1e-6)
    delta_star = math.sqrt(0.01 * math.log(5))
    assert delta_star == pytest.approx(0.1269, abs=1e-4)
    for delta in (0.05, 0.12, 0.13, 0.3):
        maps = torch.stack([torch.full((7, 7), 0.2), torch.full((7, 7), 0.2 + delta)])[None]  # b = 2
        expected = max(0.0, math.exp(-(delta**2) / 0.01) - 0.2)
        assert float(cal_loss(maps)) == pytest.approx(expected, abs=1e-6)
        # 'sum' = σ/hw: the pair must be far closer to fire; 'elementwise' = the same here (constant δ)
        assert float(cal_loss(maps, distance="sum")) == pytest.approx(
            max(0.0, math.exp(-49 * delta**2 / 0.01) - 0.2), abs=1e-6
        )
        assert float(cal_loss(maps, distance="elementwise")) == pytest.approx(expected, abs=1e-6)
    assert float(cal_loss(torch.stack([torch.full((7, 7), 0.2), torch.full((7, 7), 0.33)])[None])) == 0.0
    # b = 3, one pair identical, two far apart: mean over the 3 pairs
    three = torch.stack([torch.zeros(7, 7), torch.zeros(7, 7), torch.ones(7, 7)])[None]
    assert float(cal_loss(three)) == pytest.approx(0.8 / 3, abs=1e-6)
    # the gradient is 0 at d = 0 but not for slightly different maps (branches must not start identical)
    m = torch.stack([torch.full((7, 7), 0.5), torch.full((7, 7), 0.52)])[None].requires_grad_()
    cal_loss(m).backward()
    assert float(m.grad.abs().max()) > 1e-3


def test_ld_loss_eq3_on_hand_made_maps():
    a, b = torch.zeros(7, 7), torch.zeros(7, 7)
    b[0, 0] = 0.1  # ‖M_1 − M_2‖₂ = 0.1
    assert float(ld_loss(torch.stack([a, b])[None])) == pytest.approx(0.2 - 0.1, abs=1e-6)
    b[0, 1] = 0.3  # ‖·‖ = √0.1 = 0.316 > t
    assert float(ld_loss(torch.stack([a, b])[None])) == 0.0


def test_relation_vectors_and_the_head_match_an_explicit_loop():
    a = torch.randn(2, 4, 4)
    r = relation_vectors(a)
    for n in range(2):
        for i in range(4):
            col = [float(a[n, i, j]) for j in range(4)] + [float(a[n, j, i]) for j in range(4)]
            assert r[n, :, i].tolist() == pytest.approx(col)
    # the whole head in eval, against eqs. 1, 4–7 written as a loop over branches and nodes
    net = net_for({"kind": "cqa", "embedding_size": 16, "branches": 3}).eval()
    head = net.head
    x = torch.randn(2, 64, 2, 2)
    with torch.no_grad():
        emb = head({"out": x})
        parts = [(x * lanet(x)).mean(dim=(2, 3)) for lanet in head.lanets]  # eq. 1 + GAP
        q = head.qan
        phi = [q.phi(p[:, :, None])[:, :, 0] for p in parts]
        vphi = [q.varphi(p[:, :, None])[:, :, 0] for p in parts]
        A = torch.stack([torch.stack([(phi[i] * vphi[j]).sum(1) for j in range(3)], 1) for i in range(3)], 1)  # eq. 4
        scores = []
        for i in range(3):
            rel = torch.cat([A[:, i, :], A[:, :, i]], dim=1)  # R_i
            s = q.theta(torch.cat([q.mu(parts[i][:, :, None]), q.nu(rel[:, :, None])], dim=1))  # eq. 5 per node
            scores.append(torch.sigmoid(s[:, 0, 0]))  # eq. 6
        scaled = torch.cat([scores[i][:, None] * parts[i] for i in range(3)], dim=1)  # eq. 7, concat
        ref = head.features(head.fc(scaled))
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    # quality_scores (the fidelity report's Ŝ) are the eq. 6 scores
    net.eval()
    qs = quality_scores(net, images(n=3))
    assert qs.shape == (3, 3) and float(qs.min()) > 0 and float(qs.max()) < 1


def test_cqa_training_forward_reports_cal_and_monitors():
    torch.manual_seed(0)  # an initialisation whose maps are close enough for CAL's hinge to be active
    net = net_for({"kind": "cqa", "embedding_size": 16}).train()
    out = net(images())
    raw = out.monitors["cqa/loss_cal"]
    assert raw > 0  # else the gradient check below could not fail for the right reason
    assert float(out.aux_losses["cal"].detach()) == pytest.approx(0.5 * float(raw))  # eq. 9: λ = 0.5
    assert {"cqa/q_spread", "cqa/cal_active_frac", "cqa/attn3_entropy", "cqa/A_asym"} <= set(out.monitors)
    assert out.histograms["cqa/q0"].shape == (6,)
    out.aux_losses["cal"].backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.head.lanets.parameters())
    ld = net_for({"kind": "cqa", "embedding_size": 16, "diversity": "ld"}).train()(images())
    assert set(ld.aux_losses) == {"ld"}
    none = net_for({"kind": "cqa", "embedding_size": 16, "diversity": "dropout", "qan": False}).train()(images())
    assert not none.aux_losses and "cqa/q_spread" not in none.monitors


# --------------------------------------------------------------------------- sizes, config, composition


def count(head: dict, backbone: str) -> float:
    cfg = ModelConfig(backbone=backbone, head=head)
    resolve_model(cfg, {})
    with torch.device("meta"):
        net = build_network(cfg)
    return sum(p.numel() for p in net.parameters()) / 1e6


def test_parameter_counts_equal_the_spec():
    """§A.9 / §B.9 (M parameters, the spec's rounding). Exact: iresnet100 fc 65,156,160; + LGAF b=4 74,619,768;
    CQA R100 53,524,540 (the spec prints 53.53: 460 parameters short of its rounding — e.g. a bias on the final
    FC, which B.1 rules out — we follow B.1's text)."""
    r100 = count({"kind": "fc"}, "iresnet100")
    assert round(r100, 2) == 65.16
    assert round(count({"kind": "lgaf"}, "iresnet100") - r100, 2) == 9.46
    for heads, extra in ((2, 9.75), (8, 9.32), (16, 9.25)):
        assert round(count({"kind": "lgaf", "heads": heads}, "iresnet100") - r100, 2) == extra
    assert round(count({"kind": "lgaf", "kernels": [1, 3]}, "iresnet100") - r100, 2) == 2.80
    assert round(count({"kind": "lgaf"}, "iresnet50") - count({"kind": "fc"}, "iresnet50"), 2) == 9.46
    # the spec counts the BN1d after the FC (out_bn: true); the paper's head, now the default, has 2·512 fewer
    assert count({"kind": "cqa", "out_bn": True}, "iresnet100") == pytest.approx(53.53, abs=0.006)
    assert (
        round(count({"kind": "cqa"}, "iresnet100") * 1e6)
        == round(count({"kind": "cqa", "out_bn": True}, "iresnet100") * 1e6) - 1024
    )
    for b, total in ((2, 52.97), (8, 54.64), (16, 56.87)):
        assert round(count({"kind": "cqa", "branches": b, "out_bn": True}, "iresnet100"), 2) == total
    assert round(count({"kind": "cqa", "out_bn": True}, "iresnet50"), 2) == 31.96


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.head.heads=3", "model.head.embedding_size"),
        ("model.head.fusion=mul", "model.head.fusion"),
        ("model.head.kernels=[1,2]", "model.head.kernels"),
        ("model.head.quality=max", "model.head.quality"),
    ],
)
def test_lgaf_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config([REPO / "configs" / "lgaf_r100.yaml", SMOKE], [override])
    msg = str(err.value)
    assert key in msg and "\n" not in msg


@pytest.mark.parametrize(
    "override, key",
    [("model.head.branches=1", "model.head.branches"), ("model.head.cal_distance=max", "model.head.cal_distance")],
)
def test_cqa_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config([REPO / "configs" / "cqa_r100.yaml", SMOKE], [override])
    assert key in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "config, terms",
    [
        ("compose/scan_lgaf.yaml", {"rmo"}),  # SCAN's RMO survives next to the LGAF head
        ("compose/scan_cqa.yaml", {"rmo", "cal"}),
        ("compose/lcd_lgaf.yaml", {"sr_filter", "sr_response"}),  # LCD inside the trunk, LGAF on top
        ("compose/lcd_cqa.yaml", {"sr_filter", "sr_response", "cal"}),
        ("compose/lrfr_cqa.yaml", {"cal", "dist"}),  # CQA's CAL under LRFR's paired views
        ("compose/lrfr_lgaf.yaml", {"dist"}),
    ],
)
def test_heads_compose_with_scan_and_lrfr_by_yaml_alone(config, terms):
    cfg = load_config([REPO / "configs" / config, SMOKE], ["model.input_size=32", "model.head.embedding_size=16"])
    recipe = registry.build_recipe(cfg).train()
    batch = {
        "image": images(4),
        "label": torch.arange(4),
        "image_lr": images(4, seed=1),
        "lr_size": torch.tensor([7, 14, 20, 20]),
    }
    out = recipe(batch)
    assert terms <= set(out.aux_losses)
    assert any(k.startswith(("lgaf/", "cqa/")) for k in out.scalars)
    loss = sum(h.embeddings.sum() for h in out.heads.values()) + sum(out.aux_losses.values())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in recipe.parameters() if p.grad is not None)


def test_attention_png_from_a_probe_trace(tmp_path):
    net = net_for({"kind": "cqa", "embedding_size": 16})
    net.on_checkpoint(tmp_path, 3, images(4))
    png = tmp_path / "attention_maps.png"
    assert png.stat().st_size > 5000
    trace = net.probe(images(4))
    assert set(trace.maps) == {"M0", "M1", "M2", "M3"} and trace.maps["M0"].shape == (4, 1, 2, 2)
    assert isinstance(trace, Trace) and net.training  # probing restores the mode
    lg = net_for({"kind": "lgaf", "embedding_size": 16, "heads": 2}, input_size=64)
    lg.eval()
    t2 = lg.probe(images(2, size=64))
    assert set(t2.maps) == {f"h{k}k{j}" for k in range(2) for j in (1, 3, 5)} and "gamma_l" in t2.sample_values
    assert F.mse_loss(t2.sample_values["gamma_l"], torch.full((2,), 0.5)) < 0.1


def test_sample_values_diagnostic_means_the_probe_values_per_eval_set(tmp_path):
    """The ablation runner's ``sample_values``: per set, the mean of each per-sample value (here CQA's Ŝ_i) over
    its images, equal to quality_scores on the same images; nothing for the fc head."""
    from pipeline.eval.embed import to_model_input
    from pipeline.eval.sets import EvalSet, load_bin
    from pipeline.experiments.diagnostics import DiagnosticContext, sample_values
    from pipeline.faces.io import encode_png, write_bin

    rng = np.random.default_rng(0)
    faces = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
    write_bin(tmp_path / "tiny.bin", [encode_png(f) for f in faces], [True, False, True])
    eval_set = EvalSet.from_bin(str(tmp_path / "tiny.bin"), name="tiny")
    net = net_for({"kind": "cqa", "embedding_size": 16}).eval()
    ctx = DiagnosticContext(tmp_path, [eval_set], torch.device("cpu"), 32, {})
    got = sample_values(net, None, ctx)
    expected = quality_scores(net, to_model_input(load_bin(tmp_path / "tiny.bin", 32)[0])).mean(dim=0)
    assert set(got) == {f"q{i}/tiny" for i in range(4)}
    np.testing.assert_allclose([got[f"q{i}/tiny"] for i in range(4)], expected.numpy(), atol=1e-6)
    assert sample_values(net_for({"kind": "fc", "embedding_size": 16}).eval(), None, ctx) == {}


def test_norm_weight_decay_false_excludes_every_normalisation_parameter():
    from pipeline.train.build import norm_parameter_names, param_groups

    net = net_for({"kind": "lgaf", "embedding_size": 16, "heads": 2})
    names = norm_parameter_names(net)
    bn_params = {
        f"{m}.{p}"
        for m, mod in net.named_modules()
        if isinstance(mod, torch.nn.modules.batchnorm._NormBase)
        for p, _ in mod.named_parameters(recurse=False)
    }
    assert names == bn_params and "trunk.bn1.weight" in names and "head.msnet.0.bn.bias" in names
    groups = param_groups(net, names, 5e-4)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0
    assert all((id(p) in no_decay) == (n in names) for n, p in net.named_parameters() if p.requires_grad)


def test_lgf_statistics_stay_float32_in_a_bf16_network():
    """Under bf16 the trainer casts buffers (BatchNorm needs them in its dtype) but not LGAF's EMA: a bf16 μ near
    20 has a step of 0.125, so the α = 0.01 update of eq. 7 (≈ 0.1 here) would round away."""
    from pipeline.train.engine import cast_buffers

    net = net_for({"kind": "lgaf", "embedding_size": 16, "heads": 2}).to(torch.bfloat16)
    cast_buffers(net, torch.bfloat16)
    assert net.trunk.bn1.running_mean.dtype == torch.bfloat16
    assert net.head.lgf.ema_mean.dtype == torch.float32 and net.head.lgf.ema_std.dtype == torch.float32
    before = net.head.lgf.ema_mean.clone()
    out = net.train()(images().to(torch.bfloat16))
    assert out.embedding.dtype == torch.bfloat16
    after = net.head.lgf.ema_mean
    assert float((after - before).abs().min()) > 0
    assert not torch.equal(after, after.to(torch.bfloat16).float())  # values a bf16 buffer could not hold


# --------------------------------------------------------------------------- issue 23: EMA init, CQA's out_bn


def test_ema_init_first_batch_seeds_the_statistics_then_averages():
    """first_batch: step 1 sets μ, σ to that batch's (unbiased) statistics; later steps are eqs. 7–8 as before;
    adaface keeps [20, 100] and its update; an explicit [μ, σ] list (old checkpoints' configs) still works."""
    z1 = torch.tensor([[28.0, 40.0], [30.0, 44.0], [32.0, 48.0]])
    z2 = torch.tensor([[10.0, 20.0], [20.0, 30.0]])
    seeded = LocalGlobalFusion(h=0.333, alpha=0.01, init="first_batch", std_eps=1e-3).train()
    assert seeded.ema_mean.tolist() == [20.0, 20.0] and not bool(seeded.ema_seeded)
    _, zhat, hz = seeded(z1)
    torch.testing.assert_close(seeded.ema_mean, z1.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(seeded.ema_std, z1.std(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(hz, 0.333 * (z1 - z1.mean(0)) / (z1.std(0) + 1e-3))  # full-size z from step 1
    seeded(z2)
    torch.testing.assert_close(seeded.ema_mean, 0.99 * z1.mean(0) + 0.01 * z2.mean(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(seeded.ema_std, 0.99 * z1.std(0) + 0.01 * z2.std(0), rtol=0, atol=1e-5)
    ada = LocalGlobalFusion(h=0.333, alpha=0.01, init="adaface", std_eps=1e-3).train()
    listed = LocalGlobalFusion(h=0.333, alpha=0.01, init=[20.0, 100.0], std_eps=1e-3).train()
    assert "ema_seeded" not in ada.state_dict() and set(ada.state_dict()) == set(listed.state_dict())
    for m in (ada, listed):
        m(z1)
        torch.testing.assert_close(m.ema_mean, 0.99 * 20.0 + 0.01 * z1.mean(0), rtol=0, atol=1e-5)
    # the state dict carries the flag: a resumed first_batch run does not re-seed
    fresh = LocalGlobalFusion(h=0.333, alpha=0.01, init="first_batch", std_eps=1e-3)
    fresh.load_state_dict(seeded.state_dict())
    assert bool(fresh.ema_seeded)
    for bad in ("zero", [1.0], [20.0, 0.0]):
        with pytest.raises(ConfigError, match="model.head.ema_init"):
            load_config([REPO / "configs/lgaf_r100.yaml"], [f"model.head.ema_init={bad}"])


def test_cqa_head_is_the_papers_by_default_and_out_bn_is_a_switch():
    net = net_for({"kind": "cqa", "embedding_size": 16})
    assert isinstance(net.head.features, torch.nn.Identity)  # concat → FC → the classifier (no BN1d)
    assert isinstance(
        net_for({"kind": "cqa", "embedding_size": 16, "out_bn": True}).head.features, torch.nn.BatchNorm1d
    )
    floor, why = net.monitor_floors()["cqa/q_spread"]
    assert list(net.monitor_floors()) == ["cqa/q_spread"] and floor == 2e-3 and "collapsed" in why
    assert net_for({"kind": "cqa", "qan": False}).monitor_floors() == {}  # no quality scores, nothing to watch
    assert net_for({"kind": "fc"}).monitor_floors() == {}


def test_a_collapsed_quality_head_is_warned_about_once():
    """Ŝ saturated at 0 (θ's bias driven very negative, what the out_bn collapse ends in): q_spread falls under
    the floor and the trainer's floor check prints one line naming the monitor, once."""
    from pipeline.train.metrics import floor_warnings

    net = net_for({"kind": "cqa", "embedding_size": 16}).train()
    last = [m for m in net.head.qan.theta.modules() if isinstance(m, torch.nn.Conv1d)][-1]
    with torch.no_grad():
        last.bias.fill_(-40.0)
    out = net(images(8))
    q_spread = float(out.monitors["cqa/q_spread"])
    floors = net.monitor_floors()
    assert q_spread < floors["cqa/q_spread"][0]
    warned: set[str] = set()
    lines = floor_warnings(floors, {"monitor/cqa/q_spread": q_spread}, warned, 12)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("[train] warning: step 12: monitor/cqa/q_spread = ") and "collapsed" in lines[0]
    assert floor_warnings(floors, {"monitor/cqa/q_spread": q_spread}, warned, 13) == []  # once
    healthy = net_for({"kind": "cqa", "embedding_size": 16}).train()
    assert floor_warnings(floors, dict(monitor=0), set(), 1) == []
    assert float(healthy(images(8)).monitors["cqa/q_spread"]) > floors["cqa/q_spread"][0]
