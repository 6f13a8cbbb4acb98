"""The augmentation spec: each step against an independent computation; draw ratios; DALI graph parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import chisquare

from pipeline.config import AugmentConfig, ConfigError
from pipeline.data import augment
from pipeline.data.augment import Augmenter, crop_box, decode, draw_resolution, photometric, sample_generator
from pipeline.data.degrade import bicubic_down_up, gaussian_blur

SIZES, WEIGHTS = [7, 14, 20], [1.0, 1.0, 2.0]


@pytest.fixture(autouse=True)
def _one_thread():
    """Per-image ops are tiny: one thread is much faster on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _face(lfw_train, i=0) -> bytes:
    return sorted(lfw_train.rglob("*.jpg"))[i].read_bytes()


def _counts(draws) -> np.ndarray:
    return np.array([int(np.sum(np.asarray(draws) == s)) for s in SIZES])


def test_torch_resolution_draws_follow_1_1_2():
    g = torch.Generator().manual_seed(123)
    draws = [draw_resolution(g, SIZES, WEIGHTS) for _ in range(4000)]
    counts = _counts(draws)
    assert counts.sum() == 4000
    expected = 4000 * np.array(WEIGHTS) / sum(WEIGHTS)
    assert chisquare(counts, expected).pvalue > 1e-3, counts
    # the test has power: the same draws are clearly not 1:1:1
    assert chisquare(counts, np.full(3, 4000 / 3)).pvalue < 1e-6


def test_dali_resolution_draws_follow_1_1_2():
    from nvidia.dali import pipeline_def

    from pipeline.data.dali_loader import dali_draw_resolution

    @pipeline_def(batch_size=500, num_threads=1, device_id=None, seed=7)
    def pipe():
        return dali_draw_resolution(SIZES, WEIGHTS)

    p = pipe()
    p.build()
    draws = np.concatenate([np.array(p.run()[0].as_array()).reshape(-1) for _ in range(8)])
    counts = _counts(draws)
    assert counts.sum() == 4000, np.unique(draws)
    expected = 4000 * np.array(WEIGHTS) / sum(WEIGHTS)
    assert chisquare(counts, expected).pvalue > 1e-3, counts
    assert chisquare(counts, np.full(3, 4000 / 3)).pvalue < 1e-6


def test_paired_lr_is_bicubic_down_up_of_its_hr(lfw_train):
    cfg = AugmentConfig(flip=0.0, multires_p=1.0, multires_sizes=[14], multires_weights=[1.0], paired=True)
    x = decode(_face(lfw_train), 112)
    out = Augmenter(cfg, 112)(x, sample_generator(0))
    assert out["lr_size"] == 14
    hr, lr = (out["image"] + 1) / 2, (out["image_lr"] + 1) / 2
    assert torch.allclose(hr, x, atol=1e-6)  # no multires on the HR partner
    assert torch.allclose(lr, bicubic_down_up(hr, 14), atol=1e-6)
    # independent reference for the down step: PIL's antialiased bicubic on each float channel
    small = torch.nn.functional.interpolate(
        hr[None], size=(14, 14), mode="bicubic", antialias=True, align_corners=False
    )[0]
    pil = np.stack(
        [np.asarray(Image.fromarray(hr[c].numpy(), mode="F").resize((14, 14), Image.BICUBIC)) for c in range(3)]
    )
    assert np.abs(small.numpy() - pil).max() < 2e-3
    # and the LR copy really lost detail: far from the HR image
    assert (lr - hr).abs().mean() > 0.01


@pytest.mark.parametrize("size", [7, 14, 20])
def test_bicubic_down_up_is_pils_within_1e6(lfw_train, size):
    """Both steps equal PIL's Image.resize(BICUBIC) in float mode ("F", no rounding) on real faces,
    within 1e-6 on a [0, 1] scale, after the same clamp to the input's range. (PyTorch's plain
    bicubic up-sampling, a = -0.75, was off by 0.0045 mean / 0.031 max here.)"""
    faces = sorted(p for p in lfw_train.rglob("*.jpg"))[::300][:6]
    worst = 0.0
    for path in faces:
        x = decode(path.read_bytes(), 112)  # (3, 112, 112) in [0, 1]
        got = bicubic_down_up(x, size)
        ref = np.stack(
            [
                np.asarray(
                    Image.fromarray(x[c].numpy(), mode="F")
                    .resize((size, size), Image.BICUBIC)
                    .resize((112, 112), Image.BICUBIC)
                )
                for c in range(3)
            ]
        )
        ref = np.clip(ref, float(x.min()), float(x.max()))
        worst = max(worst, float(np.abs(got.numpy() - ref).max()))
    assert worst <= 1e-6, worst


def test_paired_hr_and_lr_share_flip_crop_and_draws(lfw_train):
    cfg = AugmentConfig(flip=1.0, crop_p=1.0, blur_p=1.0, blur_sigma=[1.0, 1.0], multires_p=1.0, paired=True)
    x = decode(_face(lfw_train), 112)
    out = Augmenter(cfg, 112)(x, sample_generator(5, "k"))
    hr = (out["image"] + 1) / 2
    assert torch.allclose((out["image_lr"] + 1) / 2, bicubic_down_up(hr, out["lr_size"]), atol=1e-6)
    # same generator → same output; the unpaired variant gives the LR copy as its image
    again = Augmenter(cfg, 112)(x, sample_generator(5, "k"))
    assert torch.equal(again["image_lr"], out["image_lr"])
    single = Augmenter(AugmentConfig(**{**cfg.__dict__, "paired": False}), 112)(x, sample_generator(5, "k"))
    assert set(single) == {"image"} and torch.equal(single["image"], out["image_lr"])


