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


# --------------------------------------------------------------------------- AdaFace low-res rescale, Cutout

INTERPS = ["nearest", "linear", "cubic", "lanczos"]


def _ref_kernel(name, t):
    t = abs(t)
    if name == "linear":
        return max(0.0, 1.0 - t)
    if name == "cubic":  # Keys, a = -0.5
        return 1.5 * t**3 - 2.5 * t**2 + 1 if t < 1 else (-0.5 * t**3 + 2.5 * t**2 - 4 * t + 2 if t < 2 else 0.0)
    return float(np.sinc(t) * np.sinc(t / 3)) if t < 3 else 0.0  # Lanczos-3


def _ref_resize_axis(a: np.ndarray, n: int, name: str, axis: int) -> np.ndarray:
    """Hand computation of one 1-D resize, pixel by pixel, from the module doc's definition."""
    a = np.moveaxis(a, axis, 0)
    m = a.shape[0]
    out = np.zeros((n,) + a.shape[1:])
    for i in range(n):
        if name == "nearest":
            out[i] = a[((2 * i + 1) * m) // (2 * n)]  # floor((i + 1/2)·m/n), exact
            continue
        radius = {"linear": 1, "cubic": 2, "lanczos": 3}[name]
        c = (i + 0.5) * m / n - 0.5
        taps = [j for j in range(math.floor(c) - radius, math.ceil(c) + radius + 1) if abs(j - c) < radius]
        w = np.array([_ref_kernel(name, j - c) for j in taps])
        for j, wj in zip(taps, w / w.sum()):
            out[i] += wj * a[min(max(j, 0), m - 1)]  # replicated border
    return np.moveaxis(out, 0, axis)


def _ref_low_res(x: torch.Tensor, small: int, down: str, up: str) -> np.ndarray:
    a = x.double().numpy()
    for n, name in ((small, down), (x.shape[-1], up)):
        a = np.clip(_ref_resize_axis(_ref_resize_axis(a, n, name, 1), n, name, 2), 0.0, 1.0)
    return a


def test_low_res_matches_a_hand_computation_and_pil(lfw_train):
    """degrade.low_res against the pixel-by-pixel definition (every filter as down and as up step; 22 px has
    exact nearest-neighbour ties, 56 px is an integer factor), linear against PyTorch's bilinear, and the
    up step inside the image against PIL (which only differs at the border: it drops the taps outside)."""
    from pipeline.data.degrade import low_res, resize_square

    x = decode(_face(lfw_train, 7), 112)
    worst = 0.0
    for small in (22, 37, 56):
        for k, down in enumerate(INTERPS):
            up = INTERPS[(k + small) % 4]
            worst = max(
                worst,
                float(np.abs(low_res(x, small, down, up).double().numpy() - _ref_low_res(x, small, down, up)).max()),
            )
    assert worst < 1e-6, worst
    assert torch.equal(low_res(x, 112, "cubic", "lanczos"), x.clamp(0, 1))  # r = 1: AdaFace's no-op
    # linear = PyTorch's bilinear (align_corners=False, no antialias), i.e. OpenCV's INTER_LINEAR formula
    bil = torch.nn.functional.interpolate(x[None].double(), size=(37, 37), mode="bilinear", align_corners=False)[0]
    assert (resize_square(x.double(), 37, "linear") - bil).abs().max() < 1e-9
    # up-sampling: PIL's filters (float mode) agree away from the border
    small = resize_square(x, 37, "linear")
    pil_f = {"linear": Image.BILINEAR, "cubic": Image.BICUBIC, "lanczos": Image.LANCZOS}
    for name, f in pil_f.items():
        ours = resize_square(small, 112, name).numpy()
        ref = np.stack(
            [np.asarray(Image.fromarray(small[c].numpy(), mode="F").resize((112, 112), f)) for c in range(3)]
        )
        inner = slice(12, 100)  # > 3 source px (3·112/37 ≈ 9 output px) from the border
        assert np.abs(ours[:, inner, inner] - ref[:, inner, inner]).max() < 2e-6, name


def test_low_res_branch_of_the_augmenter(lfw_train):
    from pipeline.data.degrade import low_res

    cfg = AugmentConfig(flip=0.0, lowres_p=1.0, lowres_ratio=[0.2, 0.6], lowres_interp=INTERPS, paired=True)
    x = decode(_face(lfw_train), 112)
    seen = set()
    for i in range(12):
        out = Augmenter(cfg, 112)(x, sample_generator(i))
        g = sample_generator(i)  # p = 1 draws no coin: one uniform (the side), then two interpolation indices
        small = augment.lowres_side(torch.rand((), generator=g, dtype=torch.float64).item(), 112, cfg.lowres_ratio)
        down, up = (INTERPS[int(j)] for j in torch.randint(4, (2,), generator=g))
        assert 22 <= small <= 67  # int(0.2·112) .. int(0.6·112)
        assert torch.allclose((out["image"] + 1) / 2, low_res(x, small, down, up), atol=1e-6)
        assert out["lr_size"] == 0 and torch.equal(out["image_lr"], out["image"])  # low-res is part of the HR image
        seen.add((down, up))
    assert len(seen) >= 6  # down and up are drawn independently


def test_cutout_box_geometry():
    S, side = 112, 56
    rng = np.random.default_rng(0)
    centres = []
    for _ in range(3000):
        uy, ux = rng.random(2)
        y0, x0, h, w = augment.cutout_box(uy, ux, S, side)
        cy, cx = math.floor(uy * S), math.floor(ux * S)
        centres.append(cx)
        # independent: the unclipped square [c - 28, c + 28) intersected with [0, S)
        assert (y0, h) == (max(0, cy - 28), min(S, cy + 28) - max(0, cy - 28))
        assert (x0, w) == (max(0, cx - 28), min(S, cx + 28) - max(0, cx - 28))
        assert 28 <= h <= 56 and 28 <= w <= 56
    assert augment.cutout_box(0.5, 0.5, S, 7) == (53, 53, 7, 7)  # odd side: exactly 7 px
    assert augment.cutout_box(0.999999, 0.0, S, 224) == (0, 0, 112, 112)  # 2·S: always the whole image
    # the centre is uniform over the pixels: every column hit, none more than 2x its share
    counts = np.bincount(centres, minlength=S)
    assert counts.min() > 0 and counts.max() < 2 * 3000 / S


def test_cutout_is_an_exact_black_square_and_the_lr_copy_inherits_it(lfw_train):
    cfg = AugmentConfig(
        flip=0.0, cutout_p=1.0, cutout_size=40, multires_p=1.0, multires_sizes=[14], multires_weights=[1.0], paired=True
    )
    x = decode(_face(lfw_train), 112)
    out = Augmenter(cfg, 112)(x, sample_generator(11))
    g = sample_generator(11)
    y0, x0, h, w = augment.cutout_box(*torch.rand(2, generator=g, dtype=torch.float64).tolist(), size=112, side=40)
    ref = x.numpy().copy()
    ref[:, y0 : y0 + h, x0 : x0 + w] = 0.0
    hr = ((out["image"] + 1) / 2).numpy()
    assert np.abs(hr - ref).max() < 1e-6 and h * w >= 400
    assert torch.allclose((out["image_lr"] + 1) / 2, bicubic_down_up(torch.from_numpy(hr), 14), atol=1e-6)


def _binomial_ok(k: int, n: int, p: float) -> bool:
    """|k - np| within 4.5 standard deviations (two-sided false alarm < 1e-5)."""
    return abs(k - n * p) <= 4.5 * math.sqrt(n * p * (1 - p))


def test_low_res_and_cutout_probabilities(lfw_train):
    x = decode(_face(lfw_train), 48)  # small images: the count is what matters
    n, p = 500, 0.3
    lr = Augmenter(AugmentConfig(flip=0.0, lowres_p=p, lowres_ratio=[0.3, 0.5], lowres_interp=["linear"]), 48)
    co = Augmenter(AugmentConfig(flip=0.0, cutout_p=p, cutout_size=24), 48)
    k_lr = sum(not torch.allclose((lr(x, sample_generator(i))["image"] + 1) / 2, x, atol=1e-6) for i in range(n))
    k_co = 0
    for i in range(n):
        changed = ((co(x, sample_generator(i))["image"] + 1) / 2 - x).abs() > 1e-6
        k_co += bool(changed.any())
    assert _binomial_ok(k_lr, n, p) and _binomial_ok(k_co, n, p), (k_lr, k_co)
    assert not _binomial_ok(k_lr, n, 0.5) and not _binomial_ok(k_co, n, 0.15)  # the bound has power


@pytest.mark.parametrize(
    "field,value",
    [
        ("lowres_p", 1.2),
        ("cutout_p", -0.5),
        ("lowres_ratio", [0.0, 1.0]),
        ("lowres_ratio", [0.5, 1.5]),
        ("lowres_ratio", [0.8, 0.2]),
        ("lowres_interp", []),
        ("lowres_interp", ["area"]),
        ("lowres_interp", ["linear", "bicubic"]),
        ("cutout_size", 0),
        ("cutout_size", 16.5),
    ],
)
def test_bad_low_res_or_cutout_spec_is_a_one_line_error(field, value):
    with pytest.raises(ConfigError, match=f"data.augment.{field}") as exc:
        augment.validate(AugmentConfig(**{field: value}))
    assert "\n" not in str(exc.value)


def _dali_run(batch_fn, inputs: list[list]):
    """Run a one-iteration CPU DALI pipeline over per-sample numpy inputs; returns its outputs as numpy lists."""
    from nvidia.dali import fn, pipeline_def

    n = len(inputs[0])

    def feed(a):
        return fn.external_source(source=lambda: a, batch=True, layout="HWC" if a[0].ndim == 3 else None)

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, seed=0)
    def pipe():
        return batch_fn(*[feed(a) for a in inputs])

    p = pipe()
    p.build()
    return [[np.array(t[i]) for i in range(n)] for t in p.run()]


