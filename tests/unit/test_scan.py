"""SCAN-CNN: SAC kernel (eqs. 2, 4) vs scipy, LSC (eq. 8), RMO (eq. 6) and its efficient gradient
(App. E), folding (eq. 5) against the plain IResNet, and the recipe's contract.

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_scan.py.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.signal import convolve2d, correlate2d

from pipeline import registry
from pipeline.config import ConfigError, load_config
from pipeline.models.iresnet import build_iresnet
from pipeline.models.network import Trace, build_network
from pipeline.models.scan import ScaleAttentionConv, _ConvWithNorm, build_scan_iresnet, fold, rmo_per_sample, sac_layers


def with_rmo(layer, x):
    """(output, the layer's reported RMO term or None) of one call with a fresh trace."""
    trace = Trace()
    y = layer(x, trace)
    return y, trace.aux_losses().get("rmo")


TINY = dict(width=0.0625, embedding_size=16, input_size=32)


def _randomise_t(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in sac_layers(model):
            if m.sac:
                m.scale_raw.copy_(torch.randn(m.scale_raw.shape, generator=g) * 1.5)


def _randomise_bn(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _gauss_eq2(t: float, sum1: bool = False) -> np.ndarray:
    """Eq. 2, D = 2, sampled on the 5×5 integer grid (independent of the module's separable form)."""
    d = np.arange(-2, 3, dtype=np.float64)
    r2 = d[:, None] ** 2 + d[None, :] ** 2
    g = np.exp(-r2 / (2 * t))
    return g / g.sum() if sum1 else g / (2 * np.pi * t)


# --------------------------------------------------------------------------- SAC kernel


def test_t_initialised_to_one_and_positive():
    m = ScaleAttentionConv(4, 5)
    assert torch.allclose(m.t, torch.ones(5), atol=1e-6)
    with torch.no_grad():
        m.scale_raw.fill_(-200.0)  # far below: t stays at its floor, finite gradient
    assert torch.all(m.t >= m.t_min) and torch.all(m.t > 0)
    m.kernel().sum().backward()
    assert torch.isfinite(m.scale_raw.grad).all()


@pytest.mark.parametrize("sum1", [False, True])
@pytest.mark.parametrize("gamma_m", [1.0, 0.5])
def test_scaled_kernel_matches_scipy_same_convolution(sum1, gamma_m):
    torch.manual_seed(0)
    m = ScaleAttentionConv(3, 6, sac=True, lsc=False, gamma_m=gamma_m, gaussian_sum1=sum1).double()
    with torch.no_grad():
        m.scale_raw.copy_(torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.5, 3.0], dtype=torch.float64))
    t = m.t.detach().numpy()
    k = m.weight.detach().numpy()
    ks = m.scaled_kernel().detach().numpy()
    for o in range(6):
        g = _gauss_eq2(t[o], sum1)
        np.testing.assert_allclose(m.gaussian()[o].detach().numpy(), g, rtol=1e-12, atol=1e-14)
        for i in range(3):
            # eq. 4: t^γm (k ⊛ g); 'same' = centre 3×3 of the full 7×7 convolution
            full = convolve2d(k[o, i], g, mode="full")
            ref = t[o] ** gamma_m * full[2:5, 2:5]
            np.testing.assert_allclose(ks[o, i], ref, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(
                ks[o, i], t[o] ** gamma_m * convolve2d(k[o, i], g, mode="same"), rtol=1e-10, atol=1e-12
            )


def test_gaussian_eq2_not_renormalised_and_small_t_limit():
    m = ScaleAttentionConv(1, 2, lsc=False).double()
    with torch.no_grad():
        m.scale_raw.copy_(torch.tensor([0.5397, -30.0], dtype=torch.float64))
    g = m.gaussian().detach()
    # t = 1: sum of 5×5 samples of the unit-mass density = (Σ_d e^{-d²/2}/√(2π))²
    s1 = sum(math.exp(-d * d / 2) for d in range(-2, 3)) ** 2 / (2 * math.pi)
    assert abs(float(g[0].sum()) - s1) < 1e-3 and abs(s1 - 0.9818) < 1e-3
    # t → t_min: t·g(0;t) = 1/(2π), so k_s → k/(2π) (SAC reduces to a plain conv, Sec. 6.2)
    ks = m.scaled_kernel().detach()[1]
    assert torch.allclose(ks, m.weight.detach()[1] / (2 * math.pi), atol=1e-12)


def test_lsc_and_forward_equal_two_independent_convolutions():
    torch.manual_seed(1)
    m = ScaleAttentionConv(3, 4, stride=2, sac=True, lsc=True, rmo=False).double().eval()
    _randomise_t(m)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    t = m.t.detach().numpy()
    k, ki = m.weight.detach().numpy(), m.weight_i.detach().numpy()
    xs = x.numpy()
    out = m(x).detach().numpy()
    # eq. 8: k_s ⊛ f + k_i ⊛ f, each computed with scipy (cross-correlation, as nn.Conv2d), pad 1, stride 2
    for n in range(2):
        for o in range(4):
            acc = np.zeros((9, 9))
            for i in range(3):
                ks = t[o] * convolve2d(k[o, i], _gauss_eq2(t[o]), mode="same")
                xp = np.pad(xs[n, i], 1)
                acc += correlate2d(xp, ks, mode="valid") + correlate2d(xp, ki[o, i], mode="valid")
            np.testing.assert_allclose(out[n, o], acc[::2, ::2], rtol=1e-10, atol=1e-10)


def test_switches_are_independent():
    sac_only = ScaleAttentionConv(2, 3, sac=True, lsc=False, rmo=False)
    assert {n for n, _ in sac_only.named_parameters()} == {"weight", "scale_raw"}
    lsc_only = ScaleAttentionConv(2, 3, sac=False, lsc=True, rmo=True)
    assert {n for n, _ in lsc_only.named_parameters()} == {"weight", "weight_i"}
    assert torch.equal(lsc_only.kernel(), lsc_only.weight + lsc_only.weight_i)
    plain = build_scan_iresnet(18, sac=False, lsc=False, rmo=False, **TINY)
    ref = build_iresnet(18, **TINY)
    assert not sac_layers(plain)
    assert [(n, p.shape) for n, p in plain.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert not plain.train()(torch.rand(2, 3, 32, 32)).aux_losses
    full = build_scan_iresnet(18, **TINY)
    n_sac = len(sac_layers(full))
    assert n_sac == 1 + 2 * 8  # stem + 2 convs × 8 blocks: every 3×3 conv, no 1×1 downsample conv
    assert all(m.kernel_size == 3 for _, m in sac_layers(full))


# --------------------------------------------------------------------------- RMO


def test_rmo_value_matches_eq6():
    torch.manual_seed(2)
    for efficient in (True, False):
        m = ScaleAttentionConv(3, 4, rmo=True, efficient_rmo=efficient, rmo_lambda=0.7).double().train()
        x = torch.randn(3, 3, 6, 5, dtype=torch.float64)
        y, loss = with_rmo(m, x)
        y = y.detach().numpy()
        ref = np.mean([math.exp(-0.7 * np.sqrt((y[n] ** 2).sum()) / (6 * 5)) for n in range(3)])
        assert abs(float(loss.detach()) - ref) < 1e-12
        assert with_rmo(m, x)[1] is not None  # reported again by the next call: nothing was consumed
        assert m(x).shape == y.shape  # no trace: no RMO term, nothing kept
    m.rmo_weight = 0.25
    torch.testing.assert_close(with_rmo(m, x)[1], 0.25 * loss, rtol=1e-6, atol=0)
    m.eval()
    assert with_rmo(m, x)[1] is None  # no RMO term in eval mode


def test_conv_with_norm_gradcheck():
    torch.manual_seed(3)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    # w.r.t. the weight, with x a constant, the Function's gradient is the true one for y and ‖y[n]‖
    torch.autograd.gradcheck(lambda w: _ConvWithNorm.apply(x, w, (1, 1), (1, 1)), (w,), fast_mode=True)
    # ... and for eq. 6's L = mean exp(-λ‖y‖/HW) built on the norm
    torch.autograd.gradcheck(
        lambda w: torch.exp(_ConvWithNorm.apply(x, w, (1, 1), (1, 1))[1] * (-1.3 / 25)).mean(), (w,), fast_mode=True
    )
    # y alone: gradients w.r.t. x and w are conv2d's
    xg = x.clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda x, w: _ConvWithNorm.apply(x, w, (2, 2), (1, 1))[0], (xg, w), fast_mode=True)


def _two_layer(efficient: bool, seed: int = 4):
    torch.manual_seed(seed)
    a = ScaleAttentionConv(2, 3, efficient_rmo=efficient).double()
    b = ScaleAttentionConv(3, 4, efficient_rmo=efficient).double()
    _randomise_t(a, 5)
    _randomise_t(b, 6)
    return a, b


def test_efficient_rmo_gradient_stays_in_its_layer():
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grads = {}
    for efficient in (True, False):
        a, b = _two_layer(efficient)
        h, _ = with_rmo(a, x)
        _, loss_b = with_rmo(b, torch.relu(h))
        loss_b.backward()  # only layer b's L_scale
        grads[efficient] = (a, b)
    a_eff, b_eff = grads[True]
    a_nai, b_nai = grads[False]
    for p in a_eff.parameters():  # efficient: earlier layer untouched
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in a_nai.parameters())  # naive: reached
    for (n, pe), (_, pn) in zip(b_eff.named_parameters(), b_nai.named_parameters()):  # own params: equal
        assert torch.allclose(pe.grad, pn.grad, rtol=1e-10, atol=1e-13), n


def test_efficient_total_gradient_equals_detached_input_definition():
    """Efficient grads of L_rec + Σ L_scale == autograd of L_rec + Σ exp(-λ‖conv(x_l.detach(), W_l)‖/HW)."""
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    a, b = _two_layer(True)
    trace = Trace()
    out = b(torch.relu(a(x, trace)), trace)
    rec = (out**2).mean() + out.sum() * 0.1
    (rec + trace.aux_losses()["rmo"]).backward()
    eff = [p.grad.clone() for p in list(a.parameters()) + list(b.parameters())]

    a2, b2 = _two_layer(True)
    a2.rmo = b2.rmo = False
    h = a2(x)
    out = b2(torch.relu(h))
    rec = (out**2).mean() + out.sum() * 0.1
    ref_rmo = (
        rmo_per_sample(F.conv2d(x, a2.kernel(), None, 1, 1), 1.0).mean()
        + rmo_per_sample(F.conv2d(torch.relu(h).detach(), b2.kernel(), None, 1, 1), 1.0).mean()
    )
    (rec + ref_rmo).backward()
    ref = [p.grad for p in list(a2.parameters()) + list(b2.parameters())]
    for e, r in zip(eff, ref):
        assert torch.allclose(e, r, rtol=1e-10, atol=1e-13)


def test_efficient_rmo_in_a_network_touches_only_sac_parameters():
    """Σ L_scale of a SCAN-IResNet: efficient → no gradient reaches BN/PReLU/fc (nothing but SAC
    layers' own k, t, k_i); naive → the RMO gradient flows back through BN and PReLU too."""
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(11)) * 2 - 1
    for efficient in (True, False):
        torch.manual_seed(12)
        net = build_scan_iresnet(18, efficient_rmo=efficient, width=0.0625, embedding_size=8, input_size=16).train()
        net(x).aux_losses["rmo"].backward()
        own = {f"{n}.{p}" for n, m in sac_layers(net) for p, _ in m.named_parameters()}
        others = {n: p.grad for n, p in net.named_parameters() if n not in own and p.requires_grad}
        assert all(net.get_parameter(n).grad is not None for n in own)
        reached = [n for n, g in others.items() if g is not None and torch.count_nonzero(g) > 0]
        if efficient:
            assert reached == []
        else:
            assert "trunk.layer1.0.bn2.weight" in reached and "trunk.prelu.weight" in reached


