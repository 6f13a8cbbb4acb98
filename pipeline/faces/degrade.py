"""One image of a face set under one degradation — the definitions every evaluation copy and ``verify --degrade``
share: Gaussian blur σ and bicubic down-up to S px (through :mod:`pipeline.data.degrade`, the loaders' own pixel
operations), and the synthetic occlusions (their geometry on insightface-aligned faces and their fill).

Occlusions are a *synthetic proxy*: the LCD paper evaluates on real occlusion (face masks, sunglasses), which a flat
band or rectangle only imitates. Kinds, for insightface-aligned faces (ArcFace 5-point template at 112 px: eyes
y≈51.6, nose tip y≈71.7, mouth corners y≈92.3, x 38–74; every geometry option is in template px at 112 and scaled to
the image's size):

- ``black`` / ``noise`` / ``face``: one random rectangle per image, filled with zeros, uniform
  random pixels, or the same rectangle of *another* image of the set (a donor whose bytes differ,
  drawn by the RNG). Area fraction ~ U(``occ_area``), width/height ratio log-uniform in
  ``occ_aspect``, position uniform inside the image. The three kinds use the same rectangle for
  the same image, so they differ only in the fill;
- ``eyes`` (sunglasses proxy): a black band over both eyes, rows eye-y ± ``eye_half_height``, columns ``eye_x``;
- ``mask`` (face-mask proxy): a flat ``mask_color`` band from ``mask_top`` (just below the
  nose tip) to the bottom of the image (the chin), full width.

Randomness is a function of (``seed``, image index in the set) only (numpy ``default_rng([seed, index, stream])``),
so an image's occlusion does not depend on which other images are processed or in which order. The copies of a
whole set are written by ``python -m data_prep.bin degrade`` / ``degrade-images``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data_prep.manifest import DataError


def _fmt(x: float) -> str:
    return f"{x:g}"


def degrade_image(img: np.ndarray, kind: str, level: float | None) -> np.ndarray:
    """uint8 (H,W,3) → degraded uint8 via pipeline.data.degrade, on values 0..255, rounded.

    ``occ-eyes`` / ``occ-mask`` (``level`` unused) are the default-geometry bands of
    :func:`occlude_image`; they depend on the image alone. The random occlusions need the image's
    index and its set: :func:`degrade_in_set`."""
    if kind in ("occ-eyes", "occ-mask"):
        return occlude_image(img, kind[4:], OcclusionParams())
    if kind.startswith("occ-"):
        raise ValueError(f"{kind} depends on the image's index and set: use degrade_in_set")
    import torch

    from pipeline.data.degrade import bicubic_down_up, gaussian_blur

    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float()
    if kind == "blur":
        y = gaussian_blur(x, float(level))
    elif kind == "lr":
        y = bicubic_down_up(x, int(level))
    else:
        raise ValueError(f"unknown degradation {kind!r}")
    return y.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def degradation_tag(kind: str, level: float | None) -> str:
    """``blur2``, ``lr14``, ``occ-eyes``: the suffix of a degraded copy's name."""
    return kind if level is None else f"{kind}{_fmt(level)}"


def degraded_name(stem: str, kind: str, level: float | None, cross: bool) -> str:
    return f"{stem}_{degradation_tag(kind, level)}{'_cross' if cross else ''}.bin"


def degradation_jobs(blur=(), lowres=(), occlude=(), where: str = "degrade") -> list[tuple[str, float | None]]:
    """``(kind, level)`` per requested degradation; DataError (one line) on a bad level or kind."""
    jobs = [("blur", s) for s in blur] + [("lr", s) for s in lowres]
    for kind, level in jobs:
        if (kind == "blur" and level <= 0) or (kind == "lr" and (int(level) != level or level < 1)):
            raise DataError(f"{where}: bad degradation level {kind} {level}")
    for kind in occlude:
        if kind not in OCCLUSION_KINDS:
            raise DataError(
                f"--occlude {kind!r}: unknown occlusion kind (expected one of {', '.join(OCCLUSION_KINDS)})"
            )
    return jobs + [(f"occ-{k}", None) for k in dict.fromkeys(occlude)]


