"""LCD (locality-aware channel-wise dropout, SR losses, SAM) and the feature-level baselines (issue 14).

Each check is against an independent computation: explicit loops for eqs. 1-2, counts read back from the
output for the mask, hand-written key lists for the state dict, the plain ``nn.Dropout2d`` for spatial dropout,
closed-form probabilities for DropBlock's and WCD's sampling. Tiny widths (iresnet18 × 0.25, c = 64 at stage 3).
"""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from pipeline import registry
from pipeline.config import ConfigError, load_config
from pipeline.losses.margin import CombinedMargin
from pipeline.models.feature_dropout import (
    DropBlock,
    DropBlockOptions,
    SpatialDropout,
    SpatialDropoutOptions,
    WCDOptions,
    WeightedChannelDropout,
    dropblock_seed_rate,
)
from pipeline.models.lcd import (
    LCD,
    LCDOptions,
    MaskedBatchNorm2d,
    SpatialAttention,
    channel_keep_mask,
    eq8_mse,
    filter_orthogonality,
    freeze_sam_to_mean,
    locality_stats,
    occlude_faces,
    occlusion_concentration,
    response_orthogonality,
)
from pipeline.models.network import Trace, build_network
from tests.helpers import REPO
from tests.support.lcd import LCD_R50, TINY, images, tiny_cfg

# Float error of the vectorised eqs. 1-2 against float64 loops, measured on random 12×7×3×3 kernels and 3×9×5×4
# maps: float32 ≤ 1.3e-7 relative, float64 ≤ 1e-15. Tolerances: ~8× the measured worst case.
RTOL32, RTOL64 = 1e-6, 1e-12


def lcd_of(net) -> LCD:
    found = [m for m in net.modules() if isinstance(m, LCD)]
    assert len(found) == 1
    return found[0]


# --------------------------------------------------------------------------- eqs. 1-2 against loops


def eq1_loop(w: torch.Tensor) -> float:
    """Σ_{i≠j} |Σ_p ⟨w_i^p, w_j^p⟩ / (‖w_i^p‖ ‖w_j^p‖)|, p over the k×k taps, in Python floats (float64)."""
    w = w.double()
    c_out, _, kh, kw = w.shape
    total = 0.0
    for i in range(c_out):
        for j in range(c_out):
            if i != j:
                s = 0.0
                for a in range(kh):
                    for b in range(kw):
                        u, v = w[i, :, a, b], w[j, :, a, b]
                        s += float(u @ v) / (float(u.norm()) * float(v.norm()))
                total += abs(s)
    return total


def eq2_loop(x: torch.Tensor, eps: float = 1e-6) -> float:
    """Batch mean of Σ_{i≠j} cos(f_i, f_j)², cos of a zero map taken as 0 (its norm clamped at eps)."""
    x = x.double()
    n, c = x.shape[:2]
    total = 0.0
    for t in range(n):
        for i in range(c):
            for j in range(c):
                if i != j:
                    u, v = x[t, i].flatten(), x[t, j].flatten()
                    total += (float(u @ v) / (max(float(u.norm()), eps) * max(float(v.norm()), eps))) ** 2
    return total / n


def test_eq1_filter_orthogonality_matches_a_loop_and_its_special_cases():
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        w = torch.randn(12, 7, 3, 3, generator=g, dtype=torch.float64)
        ref = eq1_loop(w)
        got64, s = filter_orthogonality(w, reduction="sum")
        got32, _ = filter_orthogonality(w.float(), reduction="sum")
        assert got64.dtype == torch.float64 and got32.dtype == torch.float32
        assert math.isclose(got64.item(), ref, rel_tol=RTOL64)
        assert math.isclose(got32.item(), ref, rel_tol=RTOL32)
        torch.testing.assert_close(s.diagonal(), torch.full((12,), 9.0, dtype=torch.float64))  # S_ii = k²
        # pair_mean = sum / c(c-1)
        mean, _ = filter_orthogonality(w, reduction="pair_mean")
        assert math.isclose(mean.item() * 12 * 11, got64.item(), rel_tol=RTOL64)
    # orthogonal columns at every tap (distinct basis vectors) → 0; identical filters → k²·c(c-1) (sum), k² (mean)
    ortho = torch.zeros(5, 8, 3, 3)
    for i in range(5):
        for a in range(3):
            for b in range(3):
                ortho[i, (i + a + b) % 8, a, b] = 1.0 + i + a
    assert filter_orthogonality(ortho, reduction="sum")[0].item() == 0.0
    same = torch.randn(1, 6, 3, 3, generator=g).expand(5, 6, 3, 3)
    assert math.isclose(filter_orthogonality(same, reduction="sum")[0].item(), 9 * 5 * 4, rel_tol=RTOL32)
    assert math.isclose(filter_orthogonality(same)[0].item(), 9.0, rel_tol=RTOL32)


