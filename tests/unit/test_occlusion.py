"""Occluded evaluation copies (data_prep.bin ``degrade --occlude`` / ``degrade-images``; issue 14 item 6).

Expected regions are computed here by hand from the ArcFace 112-px template (eyes y 51.6963 /
51.5014, nose tip y 71.7366) and the documented defaults, or recovered from the pixels that changed;
the faces are real LFW View-1 dev-test images, with every value raised to ≥ 1 where a black fill
must be told apart from black pixels of the photo.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from scipy import stats

from data_prep import bin as B
from data_prep.manifest import DataError
from pipeline.config import ConfigError
from pipeline.eval import degradations as DG
from pipeline.eval import run as ER
from pipeline.eval.cli import main as eval_main
from pipeline.eval.sets import EvalSet
from pipeline.eval.tarfar import count_pairs
from pipeline.faces import degrade as D
from pipeline.faces import io as FIO

DEFAULTS = D.OcclusionParams()
EYE_Y = (51.6963 + 51.5014) / 2  # the template's two eye centres


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small_images(small_bin) -> list[np.ndarray]:
    return [FIO.decode_image(b) for b in FIO.read_bin(small_bin)[0]]


@pytest.fixture(scope="module")
def face(small_images) -> np.ndarray:
    """A real face with no black pixel, so a black fill changes every pixel it covers."""
    return np.maximum(small_images[0], 1)


def box_mask(shape, top, bottom, left, right) -> np.ndarray:
    m = np.zeros(shape[:2], dtype=bool)
    m[top:bottom, left:right] = True
    return m


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).any(axis=2)


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def one_line_error(capsys, argv) -> str:
    assert B.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# --------------------------------------------------------------------------- where each kind occludes


def test_eye_band_and_mask_band_follow_the_template(face):
    # defaults at 112 px: eye rows round(51.6 ∓ 11) = 41..63, columns 24..88; mask rows 76..112, full width
    for kind, box, fill in (
        ("eyes", (41, 63, 24, 88), (0, 0, 0)),
        ("mask", (76, 112, 0, 112), (173, 216, 230)),
    ):
        out = D.occlude_image(face, kind, DEFAULTS)
        inside = box_mask(face.shape, *box)
        assert (out[inside] == fill).all(), kind
        assert np.array_equal(out[~inside], face[~inside]), kind  # bit for bit
    # every option moves the band, scaled to a 224-px image: eye rows 2·(51.6 ∓ 5) → 93..113, columns 60..160
    big = np.repeat(np.repeat(face, 2, axis=0), 2, axis=1)
    params = D.OcclusionParams(eye_half_height=5, eye_x=(30, 80), mask_top=90, mask_color=(10, 20, 30))
    assert (round(2 * (EYE_Y - 5)), round(2 * (EYE_Y + 5))) == (93, 113)
    for kind, box, fill in (("eyes", (93, 113, 60, 160), (0, 0, 0)), ("mask", (180, 224, 0, 224), (10, 20, 30))):
        out = D.occlude_image(big, kind, params)
        inside = box_mask(big.shape, *box)
        assert (out[inside] == fill).all() and np.array_equal(out[~inside], big[~inside]), kind


def test_random_rectangles_honour_area_aspect_and_uniform_position(face):
    h, w = face.shape[:2]
    areas, aspects, u_top, u_left = [], [], [], []
    for i in range(300):
        out = D.occlude_image(face, "black", DEFAULTS, index=i)
        diff = changed(out, face)
        top, bottom, left, right = bounding_box(diff)
        assert diff.sum() == (bottom - top) * (right - left), i  # exactly one filled rectangle
        assert (out[diff] == 0).all() and np.array_equal(out[~diff], face[~diff])
        assert D.occlusion_box(face.shape, "black", DEFAULTS, i) == (top, bottom, left, right)
        bh, bw = bottom - top, right - left
        areas.append(bh * bw / (h * w))
        aspects.append(bw / bh)
        u_top.append((top + 0.5) / (h - bh + 1))
        u_left.append((left + 0.5) / (w - bw + 1))
    # rounding each side to whole px moves the area and the ratio by at most ~2 %
    assert 0.1 * 0.98 <= min(areas) < 0.12 and 0.28 < max(areas) <= 0.3 * 1.02
    assert 0.5 * 0.97 <= min(aspects) < 0.6 and 1.7 < max(aspects) <= 2 * 1.03
    assert stats.kstest(u_top, "uniform").pvalue > 1e-3 and stats.kstest(u_left, "uniform").pvalue > 1e-3
    # a fixed area and ratio give a fixed size: √(0.25 · 112²) = 56 px square; area 1 covers everything
    square = D.OcclusionParams(area=(0.25, 0.25), aspect=(1, 1))
    for i in range(20):
        top, bottom, left, right = bounding_box(changed(D.occlude_image(face, "black", square, index=i), face))
        assert (bottom - top, right - left) == (56, 56)
    whole = D.occlude_image(face, "black", D.OcclusionParams(area=(1, 1), aspect=(1, 1)), index=3)
    assert not whole.any()


def test_noise_fills_the_same_rectangle_with_uniform_pixels(face):
    for i in range(5):
        out = D.occlude_image(face, "noise", DEFAULTS, index=i)
        inside = box_mask(face.shape, *bounding_box(changed(D.occlude_image(face, "black", DEFAULTS, index=i), face)))
        assert np.array_equal(out[~inside], face[~inside])
        noise = out[inside].astype(float)
        assert abs(noise.mean() - 127.5) < 6 and abs(noise.std() - 73.9) < 4  # U{0..255}: sd 73.9
        assert len(np.unique(noise)) > 200 and not np.array_equal(out[inside], face[inside])


def test_face_patch_comes_from_another_image_of_the_set(small_bin, small_images):
    bins = FIO.read_bin(small_bin)[0]
    assert len(set(bins)) < len(bins)  # LFW reuses images across pairs: "another image" means other bytes
    pool = D.DonorPool([hashlib.sha1(b).hexdigest() for b in bins])
    donors = set()
    for i in range(len(small_images)):
        out = D.degrade_in_set(small_images, pool, i, "occ-face", None, DEFAULTS)
        inside = box_mask(out.shape, *D.occlusion_box(out.shape, "face", DEFAULTS, i))
        assert np.array_equal(out[~inside], small_images[i][~inside])
        # search the whole set for images whose same region is the patch
        sources = [j for j, im in enumerate(small_images) if np.array_equal(im[inside], out[inside])]
        assert sources and all(bins[j] != bins[i] for j in sources), i
        donors.update(sources)
    assert len(donors) >= 10  # drawn, not always the same neighbour


def test_donor_is_never_a_copy_of_the_image():
    # "a" at indices 0-4 and 6-8, "b" at 5, "c" at 9: an "a" image may only borrow from 5 or 9
    keys = ["a"] * 5 + ["b"] + ["a"] * 3 + ["c"]
    pool = D.DonorPool(keys)
    picks = {(i, seed): pool.pick(i, seed) for i in range(len(keys)) for seed in range(60)}
    for (i, _), j in picks.items():
        assert keys[j] != keys[i], (i, j)
    assert {j for (i, _), j in picks.items() if keys[i] == "a"} == {5, 9}
    assert {j for (i, _), j in picks.items() if keys[i] == "b"} == set(range(len(keys))) - {5}
    with pytest.raises(DataError, match="at least two different images"):
        D.DonorPool(["x", "x"]).pick(0, 0)


# --------------------------------------------------------------------------- determinism


def test_seeded_and_independent_of_order_and_chunking(small_bin, small_images, tmp_path, capsys):
    bins = FIO.read_bin(small_bin)[0]
    keys = [hashlib.sha1(b).hexdigest() for b in bins]
    n = len(small_images)
    for kind in ("occ-black", "occ-noise", "occ-face"):
        forward = [D.degrade_in_set(small_images, D.DonorPool(keys), i, kind, None, DEFAULTS) for i in range(n)]
        backward = {
            i: D.degrade_in_set(small_images, D.DonorPool(keys), i, kind, None, DEFAULTS) for i in reversed(range(n))
        }
        halves = {}  # two "workers", each with its own pool and half of the indices
        for part in (range(0, n, 2), range(1, n, 2)):
            pool = D.DonorPool(keys)
            halves.update({i: D.degrade_in_set(small_images, pool, i, kind, None, DEFAULTS) for i in part})
        for i in range(n):
            assert np.array_equal(forward[i], backward[i]) and np.array_equal(forward[i], halves[i]), (kind, i)
        other_seed = D.OcclusionParams(seed=1)
        assert any(
            not np.array_equal(forward[i], D.degrade_in_set(small_images, D.DonorPool(keys), i, kind, None, other_seed))
            for i in range(n)
        ), kind
    # the CLI: the same seed writes the same bytes; another seed moves the rectangles, not the bands
    for seed, out in (("3", "a"), ("3", "b"), ("4", "c")):
        argv = ["degrade", "--bin", str(small_bin), "--out-dir", str(tmp_path / out), "--occlude", "black", "eyes"]
        assert B.main([*argv, "--seed", seed]) == 0
    capsys.readouterr()

    def data(out, kind):
        return (tmp_path / out / f"lfw_small_occ-{kind}.bin").read_bytes()

    assert data("a", "black") == data("b", "black") != data("c", "black")
    assert data("a", "eyes") == data("c", "eyes")
    record = json.loads((tmp_path / "c" / "lfw_small_occ-black.json").read_text())
    assert (record["kind"], record["seed"], record["area"]) == ("occ-black", 4, [0.1, 0.3])


# --------------------------------------------------------------------------- .bin copies and --cross


def test_bin_copies_and_cross_keep_the_first_images(small_bin, small_images, tmp_path, capsys):
    argv = ["degrade", "--bin", str(small_bin), "--out-dir", str(tmp_path), "--occlude", "face", "mask", "--cross"]
    assert B.main([*argv, "--mask-color", "white"]) == 0
    names = sorted(p.name for p in tmp_path.glob("*.bin"))
    assert names == [f"lfw_small_occ-{k}{c}.bin" for k in ("face", "mask") for c in ("", "_cross")]
    assert capsys.readouterr().out.count("wrote ") == 4
    bins, issame = FIO.read_bin(small_bin)
    for kind in ("face", "mask"):
        full, full_same = FIO.read_bin(tmp_path / f"lfw_small_occ-{kind}.bin")
        cross, cross_same = FIO.read_bin(tmp_path / f"lfw_small_occ-{kind}_cross.bin")
        assert full_same == cross_same == issame
        assert cross[0::2] == bins[0::2]  # first image of every pair: the original bytes
        assert cross[1::2] == full[1::2] and all(b[:8] == b"\x89PNG\r\n\x1a\n" for b in full)
        assert all(c != o for c, o in zip(cross[1::2], bins[1::2]))
    # the mask copy is exactly the band (PNG is lossless): white (240, 240, 240) from row 76 down
    mask = box_mask((112, 112), 76, 112, 0, 112)
    for i, b in enumerate(FIO.read_bin(tmp_path / "lfw_small_occ-mask.bin")[0]):
        img = FIO.decode_image(b)
        assert (img[mask] == 240).all() and np.array_equal(img[~mask], small_images[i][~mask])


def test_bad_options_are_one_line_naming_the_option(small_bin, tmp_path, capsys):
    base = ["degrade", "--bin", str(small_bin), "--out-dir", str(tmp_path / "o"), "--occlude", "black"]
    for extra, needle in (
        (["--occ-area", "0", "0.3"], "error: --occ-area 0 0.3: must satisfy 0 < MIN ≤ MAX ≤ 1"),
        (["--occ-area", "0.2", "1.5"], "error: --occ-area 0.2 1.5:"),
        (["--occ-area", "0.3", "0.1"], "error: --occ-area 0.3 0.1:"),
        (["--occ-aspect", "-1", "2"], "error: --occ-aspect -1 2:"),
        (["--eye-x", "90", "20"], "error: --eye-x 90 20:"),
        (["--mask-top", "120"], "error: --mask-top 120:"),
        (["--mask-color", "purple"], "error: --mask-color purple:"),
        (["--seed", "-1"], "error: --seed -1:"),
        (["--occlude", "sunglasses"], "error: --occlude 'sunglasses': unknown occlusion kind"),
    ):
        assert one_line_error(capsys, base + extra).startswith(needle), extra
    tiny = ["degrade-images", "--images", str(tmp_path), "--out-dir", str(tmp_path / "o")]
    assert one_line_error(capsys, [*tiny, "--occlude", "scarf"]).startswith("error: --occlude 'scarf'")
    assert one_line_error(capsys, [*tiny, "--occlude", "eyes", "--occ-area", "0", "1"]).startswith(
        "error: --occ-area 0 1"
    )
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- verify --degrade


def test_verify_degrade_applies_the_bands_as_the_copies_hold_them(small_bin, small_images, tmp_path, capsys):
    assert DG.parse_degradation("occ-eyes") == DG.Degradation("occ-eyes", None, False)
    assert DG.parse_degradation("OCC-MASK-cross") == DG.Degradation("occ-mask", None, True)
    assert [d.label for d in DG.parse_degradations(["occ-eyes", "occ-mask-cross"])] == ["occ-eyes", "occ-mask-cross"]
    with pytest.raises(ConfigError, match="data_prep.bin degrade --occlude face"):
        DG.parse_degradation("occ-face")
    with pytest.raises(ConfigError, match="--degrade 'occ-eyes:2'"):
        DG.parse_degradation("occ-eyes:2")
    assert B.main(["degrade", "--bin", str(small_bin), "--out-dir", str(tmp_path), "--occlude", "eyes", "mask"]) == 0
    capsys.readouterr()
    for kind in ("eyes", "mask"):
        copy = FIO.read_bin(tmp_path / f"lfw_small_occ-{kind}.bin")[0]
        for i in (0, 7, 33):
            assert np.array_equal(D.degrade_image(small_images[i], f"occ-{kind}", None), FIO.decode_image(copy[i]))

    # a cheap embedder (8×8 average pool): verify --degrade's row equals verify on the written copy
    def embed(x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)

    out = ER.evaluate(embed, [EvalSet.from_bin(small_bin)], DG.parse_degradations(["occ-eyes"]), 112)
    ref = ER.evaluate_bin(embed, tmp_path / "lfw_small_occ-eyes.bin")
    row = out["results"][0]
    assert row["degradation"] == "occ-eyes" and row["level"] is None
    assert (row["accuracy"], row["threshold"]) == (ref["accuracy"], ref["threshold"])


# --------------------------------------------------------------------------- image folders for tarfar


def test_folder_copies_keep_the_layout_and_tarfar_reads_them(tiny_folder, random_checkpoint, tmp_path, capsys):
    out = tmp_path / "occ"
    argv = ["degrade-images", "--images", str(tiny_folder), "--out-dir", str(out), "--occlude", "eyes", "black", "face"]
    assert B.main(argv) == 0
    wrote = [f"wrote {out / ('occ-' + k)}" for k in ("eyes", "black", "face")]
    assert capsys.readouterr().out.splitlines() == wrote
    sources = sorted(p.relative_to(tiny_folder) for p in tiny_folder.rglob("*.jpg"))
    for kind in ("eyes", "black", "face"):
        folder = out / f"occ-{kind}"
        assert sorted(p.relative_to(folder) for p in folder.rglob("*.png")) == [s.with_suffix(".png") for s in sources]
        assert json.loads((folder / "occlusion.json").read_text())["kind"] == f"occ-{kind}"
    eyes = box_mask((112, 112), 41, 63, 24, 88)
    originals = [FIO.decode_image((tiny_folder / s).read_bytes()) for s in sources]
    for i, s in enumerate(sources):  # index i: the sorted <identity>/<file> order tarfar reads
        img = FIO.decode_image((out / "occ-eyes" / s.with_suffix(".png")).read_bytes())
        assert (img[eyes] == 0).all() and np.array_equal(img[~eyes], originals[i][~eyes])
        black = FIO.decode_image((out / "occ-black" / s.with_suffix(".png")).read_bytes())
        assert np.array_equal(black, D.occlude_image(originals[i], "black", DEFAULTS, index=i))
        patched = FIO.decode_image((out / "occ-face" / s.with_suffix(".png")).read_bytes())
        inside = box_mask(patched.shape, *D.occlusion_box(patched.shape, "face", DEFAULTS, i))
        donors = [j for j, o in enumerate(originals) if np.array_equal(o[inside], patched[inside])]
        assert donors and i not in donors
    err = one_line_error(capsys, argv)
    assert f"{out / 'occ-eyes'}: already exists" in err

    labels = np.array([s.parts[0] for s in sources])
    genuine, impostor = count_pairs(labels)
    assert (len(sources), genuine, impostor) == (12, 4, 62)
    rc = eval_main(
        ["tarfar", "--checkpoint", str(random_checkpoint), "--images", str(out / "occ-eyes"), "--no-progress"]
        + ["--device", "cpu", "--json", str(tmp_path / "t.json")]
    )
    assert rc == 0
    text = capsys.readouterr().out
    people = len(set(labels))
    assert f"12 images, {people} identities: {genuine} genuine, {impostor} impostor pairs" in text
    assert json.loads((tmp_path / "t.json").read_text())["images"] == str(out / "occ-eyes")


def test_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="--images folder does not exist"):
        B.degrade_folder(tmp_path / "nope", tmp_path / "o", occlude=["eyes"])