def test_dali_low_res_equals_torch_per_interpolation(lfw_train):
    """DALI's CPU operators (dali_low_res) and the torch engine on the same faces, sides and interpolations
    (every down × up pair; 22 px has exact nearest ties, 111/56 px near-identity and integer factors).
    Measured max |Δ| on [0, 1], by the less exact filter of the pair: nearest 0, linear 3.5e-6, cubic 5.2e-4,
    lanczos 5.1e-4
    (DALI tabulates the cubic and Lanczos kernels at 1/32 px and interpolates linearly). Bounds ≈ 1.5×."""
    from pipeline.data.dali_loader import dali_interp_codes, dali_low_res
    from pipeline.data.degrade import low_res

    faces = [decode(_face(lfw_train, i), 112) for i in (0, 500)]
    cases = [(f, s, d, u) for f in faces for d in INTERPS for u in INTERPS for s in ((22, 56) if d == u else (37, 111))]
    imgs = [f.permute(1, 2, 0).contiguous().numpy() for f, *_ in cases]
    smalls = [np.array(s, np.float32) for _, s, _, _ in cases]
    downs = [dali_interp_codes([d])[0:1].reshape(()) for *_, d, _ in cases]
    ups = [dali_interp_codes([u])[0:1].reshape(()) for *_, u in cases]
    (got,) = _dali_run(lambda im, s, d, u: (dali_low_res(im, s, d, u, 112),), [imgs, smalls, downs, ups])
    worst = {n: 0.0 for n in INTERPS}
    for (f, s, d, u), g in zip(cases, got):
        delta = float(np.abs(g.transpose(2, 0, 1) - low_res(f, s, d, u).numpy()).max())
        key = max((d, u), key=INTERPS.index)  # the less exact filter of the pair
        worst[key] = max(worst[key], delta)
    print("max |DALI - torch| by filter:", {k: f"{v:.1e}" for k, v in worst.items()})
    bound = {"nearest": 1e-6, "linear": 1e-5, "cubic": 8e-4, "lanczos": 8e-4}
    assert all(worst[k] <= bound[k] for k in INTERPS), worst


