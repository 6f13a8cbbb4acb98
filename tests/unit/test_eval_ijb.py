"""IJB-B / IJB-C 1:1 (``pipeline.eval ijb``) and ONNX evaluation (``--onnx`` on every subcommand).

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_eval_ijb.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.eval import ijb, ijb_protocol
from pipeline.eval.checkpoint import OnnxEmbedder, load_model
from pipeline.eval.cli import main as eval_main
from tests.support.eval_ijb import REF, SIZE, decode, loose_crop

# --------------------------------------------------------------------------- fixtures


# --------------------------------------------------------------------------- alignment


def test_similarity_transform_recovers_known_transforms():
    rng = np.random.default_rng(0)
    for scale, angle, shift in ((1.0, 0.0, (0, 0)), (0.37, 1.1, (12.5, -3.25)), (2.6, -2.8, (-40, 70))):
        c, s = np.cos(angle), np.sin(angle)
        m = np.array([[scale * c, -scale * s, shift[0]], [scale * s, scale * c, shift[1]]])
        src = rng.uniform(0, 200, (5, 2))
        dst = src @ m[:, :2].T + m[:, 2]
        np.testing.assert_allclose(ijb_protocol.similarity_transform(src, dst), m, atol=1e-9)
    # noisy points: the least-squares optimum (no other similarity fits better), a proper rotation
    src = rng.uniform(0, 100, (5, 2))
    dst = src @ m[:, :2].T + m[:, 2] + rng.normal(0, 2, (5, 2))
    best = ijb_protocol.similarity_transform(src, dst)

    def err(mm):
        return float(((src @ mm[:, :2].T + mm[:, 2] - dst) ** 2).sum())

    for _ in range(200):
        a, b, tx, ty = rng.normal(0, 0.01, 4)
        nudged = best + np.array([[a, -b, tx], [b, a, ty]])
        assert err(nudged) >= err(best)
    assert np.linalg.det(best[:, :2]) > 0
    # mirrored landmarks: still a rotation (det > 0), never a reflection
    mirrored = ijb_protocol.similarity_transform(REF, REF * [-1, 1])
    assert np.linalg.det(mirrored[:, :2]) > 0
    with pytest.raises(ValueError, match="coincide"):
        ijb_protocol.similarity_transform(np.ones((5, 2)), REF)


def test_alignment_exact_and_against_pillow(devtest):
    """Loose crops made by exact similarities align back to the original bit for bit; a general
    similarity warp equals Pillow's affine transform (an independent bilinear implementation)."""
    face = decode(devtest.paths[0])
    rng = np.random.default_rng(1)
    for kind in range(4):
        crop, marks = loose_crop(face, kind, rng)
        assert crop.shape != face.shape or kind == 0
        np.testing.assert_array_equal(ijb_protocol.align_face(crop, marks), face, err_msg=f"kind {kind}")
    c, s = 1.3 * np.cos(0.3), 1.3 * np.sin(0.3)
    m = np.array([[c, -s, 20.25], [s, c, -31.5]])
    ours = ijb_protocol.warp_affine(face, m).astype(int)
    # Pillow samples output pixel centres (x + ½, y + ½) at data · (x + ½, y + ½, 1) in the same
    # half-pixel coordinates; our pixel centres are integers: data = shift(½) ∘ M⁻¹ ∘ shift(−½)
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    half = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    data = (half @ inv @ np.linalg.inv(half))[:2].ravel()
    pil = np.asarray(Image.fromarray(face).transform((112, 112), Image.AFFINE, tuple(data), Image.BILINEAR)).astype(int)
    ys, xs = np.mgrid[0:112, 0:112]
    sx, sy = (inv[i, 0] * xs + inv[i, 1] * ys + inv[i, 2] for i in (0, 1))
    inside = (sx >= 1) & (sx <= 110) & (sy >= 1) & (sy <= 110)  # Pillow treats the source's edge its own way
    assert inside.mean() > 0.5
    # Pillow truncates the interpolated value where we round (as OpenCV does): ours − Pillow's ∈ {0, 1};
    # half a pixel off in either convention would differ by tens of levels at every edge of the face
    diff = (ours - pil)[inside]
    assert np.abs(diff).max() <= 1 and np.isin(diff, (0, 1)).mean() > 0.999


# --------------------------------------------------------------------------- templates


