"""The lrfr recipe: forward contract, eq. 7 assembled as the trainer does, configs, buckets.

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_lrfr.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import registry
from pipeline.config import ConfigError, load_config
from pipeline.data.degrade import bicubic_down_up
from pipeline.losses.margin import CombinedMargin
from pipeline.recipes.base import StepOutput
from tests.helpers import REPO


def tiny_cfg(*overrides):
    return load_config(
        [],
        [
            "recipe=lrfr",
            "model.backbone=iresnet18",
            "model.width=0.0625",
            "model.head.embedding_size=32",
            "model.input_size=32",
            "data.augment.paired=true",
            *overrides,
        ],
    )


def make_batch(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    sizes = torch.tensor([7, 14, 20, 20, 7, 14][:n])
    lr = torch.stack([bicubic_down_up(img[i], int(s)) for i, s in enumerate(sizes)])
    return {"image": img, "image_lr": lr, "label": torch.arange(n) % 3, "lr_size": sizes}


def test_forward_heads_aux_scalars_and_gradients():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = registry.build_recipe(cfg)
    batch = make_batch()
    out = model(batch)
    assert isinstance(out, StepOutput)
    assert set(out.heads) == {"hr", "lr"}
    assert out.heads["hr"].weight == 0.5 and out.heads["lr"].weight == 0.5
    assert out.heads["hr"].embeddings.shape == (6, 32)
    assert torch.equal(out.heads["lr"].labels, batch["label"])
    assert set(out.aux_losses) == {"dist"}
    assert {"dist", "dist_7px", "dist_14px", "dist_20px", "cos_hr_lr"} <= set(out.scalars)
    # per-bucket values are the means of the per-sample distance over each bucket
    model.eval()  # deterministic BN for an exact re-computation
    out = model(batch)
    with torch.no_grad():
        f_hr = model.net.embed(batch["image"])
        f_lr = model.net.embed(batch["image_lr"])
    for s in (7, 14, 20):
        idx = batch["lr_size"] == s
        from pipeline.losses.logexp import logexp_distance

        ref = logexp_distance(F.normalize(f_hr[idx], dim=1), F.normalize(f_lr[idx], dim=1), 1.0)
        assert out.scalars[f"dist_{s}px"].item() == pytest.approx(ref.item(), rel=1e-5)
    # gradient of the aux loss reaches the shared backbone through both views
    model.train()
    model.zero_grad()
    out = model(batch)
    out.aux_losses["dist"].backward()
    grads = [p.grad for p in model.net.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    # heads carry graphs too
    model.zero_grad()
    out = model(batch)
    (out.heads["hr"].embeddings.sum() + out.heads["lr"].embeddings.sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net.parameters())
    assert out.histograms["lrfr/dim_abs_error"].shape == (out.heads["hr"].embeddings.shape[1],)


def test_total_loss_as_trainer_assembles_matches_hand_computation():
    """L_all = λ·L_dist + ½·CE(CosFace(f_HR)) + ½·CE(CosFace(f_LR)) (eq. 7), computed by hand."""
    torch.manual_seed(1)
    cfg = tiny_cfg("method.lambda_dist=2.0", "margin.s=48", "margin.m2=0.0", "margin.m3=0.4")
    model = registry.build_recipe(cfg).eval()
    batch = make_batch(seed=3)
    n_cls = 3
    w = torch.randn(n_cls, 32, dtype=torch.float64)
    margin = CombinedMargin(s=cfg.margin.s, m1=cfg.margin.m1, m2=cfg.margin.m2, m3=cfg.margin.m3)

    out = model(batch)
    # what the trainer does: Σ_heads weight·CE(margin(cos)) + Σ aux
    total = sum(out.aux_losses.values())
    for head in out.heads.values():
        cos = F.normalize(head.embeddings.double(), dim=1) @ F.normalize(w, dim=1).t()
        total = total + head.weight * F.cross_entropy(margin(cos, head.labels), head.labels)

    # by hand, in numpy float64
    with torch.no_grad():
        f_hr = model.net.embed(batch["image"]).double().numpy()
        f_lr = model.net.embed(batch["image_lr"]).double().numpy()
    y = batch["label"].numpy()
    wn = w.numpy() / np.linalg.norm(w.numpy(), axis=1, keepdims=True)

    def cosface_ce(f):
        fn = f / np.linalg.norm(f, axis=1, keepdims=True)
        logits = 48.0 * (fn @ wn.T)
        logits[np.arange(len(y)), y] -= 48.0 * 0.4
        logits -= logits.max(1, keepdims=True)
        return float(np.mean(-(logits[np.arange(len(y)), y] - np.log(np.exp(logits).sum(1)))))

    hn = f_hr / np.linalg.norm(f_hr, axis=1, keepdims=True)
    ln = f_lr / np.linalg.norm(f_lr, axis=1, keepdims=True)
    D = hn.shape[1]
    l_dist = float(np.mean(np.log(1 + np.sum(np.exp(np.abs(hn - ln)) - 1, axis=1)) / D))
    hand = 2.0 * l_dist + 0.5 * cosface_ce(f_hr) + 0.5 * cosface_ce(f_lr)
    assert total.item() == pytest.approx(hand, rel=1e-5)


@pytest.mark.parametrize("dist,p", [("l1", 1.0), ("l2", 1.0), ("logexp", 2.0)])
def test_distance_switch(dist, p):
    torch.manual_seed(0)
    model = registry.build_recipe(tiny_cfg(f"method.distance={dist}", f"method.p={p}")).eval()
    batch = make_batch()
    out = model(batch)
    with torch.no_grad():
        hn = F.normalize(model.net.embed(batch["image"]), dim=1).double()
        ln = F.normalize(model.net.embed(batch["image_lr"]), dim=1).double()
    d = (hn - ln).abs()
    ref = {
        "l1": d.mean(1),
        "l2": 0.5 * d.pow(2).mean(1),
        "logexp": torch.log(1 + (torch.exp(d.pow(2)) - 1).sum(1)) / (2.0 * d.shape[1]),
    }[dist].mean()
    assert out.aux_losses["dist"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_config_validation_errors():
    with pytest.raises(ConfigError, match="method.distance"):
        registry.build_recipe(tiny_cfg("method.distance=cosine"))
    with pytest.raises(ConfigError, match="method.p"):
        registry.build_recipe(tiny_cfg("method.p=0.5"))
    with pytest.raises(ConfigError, match="data.augment.paired"):
        registry.build_recipe(load_config([], ["recipe=lrfr", "model.backbone=iresnet18", "model.width=0.0625"]))
    with pytest.raises(ConfigError, match="method.lambda_dist"):
        registry.build_recipe(tiny_cfg("method.lambda_dist=-1"))
    with pytest.raises(ConfigError, match="unknown key 'method.gamma'"):
        tiny_cfg("method.gamma=1")
    model = registry.build_recipe(tiny_cfg())
    with pytest.raises(ConfigError, match="image_lr"):
        model({"image": torch.zeros(2, 3, 32, 32), "label": torch.zeros(2, dtype=torch.long)})


def test_clean_bucket_and_embed():
    model = registry.build_recipe(tiny_cfg("data.augment.multires_p=0.5")).eval()
    batch = make_batch(n=4)
    batch["lr_size"] = torch.tensor([0, 0, 7, 7])
    batch["image_lr"][:2] = batch["image"][:2]
    out = model(batch)
    assert out.scalars["dist_clean"].item() == pytest.approx(0.0, abs=1e-7)
    assert "dist_7px" in out.scalars
    # fixed key set (the trainer all-reduces scalars by name): empty buckets read NaN
    assert {"dist_7px", "dist_14px", "dist_20px", "dist_clean"} <= set(out.scalars)
    assert torch.isnan(out.scalars["dist_14px"])
    model_p1 = registry.build_recipe(tiny_cfg("data.augment.multires_p=1.0"))
    assert "dist_clean" not in model_p1(batch).scalars
    emb = model.embed(batch["image"])
    assert emb.shape == (4, 32)
    torch.testing.assert_close(emb, model.net.embedder()(batch["image"]), rtol=0, atol=0)


def test_configs_hold_the_paper_settings_and_every_layer_stacks():
    r34 = load_config([REPO / "configs/lrfr_r34_casia.yaml"])
    assert r34.recipe == "lrfr" and r34.model.backbone == "iresnet34"
    assert (r34.margin.s, r34.margin.m1, r34.margin.m2, r34.margin.m3) == (48.0, 1.0, 0.0, 0.4)
    assert (r34.optim.lr, r34.optim.momentum, r34.optim.weight_decay) == (0.1, 0.9, 5e-4)
    assert (r34.schedule.kind, r34.schedule.epochs, r34.schedule.milestones, r34.schedule.gamma) == (
        "step",
        28,
        [16, 24],
        0.1,
    )
    assert r34.data.batch_size * 2 == 256  # per rank × the paper's 2 GPUs
    a = r34.data.augment
    assert a.paired and a.multires_p == 1.0 and a.multires_sizes == [7, 14, 20] and a.multires_weights == [1, 1, 2]
    m = r34.method
    assert (m.distance, m.p, m.lambda_dist, m.cls_weight_hr, m.cls_weight_lr, m.normalize) == (
        "logexp",
        1.0,
        1.0,
        0.5,
        0.5,
        True,
    )
    r50 = load_config([REPO / "configs/lrfr_r50_ms1m.yaml"])
    assert r50.model.backbone == "iresnet50" and r50.optim.lr == 0.01
    assert (r50.schedule.epochs, r50.schedule.milestones) == (16, [8, 12])
    assert r50.margin.s == 48.0 and r50.data.augment.multires_weights == [1, 1, 2]
    assert r50.data.batch_size * 8 == 256  # per rank × the 8 GPUs of jobs/lrfr_r50.sh

    layers = sorted((REPO / "configs/lrfr").glob("*.yaml"))
    assert len(layers) >= 15
    expect = {
        "aug_14px": lambda c: c.data.augment.multires_sizes == [14],
        "paug": lambda c: (
            c.data.augment.multires_sizes == [7, 14, 28, 56] and c.data.augment.multires_weights == [1, 1, 1, 1]
        ),
        "dist_l1": lambda c: c.method.distance == "l1",
        "dist_l2": lambda c: c.method.distance == "l2",
        "dist_logexp_p2": lambda c: c.method.distance == "logexp" and c.method.p == 2.0,
        "no_dist": lambda c: c.method.lambda_dist == 0.0,
        "baseline": lambda c: c.recipe == "margin" and not c.data.augment.paired,
        "ratio_1_0_1": lambda c: c.data.augment.multires_sizes == [7, 20] and c.data.augment.multires_weights == [1, 1],
        "ratio_2_1_1": lambda c: (
            c.data.augment.multires_sizes == [7, 14, 20] and c.data.augment.multires_weights == [2, 1, 1]
        ),
    }
    for layer in layers:
        for main in ("lrfr_r34_casia.yaml", "lrfr_r50_ms1m.yaml"):
            cfg = load_config([REPO / "configs" / main, layer])
            if layer.stem in expect:
                assert expect[layer.stem](cfg), layer.name
        if layer.stem.startswith("ratio_"):
            want = [int(v) for v in layer.stem.split("_")[1:]]
            got = dict(zip(cfg.data.augment.multires_sizes, cfg.data.augment.multires_weights))
            assert [got.get(s, 0) for s in (7, 14, 20)] == want, layer.name
    # Table 4 rows that stack two layers
    cfg = load_config(
        [REPO / "configs/lrfr_r34_casia.yaml", REPO / "configs/lrfr/aug_14px.yaml", REPO / "configs/lrfr/dist_l2.yaml"]
    )
    assert cfg.method.distance == "l2" and cfg.data.augment.multires_sizes == [14]


# --------------------------------------------------------------------------- lowres evaluation


@pytest.mark.parametrize("normalize", [True, False])
def test_released_form_is_one_log_over_the_batch(normalize):
    """method.form=released: L = log(1 + Σ_n Σ_i (exp|x−y| − 1)) / (p·B) (the authors' ExpDist), on raw or
    normalised embeddings; reference in float64 from the formula."""
    torch.manual_seed(0)
    model = registry.build_recipe(tiny_cfg("method.form=released", f"method.normalize={str(normalize).lower()}"))
    model.eval()
    batch = make_batch()
    out = model(batch)
    with torch.no_grad():
        h, low = model.net.embed(batch["image"]).double(), model.net.embed(batch["image_lr"]).double()
        if normalize:
            h, low = F.normalize(h, dim=1), F.normalize(low, dim=1)
    d = (h - low).abs()
    ref = torch.log(1 + (torch.exp(d) - 1).sum()) / (1.0 * d.shape[0])
    assert out.aux_losses["dist"].item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="form"):
        registry.build_recipe(tiny_cfg("method.form=released", "method.distance=l2"))
    with pytest.raises(ConfigError, match="form"):
        registry.build_recipe(tiny_cfg("method.form=authors"))


def test_a_tensor_both_views_watch_is_reported_once():
    """LCD watches its conv's kernel in the HR and the LR pass: one leaf, one gradient (both passes summed), so
    one ``grad_norm/<name>/…`` entry; per-view tensors (a SCAN kernel recomputed per pass) keep hr/ and lr/."""
    from pipeline.recipes.lrfr import _merge_watched

    leaf = torch.zeros(3, requires_grad=True)
    hr_act, lr_act = leaf * 2, leaf * 3
    merged = _merge_watched({"lcd_conv": leaf, "scan": hr_act}, {"lcd_conv": leaf, "scan": lr_act})
    assert list(merged) == ["lcd_conv", "hr/scan", "lr/scan"]
    assert merged["lcd_conv"] is leaf and merged["hr/scan"] is hr_act and merged["lr/scan"] is lr_act