def test_dali_cutout_equals_torch_with_and_without_mirror(lfw_train):
    """dali_cutout_box + dali_cutout, mirrored at the end as the DALI loader does, against the torch engine's
    flip-then-cutout on the same draws: identical pixels."""
    from nvidia.dali import fn

    from pipeline.data.dali_loader import dali_cutout, dali_cutout_box

    x = decode(_face(lfw_train, 3), 112)
    rng = np.random.default_rng(3)
    us = [rng.random(2) for _ in range(12)] + [np.array([0.0, 0.999]), np.array([0.999, 0.0])]  # corners: clipped
    mirrors = [i % 2 for i in range(len(us))]

    def graph(im, uy, ux, m):
        y0, x0, h, w = dali_cutout_box(40, 112, uy, ux)
        return (fn.flip(dali_cutout(im, y0, x0, h, w, m, 112), horizontal=m),)

    img = x.permute(1, 2, 0).contiguous().numpy()
    (got,) = _dali_run(
        graph,
        [
            [img] * len(us),
            [np.array(u[0], np.float32) for u in us],
            [np.array(u[1], np.float32) for u in us],
            [np.array(m, np.int32) for m in mirrors],
        ],
    )
    for u, m, g in zip(us, mirrors, got):
        box = augment.cutout_box(float(np.float32(u[0])), float(np.float32(u[1])), 112, 40)
        ref = augment.cutout(x.flip(-1) if m else x, box)
        assert np.abs(g.transpose(2, 0, 1) - ref.numpy()).max() == 0.0, (u, m, box)