def test_template_features_match_loops():
    rng = np.random.default_rng(3)
    n_images, rows = 40, 90
    feats = rng.normal(size=(n_images, 8)).astype(np.float32)
    image_of_row = rng.integers(0, n_images, rows)
    templates = rng.choice([3, 17, 40, 41, 1000], rows)
    medias = rng.integers(0, 4, rows)  # media ids repeat across templates: grouped within one template only
    ids, got = ijb.template_features(feats, image_of_row, templates, medias)
    assert list(ids) == [3, 17, 40, 41, 1000]
    for t, row in zip(ids, got):
        media: dict[int, list] = {}
        for r in np.flatnonzero(templates == t):
            media.setdefault(int(medias[r]), []).append(feats[image_of_row[r]].astype(np.float64))
        v = sum(np.mean(fs, axis=0) for fs in media.values())
        np.testing.assert_allclose(row, v / np.linalg.norm(v), atol=1e-12)
    pairs = np.array([[3, 1000], [41, 41], [17, 40]])
    expected = [got[0] @ got[4], 1.0, got[1] @ got[2]]
    np.testing.assert_allclose(ijb.template_pair_scores(ids, got, pairs, batch=2), expected, atol=1e-12)


# --------------------------------------------------------------------------- the command


def one_line_error(capsys, argv: list[str]) -> str:
    assert eval_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_ijb_bad_input_is_one_line_naming_the_file(fixture, checkpoint, tmp_path, capsys):
    root = tmp_path / "IJBC"
    shutil.copytree(fixture.root / "meta", root / "meta")
    meta = root / "meta"
    base = ["ijb", "--checkpoint", str(checkpoint), "--root", str(root), "--out", str(tmp_path / "o")]
    base += ["--images", str(fixture.root / "loose_crop"), "--no-progress"]
    pairs, tid_mid, pts = (meta / f"ijbc_{f}.txt" for f in ("template_pair_label", "face_tid_mid", "name_5pts_score"))
    good_pairs, good_tid, good_pts = pairs.read_text(), tid_mid.read_text(), pts.read_text()

    pairs.unlink()
    assert f"{pairs}: meta file does not exist" in one_line_error(capsys, base)
    pairs.write_text(good_pairs + "1000 424242 0\n")
    n = len(good_pairs.splitlines()) + 1
    err = one_line_error(capsys, base)
    assert f"{pairs}: pair {n} (1000 424242): template 424242 has no images in {tid_mid}" in err
    pairs.write_text(good_pairs + "1000 1007 2\n")
    assert f"{pairs}: pair {n} has label 2" in one_line_error(capsys, base)
    pairs.write_text("".join(ln + "\n" for ln in good_pairs.splitlines() if ln.endswith(" 1")))
    assert f"{pairs}: 50 genuine and 0 impostor pairs; TAR@FAR needs both" in one_line_error(capsys, base)
    pairs.write_text(good_pairs)
    tid_mid.write_text(good_tid + "ghost.png 1000 1\n")
    ghost = fixture.root / "loose_crop" / "ghost.png"
    assert f"{ghost}: image listed in {tid_mid} does not exist" in one_line_error(capsys, base)
    tid_mid.write_text(good_tid + "1.png 1000\n")
    assert f"{tid_mid}:{len(good_tid.splitlines()) + 1}: expected '<image name> <template id> <media id>'" in (
        one_line_error(capsys, base)
    )
    tid_mid.write_text(good_tid)
    pts.write_text("".join(ln + "\n" for ln in good_pts.splitlines() if not ln.startswith("3.png ")))
    assert f"{pts}: no landmarks and score for image 3.png" in one_line_error(capsys, base)
    pts.write_text(good_pts)
    assert f"{tmp_path / 'nowhere'}: image folder does not exist" in one_line_error(
        capsys, [*base, "--images", str(tmp_path / "nowhere")]
    )
    assert f"{tmp_path / 'meta' / 'ijbc_face_tid_mid.txt'}: meta file does not exist" in one_line_error(
        capsys, [*base, "--root", str(tmp_path)]
    )


# --------------------------------------------------------------------------- ONNX


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, as pipeline.export uses
def test_onnx_fixed_batch_and_bad_models(checkpoint, onnx_model, tmp_path, capsys):
    """A model exported with a fixed batch of 4 is fed batches of 4 (the last one padded)."""
    net, _ = load_model(checkpoint)
    fixed = tmp_path / "fixed.onnx"
    torch.onnx.export(
        net, (torch.zeros(4, 3, SIZE, SIZE),), str(fixed), input_names=["x"], output_names=["y"], dynamo=False
    )
    x = torch.rand(10, 3, SIZE, SIZE) * 2 - 1
    model = OnnxEmbedder(fixed)
    assert model.fixed_batch == 4 and model.input_size == SIZE
    np.testing.assert_allclose(model(x).numpy(), OnnxEmbedder(onnx_model)(x).numpy(), atol=1e-5)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model")
    assert f"{garbage}: not a loadable ONNX model" in one_line_error(
        capsys, ["verify", "--onnx", str(garbage), "--bin", "x.bin"]
    )
    missing = tmp_path / "missing.onnx"
    assert f"{missing}: ONNX model does not exist" in one_line_error(
        capsys, ["lowres", "--onnx", str(missing), "--bin", "x.bin"]
    )
    err = one_line_error(capsys, ["verify", "--onnx", str(onnx_model), "--backbone", "iresnet18", "--bin", "x.bin"])
    assert "an --onnx model describes itself" in err
