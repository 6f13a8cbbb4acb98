"""Procedurally generated face-like identities: the demo's embedded default dataset.

Each identity is a fixed set of drawing parameters (head shape, skin and hair colour, eye,
brow, nose and mouth geometry); each image of it re-draws them with a small pose shift,
lighting, expression, blur and noise. Identities are disjoint by construction, so a held-out
set of identities gives an honest verification test with no download.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 112


@dataclass
class Identity:
    skin: tuple
    hair: tuple
    eye_colour: tuple
    head_w: float
    head_h: float
    eye_dx: float
    eye_y: float
    eye_r: float
    brow_tilt: float
    nose_len: float
    nose_w: float
    mouth_w: float
    mouth_y: float
    hair_h: float
    fringe: int
    beard: bool


def random_identity(rng: random.Random) -> Identity:
    def colour(lo, hi):
        return tuple(rng.randint(lo, hi) for _ in range(3))

    return Identity(
        skin=(rng.randint(120, 240), rng.randint(90, 200), rng.randint(60, 170)),
        hair=colour(10, 200),
        eye_colour=colour(20, 160),
        head_w=rng.uniform(0.52, 0.72),
        head_h=rng.uniform(0.70, 0.90),
        eye_dx=rng.uniform(0.13, 0.22),
        eye_y=rng.uniform(0.38, 0.48),
        eye_r=rng.uniform(0.035, 0.07),
        brow_tilt=rng.uniform(-0.05, 0.05),
        nose_len=rng.uniform(0.10, 0.20),
        nose_w=rng.uniform(0.04, 0.10),
        mouth_w=rng.uniform(0.12, 0.26),
        mouth_y=rng.uniform(0.68, 0.78),
        hair_h=rng.uniform(0.05, 0.22),
        fringe=rng.randint(0, 3),
        beard=rng.random() < 0.3,
    )


def render(ident: Identity, rng: random.Random, size: int = SIZE) -> Image.Image:
    """One image of ``ident`` under random pose, lighting, expression, blur and noise."""
    s = size * 2  # draw at 2x, downsample for anti-aliasing
    bg = tuple(rng.randint(0, 255) for _ in range(3))
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)
    cx, cy = s * (0.5 + rng.uniform(-0.04, 0.04)), s * (0.52 + rng.uniform(-0.04, 0.04))
    hw, hh = ident.head_w * s / 2, ident.head_h * s / 2
    top = cy - hh
    d.ellipse([cx - hw * 1.04, top - ident.hair_h * s, cx + hw * 1.04, cy + hh * 0.2], fill=ident.hair)
    d.ellipse([cx - hw, top, cx + hw, cy + hh], fill=ident.skin)
    if ident.fringe:
        d.chord(
            [cx - hw, top - ident.hair_h * s * 0.5, cx + hw, top + hh * 0.25 * ident.fringe], 180, 360, fill=ident.hair
        )
    if ident.beard:
        d.chord([cx - hw * 0.9, cy, cx + hw * 0.9, cy + hh * 1.0], 0, 180, fill=ident.hair)
    ey = top + ident.eye_y * 2 * hh
    er = ident.eye_r * s
    for sign in (-1, 1):
        ex = cx + sign * ident.eye_dx * s
        d.ellipse([ex - er * 1.6, ey - er, ex + er * 1.6, ey + er], fill=(245, 245, 245))
        d.ellipse([ex - er * 0.8, ey - er * 0.8, ex + er * 0.8, ey + er * 0.8], fill=ident.eye_colour)
        by = ey - er * 2.2
        d.line(
            [ex - er * 1.8, by + sign * ident.brow_tilt * s, ex + er * 1.8, by - sign * ident.brow_tilt * s],
            fill=ident.hair,
            width=max(2, int(er * 0.6)),
        )
    ny = ey + ident.nose_len * s
    shade = tuple(max(0, c - 50) for c in ident.skin)
    d.polygon([(cx, ey + er), (cx - ident.nose_w * s, ny), (cx + ident.nose_w * s, ny)], fill=shade)
    my = top + ident.mouth_y * 2 * hh
    mw = ident.mouth_w * s / 2
    open_ = rng.uniform(0.0, 0.04) * s
    d.ellipse([cx - mw, my - open_ - 3, cx + mw, my + open_ + 3], fill=(150, 40, 50))
    img = img.rotate(rng.uniform(-8, 8), resample=Image.BILINEAR, fillcolor=bg)
    img = img.resize((size, size), Image.LANCZOS)
    arr = np.asarray(img).astype(np.float32)
    gain = rng.uniform(0.7, 1.3)
    light = np.linspace(rng.uniform(-30, 30), rng.uniform(-30, 30), size, dtype=np.float32)[None, :, None]
    arr = arr * gain + light + np.random.default_rng(rng.getrandbits(32)).normal(0, 6, arr.shape)
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    return img


def jpeg_bytes(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_folder(root: Path, num_ids: int, per_id: int, seed: int) -> list[list[Path]]:
    """A class-per-folder tree ``root/id_00000/000.jpg``; returns the paths per identity."""
    rng = random.Random(seed)
    out = []
    for i in range(num_ids):
        ident = random_identity(rng)
        folder = root / f"id_{i:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for k in range(per_id):
            p = folder / f"{k:03d}.jpg"
            p.write_bytes(jpeg_bytes(render(ident, rng)))
            paths.append(p)
        out.append(paths)
    return out


def make_pairs(per_identity: list[list[Path]], num_pairs: int, seed: int) -> list[tuple[Path, Path, bool]]:
    """Half matched, half mismatched pairs, interleaved (the .bin convention)."""
    rng = random.Random(seed)
    pairs = []
    for k in range(num_pairs):
        if k % 2 == 0:
            paths = rng.choice([p for p in per_identity if len(p) > 1])
            a, b = rng.sample(paths, 2)
            pairs.append((a, b, True))
        else:
            i, j = rng.sample(range(len(per_identity)), 2)
            pairs.append((rng.choice(per_identity[i]), rng.choice(per_identity[j]), False))
    return pairs