# --------------------------------------------------------------------------- occlusion (synthetic proxy)

#: insightface's ArcFace 5-point template at 112×112 (x, y): left eye, right eye, nose tip, mouth corners.
ARCFACE_TEMPLATE_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)
TEMPLATE_SIZE = 112
OCCLUSION_KINDS = ("black", "noise", "face", "eyes", "mask")
MASK_COLORS = {"blue": (173, 216, 230), "white": (240, 240, 240), "black": (0, 0, 0)}  # blue: a surgical mask
# independent random streams per image: the rectangle must not shift when the fill changes kind
_RECT_STREAM, _FILL_STREAM, _DONOR_STREAM = 0, 1, 2


@dataclass(frozen=True)
class OcclusionParams:
    """Seed and geometry of the occlusions; lengths in template px at 112 (scaled to the image)."""

    seed: int = 0
    area: tuple[float, float] = (0.1, 0.3)  # random rectangle: fraction of the image area
    aspect: tuple[float, float] = (0.5, 2.0)  # random rectangle: width / height, log-uniform
    eye_half_height: float = 11.0  # eye band: rows eye-y ± this (≈ eyebrows to cheekbones)
    eye_x: tuple[float, float] = (24.0, 88.0)  # eye band: columns (both eyes, x 38–74, and the frames)
    mask_top: float = 76.0  # mask band: first row (the nose tip is at y 71.7); down to the chin
    mask_color: tuple[int, int, int] = MASK_COLORS["blue"]

    def validate(self) -> OcclusionParams:
        """self, or DataError (one line) naming the CLI option that is out of range."""
        (a0, a1), (r0, r1), (x0, x1) = self.area, self.aspect, self.eye_x
        checks = (
            (isinstance(self.seed, int) and self.seed >= 0, "--seed", self.seed, "must be an integer ≥ 0"),
            (0 < a0 <= a1 <= 1, "--occ-area", f"{a0:g} {a1:g}", "must satisfy 0 < MIN ≤ MAX ≤ 1"),
            (0 < r0 <= r1 < math.inf, "--occ-aspect", f"{r0:g} {r1:g}", "must satisfy 0 < MIN ≤ MAX"),
            (0 < self.eye_half_height < math.inf, "--eye-half-height", f"{self.eye_half_height:g}", "must be > 0"),
            (0 <= x0 < x1 <= TEMPLATE_SIZE, "--eye-x", f"{x0:g} {x1:g}", f"must satisfy 0 ≤ X0 < X1 ≤ {TEMPLATE_SIZE}"),
            (
                0 <= self.mask_top < TEMPLATE_SIZE,
                "--mask-top",
                f"{self.mask_top:g}",
                f"must lie in [0, {TEMPLATE_SIZE})",
            ),
            (
                len(self.mask_color) == 3 and all(0 <= c <= 255 for c in self.mask_color),
                "--mask-color",
                ",".join(map(str, self.mask_color)),
                "must be 3 values in 0..255",
            ),
        )
        for ok, option, value, rule in checks:
            if not ok:
                raise DataError(f"{option} {value}: {rule}")
        return self


