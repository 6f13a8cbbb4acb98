"""Shared by tests/unit/test_eval_ijb.py and tests/integration/test_eval_ijb.py: fixtures and helpers of both halves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import registry
from pipeline.config import dump_config, load_config
from pipeline.eval import ijb_protocol
from pipeline.eval import sets as ES
from pipeline.export import main as export_main

SIZE = 56  # network input (px): small keeps the 2-core CPU time down


REF = ijb_protocol.ARCFACE_REFERENCE


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint directory (config.yaml + model.pt) of a tiny iresnet18 at 56 px, with random
    BatchNorm statistics (a 'trained' state: the ONNX graph folds them into the convolutions)."""
    overrides = ["model.backbone=iresnet18", "model.width=0.0625", "model.head.embedding_size=32"]
    cfg = load_config([], overrides + [f"model.input_size={SIZE}"])
    ck = tmp_path_factory.mktemp("ijb_ckpt") / "step_0000010"
    ck.mkdir()
    dump_config(cfg, ck / "config.yaml")
    torch.manual_seed(1)
    net = registry.build_recipe(cfg).net
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    torch.save(net.state_dict(), ck / "model.pt")
    return ck


@pytest.fixture(scope="module")
def onnx_model(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


def decode(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def loose_crop(face: np.ndarray, kind: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(loose crop, its 5 landmarks): ``face`` (an aligned 112×112 crop, landmarks = REF) moved by
    an exact similarity into a canvas of noise. kind 0: as it is; 1: shifted by whole pixels;
    2: every pixel repeated 2×2, then shifted; 3: a quarter turn (np.rot90), then shifted."""
    if kind == 0:
        return face, REF.copy()
    size = 112
    if kind == 2:
        face, marks = face.repeat(2, 0).repeat(2, 1), 2 * REF  # output pixel x samples source 2x
    elif kind == 3:
        # np.rot90 (counter-clockwise): source (x, y) lands at (y, size - 1 - x)
        face, marks = np.rot90(face).copy(), np.stack([REF[:, 1], size - 1 - REF[:, 0]], 1)
    else:
        marks = REF.copy()
    dx, dy = (int(v) for v in rng.integers(3, 40, 2))
    h, w = face.shape[:2]
    canvas = rng.integers(0, 256, (h + dy + 17, w + dx + 9, 3), dtype=np.uint8)
    canvas[dy : dy + h, dx : dx + w] = face
    return canvas, marks + [dx, dy]


@dataclass
class IJBFixture:
    root: Path
    originals: dict[str, Path]  # image name → the LFW file it was made from
    scores: dict[str, float]  # image name → detector score
    rows: list[tuple[str, int, int]]  # (image name, template, media) in file order
    pairs: list[tuple[int, int, int]]  # (template 1, template 2, label)


def build_ijb(root: Path, devtest: ES.ImageSet, people: int = 30, seed: int = 0) -> IJBFixture:
    """IJB-C's layout (meta/ijbc_*.txt, loose_crop/) from LFW dev-test faces."""
    rng = np.random.default_rng(seed)
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    names = [lab for lab in dict.fromkeys(devtest.labels) if devtest.labels.count(lab) >= 2][:people]
    originals, scores, marks, rows = {}, {}, {}, []
    media = iter(range(500, 10_000, 3))

    def add(path: Path) -> str:
        name = f"{len(originals) + 1}.png"  # lossless: the loose crop holds the face's exact pixels
        crop, lmk = loose_crop(decode(path), len(originals) % 4, rng)
        Image.fromarray(crop).save(root / "loose_crop" / name)
        originals[name], marks[name], scores[name] = path, lmk, round(float(rng.uniform(0.3, 1.0)), 4)
        return name

    a_of, b_of, c_of = {}, {}, {}
    for k, person in enumerate(names):
        files = [p for p, lab in zip(devtest.paths, devtest.labels) if lab == person]
        images = [add(p) for p in files[:6]]  # every image is in a template
        n_a = 2 if len(images) >= 3 else 1
        a, b = images[:n_a], images[n_a : n_a + 4]
        a_of[k], b_of[k] = 1000 + 7 * k, 5000 + 11 * k  # template ids: sparse, in no particular order
        m_a, m_b = next(media), next(media)
        rows += [(name, a_of[k], m_a) for name in a]  # A: one media (a video's frames are averaged)
        rows += [(name, b_of[k], m_b + i % 2) for i, name in enumerate(b)]  # B: two media when ≥ 2 images
        if k % 3 == 0:  # C: A's first image again (same media id as in A) and B's last, two media
            c_of[k] = 9000 + k
            rows += [(a[0], c_of[k], m_a), (b[-1], c_of[k], next(media))]
    pairs = [(a_of[k], b_of[k], 1) for k in a_of]
    pairs += [(a_of[k], c_of[k], 1) for k in c_of] + [(c_of[k], b_of[k], 1) for k in c_of]
    pairs += [(a_of[i], b_of[j], 0) for i in a_of for j in b_of if i != j]
    pairs += [(a_of[i], a_of[j], 0) for i in a_of for j in a_of if i < j]
    pairs += [(c_of[i], a_of[j], 0) for i in c_of for j in list(a_of)[:5] if i != j]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    meta = root / "meta"
    (meta / "ijbc_face_tid_mid.txt").write_text("".join(f"{n} {t} {m}\n" for n, t, m in rows))
    (meta / "ijbc_template_pair_label.txt").write_text("".join(f"{a} {b} {y}\n" for a, b, y in pairs))
    pts = [f"{n} {' '.join(f'{v:.6f}' for v in marks[n].ravel())} {scores[n]}\n" for n in reversed(list(originals))]
    pts.append(f"unused.png {' '.join(['50.0'] * 10)} 0.9\n")  # listed but in no template: ignored
    (meta / "ijbc_name_5pts_score.txt").write_text("".join(pts))  # another order than tid_mid: matched by name
    return IJBFixture(root, originals, scores, rows, pairs)


@pytest.fixture(scope="module")
def fixture(devtest, tmp_path_factory) -> IJBFixture:
    return build_ijb(tmp_path_factory.mktemp("ijb") / "IJBC", devtest)