# --------------------------------------------------------------------------- folding


def _two_branch(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose SAC layers compute eq. 8 as two convolutions, k_s ⊛ f + k_i ⊛ f (unfolded)."""
    model = copy.deepcopy(model).eval()
    for _, m in sac_layers(model):

        def forward(x, trace=None, m=m):
            out = F.conv2d(x, m.scaled_kernel(), None, m.stride, m.padding)
            return out + F.conv2d(x, m.weight_i, None, m.stride, m.padding) if m.lsc else out

        m.forward = forward
    return model


@pytest.mark.parametrize("depth,se", [(18, False), (50, True)])
def test_fold_equals_unfolded_and_loads_into_plain_iresnet(depth, se):
    torch.manual_seed(9)
    dims = dict(TINY, input_size=16)
    scan = build_scan_iresnet(depth, se=se, **dims)
    _randomise_t(scan)
    _randomise_bn(scan)
    scan.eval()
    plain = build_iresnet(depth, se=se, **dims)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(10)) * 2 - 1

    scan64, x64 = copy.deepcopy(scan).double(), x.double()
    with torch.no_grad():
        ref64, ref32 = _two_branch(scan64).embed(x64), _two_branch(scan).embed(x)
        folded64 = fold(copy.deepcopy(scan64)).eval()
        diff64 = (folded64.embed(x64) - ref64).abs().max().item()
        folded32, n_folded = scan.folded()  # the network's own inference form (what export uses)
        folded32.eval()
        diff32 = (folded32.embed(x) - ref32).abs().max().item()
        same32 = (folded32.embed(x) - scan.embed(x)).abs().max().item()
    assert n_folded == len(sac_layers(scan)) and sac_layers(scan)  # folded a copy, the original is intact
    print(
        f"fold r{depth}{' se' if se else ''}: max|folded - two-branch unfolded| float64 {diff64:.2e}, "
        f"float32 {diff32:.2e} (|out| max {ref32.abs().max():.2f}); vs the module's own eval forward {same32:.1e}"
    )
    assert diff64 < 1e-5 and diff32 < 1e-4 * max(1.0, ref32.abs().max().item()) and same32 < 1e-5
    assert not sac_layers(folded32)
    assert sum(p.numel() for p in folded32.parameters()) == sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in scan.parameters()) > sum(p.numel() for p in plain.parameters())
    plain.load_state_dict(folded32.state_dict(), strict=True)
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain.embed(x), folded32.embed(x), atol=0, rtol=0)


# --------------------------------------------------------------------------- the conv kind in a network


def _scan_cfg(tmp_path, conv: str = "", backbone: str = "iresnet18", extra: str = ""):
    p = tmp_path / "scan.yaml"
    p.write_text(
        f"recipe: margin\nmodel: {{backbone: {backbone}, width: 0.0625, input_size: 32, "
        f"conv: {{kind: scan, {conv}}}, head: {{embedding_size: 16}}{extra}}}\n"
    )
    return load_config([p])


def test_scan_conv_kind_contract(tmp_path):
    cfg = _scan_cfg(tmp_path, "rmo_weight: 0.5")
    recipe = registry.build_recipe(cfg).train()
    batch = {"image": torch.rand(4, 3, 32, 32) * 2 - 1, "label": torch.arange(4)}
    out = recipe(batch)
    assert out.heads["main"].embeddings.shape == (4, 16)
    layers = sac_layers(recipe.net)
    # aux 'rmo' = weight · Σ_layers L_scale, each in (0, 1]; equal to the sum recomputed layer by layer
    assert 0 < float(out.aux_losses["rmo"].detach()) <= 0.5 * len(layers)
    outputs = []
    hooks = [m.register_forward_hook(lambda mod, i, o: outputs.append(o.detach())) for _, m in layers]
    again = recipe(batch).aux_losses["rmo"].detach()
    for h in hooks:
        h.remove()
    ref = sum(0.5 * rmo_per_sample(y, 1.0).mean() for y in outputs)
    torch.testing.assert_close(again, ref, rtol=1e-5, atol=0)
    assert "scan/t_mean" not in out.scalars  # a parameter statistic: computed at log steps, not in every step
    assert abs(float(recipe.parameter_monitors()["scan/t_mean"]) - 1.0) < 1e-5
    nwd = recipe.no_weight_decay()
    assert len(nwd) == len(layers) and all(n.startswith("net.") and n.endswith(".scale_raw") for n in nwd)
    assert nwd <= {n for n, _ in recipe.named_parameters()}
    out.aux_losses["rmo"].backward()
    assert all(m.scale_raw.grad is not None for _, m in layers)
    hist = recipe.histograms()
    assert "t/all" in hist and hist["t/all"].numel() == sum(m.out_planes for _, m in layers)
    assert "scan/t/trunk.conv1" in hist and "scan/t/trunk.layer1.0.conv2" in hist
    recipe.on_checkpoint(tmp_path, 7)
    png = tmp_path / "t_density.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recipe.eval()
    assert not recipe(batch).aux_losses  # no RMO in eval


def test_scan_switches_and_errors(tmp_path):
    cfg = _scan_cfg(tmp_path, "rmo: false, lsc: false")
    recipe = registry.build_recipe(cfg).train()
    out = recipe({"image": torch.zeros(2, 3, 32, 32), "label": torch.zeros(2, dtype=torch.long)})
    assert "rmo" not in out.aux_losses
    assert all(not m.lsc and m.sac for _, m in sac_layers(recipe.net))
    se = registry.build_recipe(_scan_cfg(tmp_path, backbone="se_iresnet50"))
    assert any(n.endswith("se.fc1") for n, _ in se.net.named_modules()) and sac_layers(se.net)
    with pytest.raises(ConfigError, match="model.conv.sacc"):
        _scan_cfg(tmp_path, "sacc: true")
    with pytest.raises(ConfigError, match="model.conv.t_min"):
        _scan_cfg(tmp_path, "t_min: 0.0")
    with pytest.raises(ConfigError, match="model.conv.rmo_lambda"):
        _scan_cfg(tmp_path, "rmo_lambda: 0")


def test_init_from_for_finetuning(tmp_path):
    src = registry.build_recipe(_scan_cfg(tmp_path))
    with torch.no_grad():
        for _, m in sac_layers(src.net):
            m.scale_raw.add_(0.3)
    ckpt = tmp_path / "step_0000001"
    ckpt.mkdir()
    torch.save(src.net.state_dict(), ckpt / "model.pt")
    (ckpt / "config.yaml").write_text("model: {}\n")  # a checkpoint dir: config.yaml + model.pt
    cfg = _scan_cfg(tmp_path, extra=f", init_from: {ckpt}")
    dst = registry.build_recipe(cfg)
    for (n, a), (_, b) in zip(src.net.state_dict().items(), dst.net.state_dict().items()):
        assert torch.equal(a, b), n
    assert cfg.model.init_from == "" and cfg.model.initialised_from == str(ckpt)
    with pytest.raises(ConfigError, match="model.init_from"):
        registry.build_recipe(_scan_cfg(tmp_path, extra=f", init_from: {tmp_path / 'nope.pt'}"))
    with pytest.raises(ConfigError, match="model.init_from.*first mismatching key"):
        registry.build_recipe(_scan_cfg(tmp_path, backbone="iresnet50", extra=f", init_from: {ckpt}"))


@pytest.mark.parametrize(
    "name", ["scan_r18_casia", "scan_r50_ms1mv2", "scan_r101_ms1mv2", "scan_survface_finetune", "iresnet_r100_ms1mv2"]
)
def test_recipe_configs_load_and_match_the_paper(name):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    cfg = load_config([root / f"{name}.yaml"])
    paper = {
        "scan_r18_casia": (0.1, [16, 24, 28], 30, 256),
        "scan_r50_ms1mv2": (0.1, [5, 9, 11], 12, 128),
        "scan_r101_ms1mv2": (0.1, [5, 9, 11], 12, 128),
        "scan_survface_finetune": (0.01, [12, 16], 20, 128),
        "iresnet_r100_ms1mv2": (0.1, [5, 9, 11], 12, 128),
    }[name]
    assert (cfg.optim.lr, cfg.schedule.milestones, cfg.schedule.epochs, cfg.data.batch_size * 8) == paper
    assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.margin.s, cfg.margin.m2) == (0.9, 1e-4, 64.0, 0.5)
    depth = {"scan_r18_casia": "iresnet18", "scan_r50_ms1mv2": "iresnet50"}.get(name, "iresnet100")
    assert cfg.recipe == "margin" and cfg.model.backbone == depth and cfg.model.head.embedding_size == 512
    if name.startswith("scan"):
        assert cfg.model.conv.kind == "scan" and cfg.model.conv.sac and cfg.model.conv.lsc and cfg.model.conv.rmo
    else:
        assert cfg.model.conv.kind == "plain"
    small = load_config([root / f"{name}.yaml", root / "smoke.yaml"], ["model.input_size=16"])
    recipe = registry.build_recipe(small).train()
    out = recipe({"image": torch.rand(2, 3, 16, 16) * 2 - 1, "label": torch.zeros(2, dtype=torch.long)})
    assert out.heads["main"].embeddings.shape == (2, small.model.head.embedding_size)
    assert ("rmo" in out.aux_losses) == name.startswith("scan")


def test_t1_operator_conditioning():
    """k ↦ k_s at t = 1, γm = 1 is linear: (1/2π)·G k Gᵀ (the t factor cancels eq. 2's prefactor). Its matrix,
    built by applying the module to the 9 basis kernels, has the singular values of kron(G, G)/2π and condition
    number cond(G)² = 86.56 (numpy), its top singular vector all-positive (the DC/low-pass direction)."""
    conv = ScaleAttentionConv(1, 1, sac=True, lsc=False, rmo=False).double()
    cols = []
    with torch.no_grad():
        for i in range(9):
            conv.weight.zero_()
            conv.weight.view(-1)[i] = 1.0
            cols.append(conv.scaled_kernel().flatten().clone())
    M = torch.stack(cols, dim=1).numpy()
    t = float(conv.t.detach())
    G = np.exp(-(np.subtract.outer(np.arange(3), np.arange(3)) ** 2) / (2 * t))
    ref = np.kron(G, G) / (2 * math.pi)
    assert np.abs(M - ref).max() < 1e-12, np.abs(M - ref).max()
    u, sv, _ = np.linalg.svd(M)
    assert abs(sv[0] / sv[-1] - np.linalg.cond(G) ** 2) < 1e-6 * sv[0] / sv[-1]
    assert abs(sv[0] / sv[-1] - 86.56) < 0.01  # at t = 1 - 0 (t_min + softplus(ρ₀) = 1 to float precision)
    assert (np.sign(u[:, 0]) == np.sign(u[0, 0])).all()


@pytest.mark.parametrize("t_init", [0.25, 1.0, 3.0])
def test_t_init_switch(t_init):
    conv = ScaleAttentionConv(4, 6, t_init=t_init)
    assert torch.allclose(conv.t, torch.full((6,), t_init), rtol=1e-6)
    cfg = load_config(["configs/scan_r18_casia.yaml"], [f"model.conv.t_init={t_init}"])
    net = build_network(cfg.model)
    assert torch.allclose(sac_layers(net)[0][1].t, torch.full_like(sac_layers(net)[0][1].t, t_init), rtol=1e-6)
    with pytest.raises(ConfigError, match="t_init"):
        load_config(["configs/scan_r18_casia.yaml"], ["model.conv.t_init=0.0001"])


@pytest.mark.parametrize("efficient", [True, False])
def test_rmo_on_ks_branch(efficient):
    """rmo_on=ks: eq. 6 on conv(x, k_s) alone (reference: an independent F.conv2d + the eq. 6 formula), the
    recognition output still conv(x, k_u); k_i gets no RMO gradient, k does; efficient: none reaches x."""
    torch.manual_seed(0)
    ks_conv = ScaleAttentionConv(3, 5, rmo_on="ks", efficient_rmo=efficient, rmo_weight=0.5).double()
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    trace = Trace()
    y = ks_conv(x, trace)
    with torch.no_grad():
        ks = ks_conv.scaled_kernel()
        y_ref = F.conv2d(x, ks + ks_conv.weight_i, padding=1)
        ys = F.conv2d(x, ks, padding=1)
        loss_ref = 0.5 * torch.exp(-ys.flatten(1).norm(dim=1) / (9 * 9)).mean()
    assert torch.allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    loss = trace.aux_losses()["rmo"]
    assert torch.allclose(loss, loss_ref, rtol=1e-12)
    loss.backward()
    assert ks_conv.weight_i.grad is None or float(ks_conv.weight_i.grad.abs().max()) == 0.0
    assert float(ks_conv.weight.grad.abs().max()) > 0 and float(ks_conv.scale_raw.grad.abs().max()) > 0
    assert (x.grad is None or float(x.grad.abs().max()) == 0.0) == efficient
    # as written (ku): k_i does get the RMO gradient
    ku_conv = copy.deepcopy(ks_conv)
    ku_conv.rmo_on = "ku"
    ku_conv.zero_grad()
    trace = Trace()
    ku_conv(x.detach(), trace)
    trace.aux_losses()["rmo"].backward()
    assert float(ku_conv.weight_i.grad.abs().max()) > 0


# --------------------------------------------------------------------------- one training step's host work (issue 21)


def _einsum_kernel(m: ScaleAttentionConv) -> torch.Tensor:
    """k_u by the per-layer construction the module used before kernels were batched: a 3-operand einsum
    ``G k Gᵀ`` per filter (float64, an independent reference for :func:`sac_kernels`)."""
    t = (m.t_min + F.softplus(m.scale_raw.detach().double())).view(-1, 1, 1)
    idx = torch.arange(m.kernel_size, dtype=torch.float64)
    toeplitz = torch.exp(-((idx[:, None] - idx[None, :]) ** 2).unsqueeze(0) / (2 * t))
    ks = torch.einsum("opq,oiqs,ors->oipr", toeplitz, m.weight.detach().double(), toeplitz)
    ks = ks * (t.pow(m.gamma_m) / (2 * math.pi * t)).view(-1, 1, 1, 1)
    return ks + m.weight_i.detach().double() if m.lsc else ks


@pytest.mark.parametrize("gamma_m", [1.0, 0.5])
def test_batched_kernels_equal_the_per_layer_construction(gamma_m):
    """The kernels one training forward builds per (out, in) shape group equal the per-layer construction (float64
    einsum) within 1e-6 (measured max |Δ| in float32: 2.7e-8 at γm = 1, 6.4e-8 at 0.5); each is contiguous."""
    torch.manual_seed(0)
    net = build_scan_iresnet(50, gamma_m=gamma_m, **TINY).train()
    _randomise_t(net, 3)
    trace = Trace()
    net.conv_kind.begin(net, trace)
    state = trace.state["scan"]
    layers = sac_layers(net)
    shapes = {(m.out_planes, m.in_planes) for _, m in layers}
    assert len(state.kernels) == len(layers) and len(net.conv_kind._groups(net)) == len(shapes) < len(layers)
    worst = 0.0
    for _, m in layers:
        ku = state.kernels[m][0].detach()
        assert ku.is_contiguous()
        worst = max(worst, float((ku.double() - _einsum_kernel(m)).abs().max()))
    print(f"max |batched - einsum| = {worst:.2e}")
    assert worst < 1e-6, worst


def _step_grads(net, x):
    net.zero_grad(set_to_none=True)
    out = net(x)
    loss = (out.embedding**2).mean() + out.aux_losses["rmo"]
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_batched_step_equals_the_per_layer_step():
    """A training step with kernels built per shape group and eq. 6 over all layers at once gives the loss and every
    gradient of the per-layer form (each layer its kernel and its own RMO term), float64 within 1e-12."""
    torch.manual_seed(1)
    net = build_scan_iresnet(18, **TINY).double().train()
    _randomise_t(net, 4)
    per_layer = copy.deepcopy(net)
    per_layer.conv_kind.begin = lambda net, trace: None  # no state: layers build kernels and report eq. 6 alone
    per_layer.conv_kind.end = lambda net, trace: None
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    loss, grads = _step_grads(net, x)
    ref_loss, ref_grads = _step_grads(per_layer, x)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-10, atol=1e-13, msg=n)