def test_crop_box_matches_randomresizedcrop_geometry():
    S, scale = 112, (0.2, 1.0)
    rng = np.random.default_rng(0)
    areas, unclamped = [], 0
    for _ in range(3000):
        u = rng.random(4)
        y0, x0, h, w = crop_box(*u, size=S, scale=scale)
        assert 0 <= y0 and 0 <= x0 and y0 + h <= S and x0 + w <= S and h >= 1 and w >= 1
        # independent: the torchvision formulas before rounding
        area = (scale[0] + (scale[1] - scale[0]) * u[0]) * S * S
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
        if w < S and h < S:
            unclamped += 1
            assert abs(w - math.sqrt(area * ratio)) <= 0.5 and abs(h - math.sqrt(area / ratio)) <= 0.5
            areas.append(area)
        # the corner is uniform over valid positions: its bound is exact
        assert x0 == min(S - w, math.floor(u[2] * (S - w + 1)))
    assert unclamped > 2000


def test_zero_pad_crop_keeps_the_rectangle_in_place(lfw_train):
    cfg = AugmentConfig(flip=0.0, crop_p=1.0)
    x = decode(_face(lfw_train), 112)
    g = sample_generator(3)
    out = (Augmenter(cfg, 112)(x, g)["image"] + 1) / 2
    g = sample_generator(3)  # p=1 draws no coin: the first four uniforms are the box
    y0, x0, h, w = crop_box(*torch.rand(4, generator=g, dtype=torch.float64).tolist(), size=112, scale=cfg.crop_scale)
    ref = np.zeros((3, 112, 112), np.float32)
    ref[:, y0 : y0 + h, x0 : x0 + w] = x.numpy()[:, y0 : y0 + h, x0 : x0 + w]
    assert np.abs(out.numpy() - ref).max() < 1e-6
    assert out.shape == x.shape


def test_photometric_matches_torchvision_formulas():
    # independent numpy reference of torchvision's adjust_brightness → adjust_contrast →
    # adjust_saturation (grey = BT.601 luma); values chosen so that no clamping happens
    rng = np.random.default_rng(1)
    x = (0.35 + 0.2 * rng.random((3, 32, 32))).astype(np.float64)
    b, c, s = 1.2, 0.8, 1.3
    w = np.array(augment.GRAY_WEIGHTS).reshape(3, 1, 1)
    y = x * b
    m = (y * w).sum(0).mean()
    y = m + c * (y - m)
    g = (y * w).sum(0, keepdims=True)
    y = g + s * (y - g)
    assert y.min() > 0 and y.max() < 1
    out = photometric(torch.from_numpy(x).float(), b, c, s).double().numpy()
    assert np.abs(out - y).max() < 1e-5


def test_blur_branch_uses_sigma_range(lfw_train):
    cfg = AugmentConfig(flip=0.0, blur_p=1.0, blur_sigma=[1.5, 1.5])
    x = decode(_face(lfw_train), 112)
    out = (Augmenter(cfg, 112)(x, sample_generator(0))["image"] + 1) / 2
    assert torch.allclose(out, gaussian_blur(x, 1.5), atol=1e-6)


def test_probabilities_are_respected(lfw_train):
    x = decode(_face(lfw_train), 48)
    aug = Augmenter(AugmentConfig(flip=0.5, multires_p=0.25, paired=True), 48)
    flips = degraded = 0
    for i in range(400):
        out = aug(x, sample_generator(i))
        flips += bool(torch.allclose((out["image"] + 1) / 2, x.flip(-1), atol=1e-6))
        degraded += out["lr_size"] > 0
    assert 160 < flips < 240 and 70 < degraded < 130


def test_decode_is_pil_and_output_range(lfw_train):
    data = _face(lfw_train, 3)
    import io

    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32).transpose(2, 0, 1) / 255
    x = decode(data, 112)
    assert x.shape == (3, 112, 112) and np.abs(x.numpy() - ref).max() < 1e-6
    cfg = AugmentConfig(crop_p=0.5, blur_p=0.5, photometric_p=0.5, multires_p=1.0, paired=True)
    for i in range(20):
        out = Augmenter(cfg, 112)(x, sample_generator(i))
        for k in ("image", "image_lr"):
            assert out[k].dtype == torch.float32 and out[k].min() >= -1 and out[k].max() <= 1
    small = decode(data, 64)  # stored size differs from the input size → resized
    assert small.shape == (3, 64, 64)


@pytest.mark.parametrize(
    "field,value",
    [
        ("flip", 1.5),
        ("multires_p", -0.1),
        ("multires_weights", [1.0, 1.0]),
        ("multires_sizes", [7, 0, 20]),
        ("crop_scale", [0.5, 0.2]),
        ("blur_sigma", [0.0, 1.0]),
        ("brightness", -1.0),
    ],
)
def test_bad_spec_is_a_one_line_error(field, value):
    cfg = AugmentConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"data.augment.{field}"):
        augment.validate(cfg)