def parse_mask_color(text: str) -> tuple[int, int, int]:
    """``blue`` | ``white`` | ``black`` | ``R,G,B``; DataError naming ``--mask-color`` otherwise."""
    if text.lower() in MASK_COLORS:
        return MASK_COLORS[text.lower()]
    try:
        rgb = tuple(int(c) for c in text.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise DataError(f"--mask-color {text}: expected {' | '.join(MASK_COLORS)} or R,G,B with values in 0..255")
    return rgb


def _px(value: float, size: int) -> int:
    """Template px at 112 → pixel edge at ``size``, rounded half up (Python's round() would go to even)."""
    return int(math.floor(value * size / TEMPLATE_SIZE + 0.5))


def _rng(params: OcclusionParams, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([params.seed, index, stream])


def occlusion_box(shape, kind: str, params: OcclusionParams, index: int = 0) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` (bottom/right exclusive) that ``kind`` fills in image ``index``."""
    h, w = shape[:2]
    if kind == "eyes":
        eye_y = (ARCFACE_TEMPLATE_112[0][1] + ARCFACE_TEMPLATE_112[1][1]) / 2
        top, bottom = _px(eye_y - params.eye_half_height, h), _px(eye_y + params.eye_half_height, h)
        return max(top, 0), min(bottom, h), _px(params.eye_x[0], w), _px(params.eye_x[1], w)
    if kind == "mask":
        return _px(params.mask_top, h), h, 0, w
    if kind in ("black", "noise", "face"):
        return _random_box(h, w, params, index)
    raise DataError(f"--occlude {kind!r}: unknown occlusion kind (expected one of {', '.join(OCCLUSION_KINDS)})")


def _random_box(h: int, w: int, params: OcclusionParams, index: int) -> tuple[int, int, int, int]:
    """Area fraction ~ U(area), width/height log-uniform in aspect, position uniform (RandomErasing-like)."""
    rng = _rng(params, index, _RECT_STREAM)
    area = rng.uniform(*params.area) * h * w
    ratio = math.exp(rng.uniform(math.log(params.aspect[0]), math.log(params.aspect[1])))
    box_h = min(max(int(round(math.sqrt(area / ratio))), 1), h)  # clipped: a tall, large box can exceed the image
    box_w = min(max(int(round(math.sqrt(area * ratio))), 1), w)
    top = int(rng.integers(0, h - box_h + 1))
    left = int(rng.integers(0, w - box_w + 1))
    return top, top + box_h, left, left + box_w


class DonorPool:
    """Which image lends its patch to image i for ``face``: any image of the set whose bytes differ
    from image i's (an identical copy elsewhere in the set would be no occlusion at all)."""

    def __init__(self, keys):
        self.keys = list(keys)
        self.copies: dict[str, list[int]] = {}  # content key → sorted indices holding it
        for i, key in enumerate(self.keys):
            self.copies.setdefault(key, []).append(i)

    def pick(self, index: int, seed: int) -> int:
        own = self.copies[self.keys[index]]
        others = len(self.keys) - len(own)
        if others < 1:
            raise DataError("--occlude face: the set needs at least two different images (a donor)")
        j = int(np.random.default_rng([seed, index, _DONOR_STREAM]).integers(others))
        for k in own:  # the j-th image not in `own`: step over own's indices (sorted) at or before it
            if k <= j:
                j += 1
        return j


def occlude_image(
    img: np.ndarray, kind: str, params: OcclusionParams, index: int = 0, donor: np.ndarray | None = None
) -> np.ndarray:
    """A copy of uint8 ``img`` (H,W,3) with ``kind`` filled in (see the module docstring); pixels
    outside :func:`occlusion_box` are untouched. ``face`` takes the ``donor`` image's same region."""
    top, bottom, left, right = occlusion_box(img.shape, kind, params, index)
    out = np.array(img, dtype=np.uint8, copy=True)
    region = (slice(top, bottom), slice(left, right))
    if kind in ("black", "eyes"):
        out[region] = 0
    elif kind == "mask":
        out[region] = params.mask_color
    elif kind == "noise":
        out[region] = _rng(params, index, _FILL_STREAM).integers(0, 256, (bottom - top, right - left, 3), np.uint8)
    else:  # face
        if donor is None or donor.shape != img.shape:
            got = "none" if donor is None else "x".join(map(str, donor.shape))
            raise DataError(f"--occlude face: image {index} needs a donor of shape {img.shape} (got {got})")
        out[region] = donor[region]
    return out


def degrade_in_set(images, donors: DonorPool, index: int, kind: str, level, params: OcclusionParams) -> np.ndarray:
    """Image ``index`` of a set under one degradation: blur / lr / bands depend on the image alone;
    the random occlusions on (seed, index) too, and ``occ-face`` on a donor image of the set."""
    if not kind.startswith("occ-"):
        return degrade_image(images[index], kind, level)
    occ = kind[4:]
    donor = images[donors.pick(index, params.seed)] if occ == "face" else None
    return occlude_image(images[index], occ, params, index, donor)