def test_eq2_response_orthogonality_matches_a_loop_disjoint_support_and_zero_maps():
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(3, 9, 5, 4, generator=g, dtype=torch.float64)
        ref = eq2_loop(x)
        got64, cos = response_orthogonality(x, reduction="sum")
        assert math.isclose(got64.item(), ref, rel_tol=RTOL64)
        assert math.isclose(response_orthogonality(x.float(), reduction="sum")[0].item(), ref, rel_tol=RTOL32)
        assert math.isclose(response_orthogonality(x)[0].item() * 9 * 8, ref, rel_tol=RTOL64)  # pair_mean relation
        assert cos.shape == (3, 9, 9)
    # channels with disjoint spatial support are orthogonal: 0
    disjoint = torch.zeros(2, 4, 4, 4)
    for i in range(4):
        disjoint[:, i, i, :] = torch.rand(2, 4, generator=g) + 0.1
    assert response_orthogonality(disjoint, reduction="sum")[0].item() == 0.0
    # a zero (dropped) channel: no NaN in the value or the gradient; it contributes nothing
    x = torch.randn(2, 5, 3, 3, generator=g)
    x[:, 2] = 0
    x.requires_grad_(True)
    loss, _ = response_orthogonality(x, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    kept = x.detach()[:, [0, 1, 3, 4]]
    assert math.isclose(loss.item(), eq2_loop(kept), rel_tol=RTOL32)


# --------------------------------------------------------------------------- eqs. 3-4: the mask


def test_gamma_is_a_uniform_integer_count_and_the_dropped_channels_a_uniform_subset():
    g = torch.Generator().manual_seed(2)
    keep, gamma = channel_keep_mask(6000, 10, 2, 6, generator=g)
    dropped = (~keep).sum(dim=1)
    assert torch.equal(dropped, gamma)  # exactly γ_t channels per sample
    assert gamma.min().item() == 2 and gamma.max().item() == 6
    assert chisquare(torch.bincount(gamma - 2, minlength=5).numpy()).pvalue > 1e-3  # γ uniform on {2..6}
    assert chisquare((~keep).sum(dim=0).numpy()).pvalue > 1e-3  # every channel equally often
    # for a fixed γ = 2 of 5 channels, all 10 subsets equally likely
    keep, _ = channel_keep_mask(5000, 5, 2, 2, generator=g)
    subsets = {s: i for i, s in enumerate(combinations(range(5), 2))}
    idx = [subsets[tuple(torch.nonzero(~row).flatten().tolist())] for row in keep]
    assert chisquare(torch.bincount(torch.tensor(idx), minlength=10).numpy()).pvalue > 1e-3


def test_lcd_zeroes_whole_channels_without_rescaling_and_is_the_identity_in_eval():
    lcd = LCD(16, 5, LCDOptions(sr=False, sam=False)).train()
    assert (lcd.gamma_min, lcd.gamma_max) == (0, 9)  # ⌊0.6·16⌋
    x = torch.rand(3000, 16, 5, 5, generator=torch.Generator().manual_seed(3)) + 0.5  # no zero entries
    trace = Trace()
    y = lcd(x, trace)
    zero = (y == 0).flatten(2)
    whole = zero.all(dim=2)
    assert torch.equal(zero.any(dim=2), whole)  # whole channels only
    kept = ~whole
    assert torch.equal(y[kept], x[kept])  # bit-identical kept channels: no 1/(1-p) rescale
    counts = whole.sum(dim=1)
    assert counts.min().item() == 0 and counts.max().item() == 9
    # what the trace reports is what happened
    torch.testing.assert_close(trace.histograms["lcd/gamma_frac"], counts.float() / 16)
    torch.testing.assert_close(trace.histograms["lcd/channel_drop_freq"], whole.float().mean(dim=0))
    torch.testing.assert_close(
        trace.monitors["lcd/eq8_mse_insert"], (x - y).pow(2).flatten(1).mean(dim=1).mean()
    )  # without SAM: eq. 8 at the insert = mean squared difference with vs without the mask
    # masks come from torch's global RNG, which the trainer seeds per step and rank: same seed, same mask
    torch.manual_seed(14)
    y1 = lcd(x[:50])
    torch.manual_seed(14)
    assert torch.equal(lcd(x[:50]), y1)
    torch.manual_seed(15)
    assert not torch.equal(lcd(x[:50]), y1)
    # eval: identity
    lcd.eval()
    assert torch.equal(lcd(x), x)
    # rescale (ablation): kept channels × c/(c-γ_t)
    scaled = LCD(16, 5, LCDOptions(sr=False, sam=False, rescale=True)).train()
    y = scaled(x[:200])
    whole = (y == 0).flatten(2).all(dim=2)
    factor = 16 / (16 - whole.sum(dim=1)).float()
    expected = x[:200] * factor[:, None, None, None] * (~whole)[:, :, None, None]
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- eq. 7: SAM


def test_sam_is_eq7_kept_at_inference_and_reads_positions_not_pooled_values():
    torch.manual_seed(4)
    lcd = LCD(8, 5, LCDOptions(sr=False)).eval()
    x = torch.randn(6, 8, 5, 5)
    theta = lcd.sam(x)
    assert theta.shape == (6, 8) and ((theta > 0) & (theta < 1)).all()
    torch.testing.assert_close(lcd(x), x * theta[:, :, None, None], rtol=0, atol=0)  # eq. 7, no dropout in eval
    # permuting the h×w positions changes θ (a GAP module would be invariant to it)
    perm = torch.randperm(25, generator=torch.Generator().manual_seed(5))
    shuffled = x.flatten(2)[:, :, perm].reshape_as(x)
    torch.testing.assert_close(shuffled.mean(dim=(2, 3)), x.mean(dim=(2, 3)))  # the pooled values are the same
    assert (lcd.sam(shuffled) - theta).abs().max() > 1e-3
    # 2sigmoid gate = 2 × sigmoid of the same logits
    two = SpatialAttention(8, 5, gate="2sigmoid").eval()
    one = SpatialAttention(8, 5, gate="sigmoid").eval()
    one.load_state_dict(two.state_dict())
    torch.testing.assert_close(two(x), 2 * one(x))
    # iresnet50 stage 3 (256 ch, 14×14): conv 256·16 + BN 2·16 + PReLU 16 + FC1 3136·64 + 64 + PReLU 64 + FC2 64·256 + 256
    r50 = sum(p.numel() for p in SpatialAttention(256, 14, 16, 64).parameters())
    assert r50 == 4096 + 32 + 16 + 3136 * 64 + 64 + 64 + 64 * 256 + 256 == 221_616


def test_sam_fc_sizes_follow_the_input_size():
    sizes = {}
    for px, s in ((112, 14), (144, 18)):
        net = build_network(tiny_cfg(f"model.input_size={px}").model).eval()
        sam = lcd_of(net).sam
        sizes[px] = (sam.fc1.in_features, sam.fc1.out_features, sam.fc2.out_features)
        assert sizes[px] == (16 * s * s, 16, 64)  # c = 64 at width 0.25, d = c/4
    with torch.no_grad():
        assert net.embed(images(2, 144)).shape == (2, 512)
        with pytest.raises(ValueError, match="SAM was built for 18×18"):
            net.embed(images(2, 112))


# --------------------------------------------------------------------------- the network


def sam_keys(prefix: str) -> set[str]:
    bn = [f"sam.reduce_bn.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    own = ["sam.reduce.weight", *bn, "sam.reduce_act.weight", "sam.fc1.weight", "sam.fc1.bias"]
    own += ["sam.fc1_act.weight", "sam.fc2.weight", "sam.fc2.bias"]
    return {prefix + k for k in own}


def test_state_dict_has_each_weight_once_and_insightface_iresnet50_keys_load_with_only_lcd_new():
    lcd_net = build_network(load_config([LCD_R50]).model)
    plain_net = build_network(load_config([REPO / "configs" / "arcface_r50.yaml"]).model)
    lcd_sd, plain_sd = lcd_net.state_dict(), plain_net.state_dict()
    assert set(lcd_sd) - set(plain_sd) == sam_keys("trunk.layer3.13.branch.inserts.0.")
    assert set(plain_sd) <= set(lcd_sd)
    assert all(lcd_sd[k].shape == v.shape for k, v in plain_sd.items())
    # no tensor stored twice (the conv LCD regularises is referenced, not registered)
    ptrs = [t.data_ptr() for t in lcd_sd.values() if t.numel()]
    assert len(ptrs) == len(set(ptrs))
    assert [k for k in lcd_sd if k.endswith("conv2.weight") and "layer3.13" in k] == ["trunk.layer3.13.conv2.weight"]
    n_params = len(list(lcd_net.named_parameters(remove_duplicate=False)))
    assert n_params == len(list(plain_net.parameters())) + 9  # SAM: conv, BN γ β, PReLU, fc1 W b, PReLU, fc2 W b
    # an insightface backbone.pth (flat arcface_torch names) loads; only LCD's own keys are missing
    flat = {plain_net.published_names()[k]: v for k, v in plain_sd.items()}
    back = {v: k for k, v in lcd_net.published_names().items()}
    missing, unexpected = lcd_net.load_state_dict({back[k]: v for k, v in flat.items()}, strict=False)
    # (BatchNorm fills a missing num_batches_tracked itself, so torch does not list SAM's BN counter as missing)
    new = sam_keys("trunk.layer3.13.branch.inserts.0.")
    assert unexpected == [] and set(missing) == {k for k in new if not k.endswith("num_batches_tracked")}
    assert torch.equal(lcd_net.trunk.layer3[13].conv2.weight, plain_net.trunk.layer3[13].conv2.weight)
    assert lcd_of(lcd_net).conv_kernel() is lcd_net.trunk.layer3[13].conv2.weight


def test_the_network_with_lcd_trains_a_step():
    torch.manual_seed(6)
    cfg = tiny_cfg()
    recipe = registry.build_recipe(cfg).train()
    net = recipe.net
    block = net.trunk.layer3[-1]
    lcd = lcd_of(net)
    assert lcd._block is block and (lcd.gamma_min, lcd.gamma_max) == (0, 38)  # c = 64: ⌊0.6·64⌋ (spec §6.5)
    seen = {}
    block.bn3.register_forward_hook(lambda m, i, o: seen.__setitem__("F", o.detach()))
    block.register_forward_hook(lambda m, i, o: seen.__setitem__("block", (i[0].detach(), o.detach())))
    classes = torch.randn(10, 512, generator=torch.Generator().manual_seed(7))
    margin = CombinedMargin(64.0, 1.0, 0.5, 0.0)
    labels = torch.tensor([0, 3, 3, 7])
    opt = torch.optim.SGD(recipe.parameters(), lr=0.05, momentum=0.9)
    before = {k: v.detach().clone() for k, v in recipe.named_parameters()}
    for step in range(2):
        out = recipe({"image": images(4, 112, seed=step), "label": labels})
        emb = out.heads["main"].embeddings
        logits = margin(F.normalize(emb) @ F.normalize(classes).t(), labels)
        cls = F.cross_entropy(logits, labels)
        assert {"sr_filter", "sr_response"} <= set(out.aux_losses)
        # the aux losses are eqs. 1-2, weighted, on conv2's weight and on F *before* dropping (bn3's output)
        w = block.conv2.weight.detach()
        torch.testing.assert_close(out.aux_losses["sr_filter"].detach(), 100.0 * filter_orthogonality(w)[0])
        torch.testing.assert_close(out.aux_losses["sr_response"].detach(), response_orthogonality(seen["F"])[0])
        x_in, y_out = seen["block"]
        ratio = ((y_out - x_in).flatten(1).norm(dim=1) / x_in.flatten(1).norm(dim=1)).mean()
        torch.testing.assert_close(out.scalars["lcd/branch_to_identity"], ratio)
        expected = {"sr/filter_raw", "sr/response_raw", "lcd/drop_frac_mean", "lcd/spatial_entropy"}
        expected |= {"lcd/top10_energy", "lcd/eq8_mse_insert", "sam/theta_std_over_samples", "lcd/bn3_gamma_absmean"}
        assert expected <= set(out.scalars)
        assert {"lcd/gamma_frac", "lcd/channel_drop_freq", "sam/theta", "sr/filter_cos"} <= set(out.histograms)
        total = cls + sum(out.aux_losses.values())
        assert torch.isfinite(total)
        if step == 0:
            g_filter = torch.autograd.grad(out.aux_losses["sr_filter"], block.conv2.weight, retain_graph=True)[0]
            assert g_filter.abs().sum() > 0
        opt.zero_grad()
        total.backward()
        assert lcd.sam.fc1.weight.grad.abs().sum() > 0 and lcd.sam.reduce.weight.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(before["net.trunk.layer3.1.conv2.weight"], block.conv2.weight)
    assert not torch.equal(before[f"net.{_name(net, lcd)}.sam.fc2.weight"], lcd.sam.fc2.weight)


def _name(net, module) -> str:
    return next(n for n, m in net.named_modules() if m is module)


def test_stage_output_position_and_points_without_a_conv():
    net = build_network(tiny_cfg("model.inserts=[{kind: lcd, at: layer3}]").model).train()
    lcd = net.trunk.after["layer3"].inserts[0]
    assert isinstance(lcd, LCD) and lcd._block is net.trunk.layer3[-1]
    assert net.trunk.layer3[-1].branch is None
    out = net(images(2))
    torch.testing.assert_close(
        out.aux_losses["sr_filter"].detach(), 100.0 * filter_orthogonality(net.trunk.layer3[-1].conv2.weight)[0]
    )
    with pytest.raises(ConfigError, match="lcd at 'stem'.*sr: false"):
        build_network(tiny_cfg("model.inserts=[{kind: lcd, at: stem, sam: false}]").model)
    with pytest.raises(ConfigError, match=r"model.inserts\[0\].drop_max"):
        tiny_cfg("model.inserts=[{kind: lcd, drop_min: 0.5, drop_max: 0.4}]")
    with pytest.raises(ConfigError, match=r"model.inserts\[0\].sr_reduction"):
        tiny_cfg("model.inserts=[{kind: lcd, sr_reduction: raw}]")


def test_with_everything_off_the_network_is_bit_identical_to_the_arcface_baseline():
    nets = []
    for layer in ("model.inserts=[{kind: lcd, drop: false, sr: false, sam: false}]", "model.inserts=[]"):
        torch.manual_seed(8)
        nets.append(build_network(tiny_cfg(layer).model).train())
    off, base = nets
    assert list(off.state_dict()) == list(base.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(off.state_dict().values(), base.state_dict().values()))
    a, b = off(images(2)), base(images(2))
    assert torch.equal(a.embedding, b.embedding) and a.aux_losses == {} and b.aux_losses == {}


def test_lcd_inside_a_scan_trunk_regularises_the_effective_kernel():
    torch.manual_seed(9)
    cfg = load_config([REPO / "configs" / "compose" / "lcd_scan.yaml"], [*TINY, "model.input_size=56"])
    net = build_network(cfg.model).train()
    conv = net.trunk.layer3[-1].conv2
    assert type(conv).__name__ == "ScaleAttentionConv" and lcd_of(net).sam.spatial == 7
    out = net(images(2, 56))
    assert {"rmo", "sr_filter", "sr_response"} <= set(out.aux_losses)
    torch.testing.assert_close(out.aux_losses["sr_filter"].detach(), 100.0 * filter_orthogonality(conv.kernel())[0])
    grads = torch.autograd.grad(out.aux_losses["sr_filter"], [conv.weight, conv.weight_i, conv.scale_raw])
    assert all(g.abs().sum() > 0 for g in grads)  # k, k_i and t all reached through k_u
    # the folded (inference) form keeps LCD/SAM and gives the same embedding
    net.eval()
    folded, n = net.folded()
    assert n > 0 and lcd_of(folded)._block is folded.trunk.layer3[-1]  # the copy points into the copy
    assert lcd_of(folded).conv_kernel() is folded.trunk.layer3[-1].conv2.weight  # now a plain Conv2d's k_u
    with torch.no_grad():
        torch.testing.assert_close(folded.embed(images(2, 56)), net.embed(images(2, 56)), rtol=1e-4, atol=1e-4)


def test_eq8_mse_on_the_final_embedding():
    torch.manual_seed(10)
    net = build_network(tiny_cfg().model)
    x = images(3)
    zero = eq8_mse(net, x, 0.0)
    assert zero["mse"].item() == 0.0 and zero["mse_unit"].item() == 0.0
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = eq8_mse(net, x, 0.3, generator=g1), eq8_mse(net, x, 0.3, generator=g2)
    assert a["mse"] > 0 and torch.equal(a["mse"], b["mse"])  # same seed, same masks
    # every channel dropped = bn3 of the LCD block outputs zeros (eval BN: γ = β = 0 does exactly that)
    full = eq8_mse(net, x, 1.0)
    net.eval()
    with torch.no_grad():
        original = net.embed(x)
        bn3 = net.trunk.layer3[-1].bn3
        bn3.weight.zero_()
        bn3.bias.zero_()
        dropped = net.embed(x)
    torch.testing.assert_close(full["mse"], (original - dropped).pow(2).mean(), rtol=1e-5, atol=0)
    unit = (F.normalize(original) - F.normalize(dropped)).pow(2).mean()
    torch.testing.assert_close(full["mse_unit"], unit, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- the feature-level baselines


def test_dropblock_drops_whole_blocks_at_valid_centres_at_the_expected_rate():
    torch.manual_seed(11)
    h = w = 14
    block = DropBlock(8, DropBlockOptions(keep_prob=0.7, block_size=3, shared_mask=True)).train()
    x = torch.rand(400, 8, h, w) + 0.5
    y = block(x)
    dropped = (y == 0).float()
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))  # one spatial mask for every channel
    # kept values rescaled by count(M)/count_ones(M), one factor for the whole tensor
    scale = dropped.numel() / (1 - dropped).sum()
    torch.testing.assert_close(y[dropped == 0], x[dropped == 0] * scale)
    # the dropped set is a union of full 3×3 blocks whose centres lie where a block fits
    d = dropped[:, :1]
    centres = F.avg_pool2d(d, 3, stride=1) == 1  # (h-2)×(w-2): the valid centres fully dropped
    rebuilt = F.max_pool2d(F.pad(centres.float(), (1, 1, 1, 1)), 3, stride=1, padding=1)
    assert torch.equal(rebuilt, d)
    # expected fraction: position (i, j) survives iff none of the k_ij valid seeds covering it fires
    gamma = dropblock_seed_rate(0.7, 3, h, w)
    valid = torch.zeros(1, 1, h, w)
    valid[..., 1:-1, 1:-1] = 1
    k = F.conv2d(valid, torch.ones(1, 1, 3, 3), padding=1)
    expected = (1 - (1 - gamma) ** k).mean().item()
    per_sample = d.mean(dim=(1, 2, 3))
    assert abs(per_sample.mean().item() - expected) < 5 * per_sample.std().item() / math.sqrt(400)
    assert 0.25 < expected < 0.35
    # per-channel masks differ across channels; eval is the identity; the linear ramp of keep_prob
    per_channel = DropBlock(8, DropBlockOptions(shared_mask=False)).train()
    yc = (per_channel(x[:4]) == 0).float()
    assert not torch.equal(yc, yc[:, :1].expand_as(yc))
    assert torch.equal(block.eval()(x), x)
    ramp = DropBlock(8, DropBlockOptions(keep_prob=0.7, ramp_steps=10)).train()
    assert "calls" in ramp.state_dict()
    assert torch.equal(ramp(x[:2]), x[:2])  # keep_prob 1 at the start
    for _ in range(4):
        ramp(x[:2])
    assert math.isclose(ramp.current_keep_prob(), 1 - 0.5 * 0.3) and int(ramp.calls) == 5


def test_spatial_dropout_is_dropout2d():
    module = SpatialDropout(SpatialDropoutOptions(p=0.3)).train()
    x = torch.randn(64, 32, 4, 4)
    torch.manual_seed(12)
    y = module(x)
    torch.manual_seed(12)
    assert torch.equal(y, torch.nn.Dropout2d(0.3).train()(x))
    zero = (y == 0).flatten(2)
    assert torch.equal(zero.any(dim=2), zero.all(dim=2))  # whole channels
    kept = ~zero.all(dim=2)
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    n = kept.numel()
    assert abs((1 - kept.float().mean().item()) - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    assert torch.equal(module.eval()(x), x)


def test_wcd_selects_channels_in_proportion_to_their_scores_then_rng_and_rescale():
    torch.manual_seed(13)
    # q = 1: exactly c - ⌊r·c⌋ channels dropped per sample; kept ones × Σ score / Σ kept score
    wcd = WeightedChannelDropout(10, WCDOptions(wrs_ratio=0.7, rng_keep=1.0)).train()
    x = torch.randn(50, 10, 3, 3)
    y = wcd(x)
    dropped = (y == 0).flatten(2).all(dim=2)
    assert torch.equal(dropped.sum(dim=1), torch.full((50,), 3))
    scores = x.clamp_min(0).mean(dim=(2, 3))
    alpha = scores.sum(dim=1) / (scores * ~dropped).sum(dim=1)
    torch.testing.assert_close(y, x * (~dropped * alpha[:, None])[:, :, None, None], rtol=1e-5, atol=1e-6)
    # M = 1: P(channel i is the one selected) = score_i / Σ score (weighted random selection)
    s = torch.tensor([1.0, 2.0, 3.0, 4.0])
    one = WeightedChannelDropout(4, WCDOptions(wrs_ratio=0.25, rng_keep=1.0, rescale=False)).train()
    x = s.view(1, 4, 1, 1).expand(20000, 4, 2, 2).contiguous()
    chosen = (one(x) != 0).flatten(2).all(dim=2).float().argmax(dim=1)
    counts = torch.bincount(chosen, minlength=4).numpy()
    assert chisquare(counts, (s / s.sum() * 20000).numpy()).pvalue > 1e-3
    # RNG: with every channel selected (r = 1) each is kept with probability q
    rng = WeightedChannelDropout(8, WCDOptions(wrs_ratio=1.0, rng_keep=0.9, rescale=False)).train()
    x = torch.rand(2000, 8, 2, 2) + 0.1
    kept = (rng(x) != 0).flatten(2).all(dim=2).float().mean().item()
    assert abs(kept - 0.9) < 5 * math.sqrt(0.09 / 16000)
    x = torch.randn(5, 10, 3, 3)
    assert torch.equal(wcd.eval()(x), x)


# --------------------------------------------------------------------------- configs


def test_configs_load_and_build():
    base = load_config([LCD_R50])
    assert (base.margin.s, base.margin.m1, base.margin.m2, base.margin.m3) == (64.0, 1.0, 0.5, 0.0)
    assert base.model.backbone == "iresnet50"
    (ins,) = base.model.inserts
    assert (ins.kind, ins.at, ins.sr_filter_weight, ins.sr_response_weight) == ("lcd", "layer3.branch", 100.0, 1.0)
    assert (ins.sr_reduction, ins.drop_min, ins.drop_max, ins.rescale, ins.sam) == ("pair_mean", 0.0, 0.6, False, True)
    expected = {
        "baseline": [],
        "cd_stage2": [("lcd", "layer2.branch", False, False)],
        "cd_stage3": [("lcd", "layer3.branch", False, False)],
        "cd_stage4": [("lcd", "layer4.branch", False, False)],
        "cd_sr": [("lcd", "layer3.branch", True, False)],
        "cd_sr_sam": [("lcd", "layer3.branch", True, True)],
        "stage_output": [("lcd", "layer3", True, True)],
        "stage_output_eq6": [("lcd", "layer3", True, True)],
        "dropblock": [("dropblock", "layer3.branch")],
        "spatial_dropout": [("spatial_dropout", "layer3.branch")],
        "wcd": [("wcd", "layer3.branch")],
    }
    layers = sorted((REPO / "configs" / "lcd").glob("*.yaml"))
    assert {p.stem for p in layers} == set(expected)
    for path in layers:
        cfg = load_config([LCD_R50, path], ["model.width=0.0625"])
        got = [(i.kind, i.at, i.sr, i.sam) if i.kind == "lcd" else (i.kind, i.at) for i in cfg.model.inserts]
        assert got == expected[path.stem], path.name
        net = build_network(cfg.model)
        masked = [type(m) is MaskedBatchNorm2d for m in net.modules()]
        assert any(masked) == (path.stem == "stage_output_eq6"), path.name
    scan = load_config([REPO / "configs" / "compose" / "lcd_scan.yaml"], ["model.width=0.0625"])
    assert scan.model.conv.kind == "scan" and [i.kind for i in scan.model.inserts] == ["lcd"]
    build_network(scan.model)


def test_gradient_norms_of_each_term_on_the_watched_conv_match_separate_backwards():
    """The trainer's ``grad_norm/lcd_conv/<term>`` and ``grad_ratio``: ‖∂L/∂W‖ of each term on the conv LCD
    regularises (cls from the step's own scaled backward, by linearity), equal to separate backward passes, and
    the step's own backward unchanged by the measurement."""
    from pipeline.grad_probe import TermGradients

    torch.manual_seed(0)
    net = build_network(tiny_cfg().model).train()
    x = images(n=4, seed=1)
    conv = lcd_of(net)._block.conv2.weight

    def run(seed):
        torch.manual_seed(seed)  # the same dropout masks in every pass
        out = net(x)
        return out, out.embedding.pow(2).sum()  # a stand-in for the classification loss

    out, cls = run(5)
    assert set(out.watched) == {"lcd_conv"} and out.watched["lcd_conv"] is conv
    total = cls + sum(out.aux_losses.values())
    net.zero_grad()
    with TermGradients(out.watched, out.aux_losses, total) as probe:
        (total * 0.25).backward()  # the step's own backward, scaled as DeepSpeed scales it (1/grad_accum, fp16)
    got = probe.result()
    total_grad = conv.grad.clone()
    expected = {}
    for name in ("cls", "sr_filter", "sr_response"):
        net.zero_grad()
        o, c = run(5)
        (c if name == "cls" else o.aux_losses[name]).backward()
        expected[name] = float(conv.grad.norm())
    # cls is a difference (total − SR terms): float32 cancellation, relative error ≈ ε·‖total‖/‖cls‖ (measured
    # ≤ 3e-5 here); the directly differentiated terms agree to float32 rounding
    cancel = 8 * 1.2e-7 * float(total_grad.norm()) / 0.25 / expected["cls"]
    for name, value in expected.items():
        tol = max(1e-5, cancel) if name == "cls" else 1e-5
        assert float(got[f"grad_norm/lcd_conv/{name}"]) == pytest.approx(value, rel=tol), name
    ratio = expected["sr_filter"] / expected["cls"]
    assert float(got["grad_ratio/lcd_conv/sr_filter"]) == pytest.approx(ratio, rel=max(1e-5, cancel))
    assert cancel < 0.05  # the measurement is meaningful at all
    # the probe accumulated nothing itself: the step's backward left exactly its own gradient
    net.zero_grad()
    o, c = run(5)
    ((c + sum(o.aux_losses.values())) * 0.25).backward()
    torch.testing.assert_close(total_grad, conv.grad)


def test_eq8_diagnostic_of_the_ablation_runner(tmp_path):
    """``eq8_mse@f`` columns: eq. 8 on the normalised embeddings, growing with the dropped fraction, the same
    seeded masks on every call (a rerun gives the same numbers)."""
    import numpy as np

    from pipeline.eval.sets import EvalSet
    from pipeline.experiments.diagnostics import DiagnosticContext, eq8_mse_diagnostic
    from pipeline.faces.io import encode_png, write_bin

    rng = np.random.default_rng(0)
    write_bin(
        tmp_path / "t.bin",
        [encode_png(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(8)],
        [True] * 4,
    )
    eval_set = EvalSet.from_bin(str(tmp_path / "t.bin"), name="t")
    net = build_network(tiny_cfg().model)
    ctx = DiagnosticContext(tmp_path, [eval_set], torch.device("cpu"), 112, {})
    got = eq8_mse_diagnostic(net, None, ctx)
    assert list(got) == ["eq8_mse@0.1", "eq8_mse@0.3", "eq8_mse@0.5"]
    assert 0 < got["eq8_mse@0.1"] < got["eq8_mse@0.3"] < got["eq8_mse@0.5"]
    assert eq8_mse_diagnostic(net, None, ctx) == got


# --------------------------------------------------------------------------- spec §8 on fixed validation faces


def test_occlusion_concentration_of_hand_made_changes():
    torch.manual_seed(11)
    clean = torch.randn(3, 20, 4, 4)
    occluded = clean.clone()
    occluded[0, 5] += 3.0  # sample 0: one channel changes → all of the change in the top 10 % (2 of 20)
    occluded[1] *= 1.5  # sample 1: every channel changes by the same relative 0.5 → spread evenly: 2/20
    occluded[2, :, 0, 0] = 0.0  # sample 2: one position of every channel blanked → against an explicit loop
    share, changed = occlusion_concentration(clean, occluded)
    assert share[0].item() == pytest.approx(1.0, abs=1e-7) and changed[0].nonzero().flatten().tolist()[0] == 5
    assert share[1].item() == pytest.approx(0.1, rel=1e-6) and int(changed.sum(1)[1]) == 2
    r = [
        math.sqrt(sum((float(occluded[2, i].flatten()[p]) - float(clean[2, i].flatten()[p])) ** 2 for p in range(16)))
        / math.sqrt(sum(float(v) ** 2 for v in clean[2, i].flatten()))
        for i in range(20)
    ]
    order = sorted(range(20), key=lambda i: -r[i])
    assert share[2].item() == pytest.approx(sum(r[i] for i in order[:2]) / sum(r), rel=1e-5)
    assert set(changed[2].nonzero().flatten().tolist()) == set(order[:2])


def test_occlude_faces_fills_the_bands_data_prep_draws():
    """The tensor version equals ``pipeline.faces.degrade.occlude_image`` on the uint8 faces, read as model input."""
    import numpy as np

    from pipeline.eval.embed import to_model_input
    from pipeline.faces.degrade import OcclusionParams, occlude_image

    u8 = torch.randint(0, 256, (2, 112, 112, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    faces = to_model_input(u8)
    for kind in ("eyes", "mask"):
        ref = to_model_input(
            torch.from_numpy(np.stack([occlude_image(im, kind, OcclusionParams()) for im in u8.numpy()]))
        )
        got = occlude_faces(faces, kind)
        assert torch.equal(got, ref), kind
        assert 0.05 < (got != faces).any(1).float().mean() < 0.5  # a band, not the whole face
    with pytest.raises(ValueError, match="kind"):
        occlude_faces(faces, "black")


def test_validation_monitors_of_lcd_against_hooks_and_loops():
    """Each value of ``LCD.validation_monitors`` recomputed from features the test captures with its own hooks,
    occlusions drawn by ``pipeline.faces.degrade.occlude_image`` and per-sample loops in float64."""
    import numpy as np

    from pipeline.eval.embed import to_model_input
    from pipeline.faces.degrade import OcclusionParams, occlude_image

    torch.manual_seed(12)
    net = build_network(tiny_cfg().model).train()
    with torch.no_grad():  # move the BatchNorm running statistics off their initial values
        for seed in range(3):
            net(images(8, seed=seed))
    u8 = torch.randint(0, 256, (6, 112, 112, 3), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    faces = to_model_input(u8)
    lcd = lcd_of(net)
    got = net.validation_monitors(faces)
    assert net.training  # left as it was

    net.eval()
    feats, bn_in = [], []
    h1 = lcd.register_forward_pre_hook(lambda m, a: feats.append(a[0].detach().double()))
    h2 = net.trunk.layer4[0].bn1.register_forward_pre_hook(lambda m, a: bn_in.append(a[0].detach().double()))
    with torch.no_grad():
        net.embed(faces)
        for kind in ("eyes", "mask"):
            occ = np.stack([occlude_image(im, kind, OcclusionParams()) for im in u8.numpy()])
            net.embed(to_model_input(torch.from_numpy(occ)))
        h1.remove()
        h2.remove()
        theta = [lcd.sam(f.float()).double() for f in feats]
    clean = feats[0]
    c, k = clean.shape[1], math.ceil(0.1 * clean.shape[1])
    for j, kind in enumerate(("eyes", "mask"), start=1):
        shares, vs_rest, shifts = [], [], []
        for n in range(len(faces)):
            r = [float((feats[j][n, i] - clean[n, i]).norm() / clean[n, i].norm()) for i in range(c)]
            top = sorted(range(c), key=lambda i: -r[i])[:k]
            rest = [i for i in range(c) if i not in top]
            shares.append(sum(r[i] for i in top) / sum(r))
            vs_rest.append(float(theta[j][n, top].mean() - theta[j][n, rest].mean()))
            shifts.append(float((theta[j][n, top] - theta[0][n, top]).mean()))
        # float32 features/reductions vs float64 loops: measured ≤ 9e-8 relative (θ: ≤ 2e-8 absolute); ~100× allowed
        assert got[f"lcd/occlusion_concentration/{kind}"] == pytest.approx(sum(shares) / len(shares), rel=1e-5)
        assert got[f"sam/theta_clean_vs_occluded/{kind}"] == pytest.approx(sum(vs_rest) / len(vs_rest), abs=1e-6)
        assert got[f"sam/theta_shift_on_changed/{kind}"] == pytest.approx(sum(shifts) / len(shifts), abs=1e-6)
    assert got["lcd/occlusion_concentration"] == pytest.approx(
        (got["lcd/occlusion_concentration/eyes"] + got["lcd/occlusion_concentration/mask"]) / 2, rel=1e-12
    )
    bn = net.trunk.layer4[0].bn1  # the first BatchNorm after LCD at layer3.branch: the next stage's first block
    x = bn_in[0]
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    run_mean, run_var = bn.running_mean.double(), bn.running_var.double()
    gap = ((mean - run_mean).abs() / (run_var + bn.eps).sqrt()).mean()
    loggap = ((var + bn.eps) / (run_var + bn.eps)).log().abs().mean()
    assert got["lcd/next_bn_mean_gap"] == pytest.approx(float(gap), rel=1e-5)
    assert got["lcd/next_bn_logvar_gap"] == pytest.approx(float(loggap), rel=1e-5)
    entropy, top10 = locality_stats(clean.float())
    assert got["lcd/spatial_entropy_val"] == pytest.approx(float(entropy.nanmean()), rel=1e-6)
    assert got["lcd/top10_energy_val"] == pytest.approx(float(top10.mean()), rel=1e-6)
    eq8 = eq8_mse(net, faces, 0.3, "layer3.branch", torch.Generator().manual_seed(0))["mse_unit"]
    assert got["lcd/eq8_mse@0.3"] == pytest.approx(float(eq8), rel=1e-6)


def test_networks_without_validation_monitors_report_none():
    net = build_network(tiny_cfg("model.inserts=[]").model)
    assert net.validation_monitors(images(2)) == {}


# --------------------------------------------------------------------------- eq. 6: the masked BN after a stage output


def test_masked_batchnorm_without_dropped_channels_is_batchnorm():
    torch.manual_seed(14)
    x = torch.randn(6, 5, 4, 3, requires_grad=True)
    ref, got = torch.nn.BatchNorm2d(5), MaskedBatchNorm2d(5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    got.load_state_dict(ref.state_dict())
    y_ref = ref(x)
    (g_ref,) = torch.autograd.grad((y_ref * torch.arange(5.0)[None, :, None, None]).sum(), x)
    y = got(x)
    (g,) = torch.autograd.grad((y * torch.arange(5.0)[None, :, None, None]).sum(), x)
    # another reduction order than ATen's fused kernel: measured ≤ 1e-6 (outputs, gradients) and 1.2e-7 (statistics)
    # over 20 seeds; 5e-6 allowed
    torch.testing.assert_close(y, y_ref, rtol=0, atol=5e-6)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=5e-6)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=5e-6)
    got.eval(), ref.eval()
    torch.testing.assert_close(got(x), ref(x))


def test_masked_batchnorm_is_eq6_over_the_samples_whose_channel_was_kept():
    torch.manual_seed(15)
    n, c, h, w = 5, 4, 3, 2
    x = torch.randn(n, c, h, w) + 2.0
    dropped = {(0, 1), (3, 1), (2, 2), *((t, 3) for t in range(n))}  # channel 3 dropped in every sample
    for t, i in dropped:
        x[t, i] = 0.0
    bn = MaskedBatchNorm2d(c, momentum=0.25)
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
    y = bn(x)
    xd = x.double()
    for i in range(c):
        kept = [t for t in range(n) if (t, i) not in dropped]
        if kept:
            values = xd[kept, i].flatten()
            mean, var = values.mean(), values.var(unbiased=False)
            unbiased = values.var(unbiased=True)
            assert bn.running_mean[i].item() == pytest.approx(0.75 * 0.5 + 0.25 * mean.item(), rel=1e-6)
            assert bn.running_var[i].item() == pytest.approx(0.75 * 2.0 + 0.25 * unbiased.item(), rel=1e-6)
        else:  # dropped everywhere: normalised with the running statistics, which stay as they were
            mean, var = torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
            assert (bn.running_mean[i].item(), bn.running_var[i].item()) == (0.5, 2.0)
        want = (xd[:, i] - mean) / torch.sqrt(var + bn.eps)  # every value, the dropped zeros too (γ = 1, β = 0)
        torch.testing.assert_close(y[:, i].double(), want, rtol=0, atol=1e-5)
    # eq. 5 (plain BN) would have counted the zeros: channel 1's mean is visibly different
    assert abs(x[:, 1].mean() - bn.running_mean[1]) > 0.1


def test_masked_next_bn_option_swaps_the_next_stages_first_bn():
    torch.manual_seed(16)
    plain = build_network(tiny_cfg("model.inserts=[{kind: lcd, at: layer3}]").model)
    net = build_network(tiny_cfg("model.inserts=[{kind: lcd, at: layer3, masked_next_bn: true}]").model)
    assert (
        type(net.trunk.layer4[0].bn1) is MaskedBatchNorm2d and type(plain.trunk.layer4[0].bn1) is torch.nn.BatchNorm2d
    )
    assert sum(isinstance(m, MaskedBatchNorm2d) for m in net.modules()) == 1
    assert list(net.state_dict()) == list(plain.state_dict())  # checkpoints interchange
    net.train()
    out = net(images(4))
    out.embedding.pow(2).mean().backward()
    assert net.trunk.layer4[0].bn1.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match=r"masked_next_bn.*stage-output point 'layerK'"):
        tiny_cfg("model.inserts=[{kind: lcd, at: layer3.branch, masked_next_bn: true}]")
    with pytest.raises(ConfigError, match=r"masked_next_bn: there is no next stage layer5"):
        build_network(tiny_cfg("model.inserts=[{kind: lcd, at: layer4, masked_next_bn: true}]").model)


def test_constant_sam_gate_is_a_frozen_per_channel_scale():
    """sam_gate: constant (spec §7.1's control): θ = θ̄ for every sample, a buffer (no parameters, no gradient);
    freeze_sam_to_mean gives a trained gate's θ̄ = its per-channel mean θ over the given faces."""
    torch.manual_seed(0)
    const = SpatialAttention(8, 5, gate="constant")
    assert list(const.parameters()) == [] and const.theta_bar.tolist() == [0.5] * 8
    x = torch.randn(6, 8, 5, 5)
    torch.testing.assert_close(const(x), torch.full((6, 8), 0.5), rtol=0, atol=0)
    lcd = LCD(8, 5, LCDOptions(sr=False, sam_gate="constant")).eval()
    torch.testing.assert_close(lcd(x), x * 0.5, rtol=0, atol=0)

    net = build_network(tiny_cfg().model).eval()
    faces = images(10, seed=1)
    seen = []
    handle = lcd_of(net).sam.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    net.embed(faces)
    handle.remove()
    assert freeze_sam_to_mean(net, faces) == 1
    sam = lcd_of(net).sam
    assert sam.gate == "constant"
    torch.testing.assert_close(sam.theta_bar, seen[0].double().mean(0).float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        sam(torch.randn(3, sam.channels, sam.spatial, sam.spatial)), sam.theta_bar.expand(3, -1), rtol=0, atol=0
    )
    assert freeze_sam_to_mean(net, faces) == 0  # already constant
    with pytest.raises(ConfigError, match="sam_gate"):
        load_config([REPO / "configs/lcd_r50.yaml"], ["model.inserts=[{kind: lcd, sam_gate: tanh}]"])
