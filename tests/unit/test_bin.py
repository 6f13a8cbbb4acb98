"""data_prep.bin: .bin round trip, pairs.txt → .bin, degraded and cross-resolution copies, bad input."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from data_prep import bin as B
from data_prep.manifest import DataError
from pipeline.data.degrade import bicubic_down_up, gaussian_blur
from pipeline.faces import io as FIO


def _decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def test_round_trip(tmp_path):
    bins = [bytes([i]) * (i + 1) for i in range(6)]
    issame = [True, False, True]
    p = tmp_path / "x.bin"
    FIO.write_bin(p, bins, issame)
    assert FIO.read_bin(p) == (bins, issame)
    with open(p, "rb") as f:  # readable the way insightface reads it
        got_bins, got_same = pickle.load(f, encoding="bytes")
    assert list(got_bins) == bins and list(got_same) == issame
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_reads_python2_style_and_numpy_issame(tmp_path):
    p = tmp_path / "py2.bin"
    with open(p, "wb") as f:  # bins as numpy byte arrays, issame as a numpy bool array
        pickle.dump(([np.frombuffer(b"ab", np.uint8), np.frombuffer(b"cd", np.uint8)], np.array([True])), f, protocol=2)
    assert FIO.read_bin(p) == ([b"ab", b"cd"], [True])


def test_from_pairs_reproduces_the_shared_bin(tmp_path, shared_data, lfw_bin, capsys):
    root = shared_data / "lfw_view1_112"
    out = tmp_path / "lfw.bin"
    rc = B.main(
        [
            "from-pairs",
            "--pairs",
            str(root / "pairsDevTest.txt"),
            "--root",
            str(root / "devtest_112"),
            "--out",
            str(out),
        ]
    )
    assert rc == 0 and "1000 pairs" in capsys.readouterr().out
    # same JPEG bytes in the same fold-interleaved order as lfw_devtest_112.bin (see its SOURCE.md)
    assert FIO.read_bin(out) == FIO.read_bin(lfw_bin)


def test_view2_pairs_layout(tmp_path):
    root = tmp_path / "imgs"
    for name in ("A", "B", "C"):
        (root / name).mkdir(parents=True)
        for n in (1, 2):
            Image.new("RGB", (4, 4), (n * 40, 0, 0)).save(root / name / f"{name}_{n:04d}.jpg")
    pairs = tmp_path / "pairs.txt"
    # 2 folds of 1 matched + 1 mismatched: file order is kept
    pairs.write_text("2\t1\nA\t1\t2\nA\t1\tB\t2\nC\t1\t2\nB\t1\tC\t2\n")
    paths, issame = FIO.read_pairs(pairs, root)
    assert issame == [True, False, True, False]
    assert [(a.name, b.name) for a, b in paths] == [
        ("A_0001.jpg", "A_0002.jpg"),
        ("A_0001.jpg", "B_0002.jpg"),
        ("C_0001.jpg", "C_0002.jpg"),
        ("B_0001.jpg", "C_0002.jpg"),
    ]
    # View 1 ("N" header) is re-ordered into 10 folds of matched-then-mismatched
    lines = ["20"] + [f"A\t1\t{2}"] * 20 + ["A\t1\tB\t2"] * 20
    pairs.write_text("\n".join(lines) + "\n")
    _, issame = FIO.read_pairs(pairs, root)
    assert issame == ([True] * 2 + [False] * 2) * 10


def test_pairs_errors(tmp_path):
    root = tmp_path / "imgs"
    (root / "A").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "A" / "A_0001.jpg")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\nA\t1\t2\nA\t1\tB\t1\n")
    with pytest.raises(DataError, match=r"pairs.txt line 2: image .*A_0002.jpg does not exist"):
        FIO.read_pairs(pairs, root)
    pairs.write_text("1\nA\t1\tB\t1\nA\t1\t1\n")
    with pytest.raises(DataError, match=r"pairs.txt line 2: expected 'name n1 n2' \(matched\)"):
        FIO.read_pairs(pairs, root, check_files=False)
    pairs.write_text("2\nA\t1\t2\n")
    with pytest.raises(DataError, match="header promises 4 pairs, file has 1"):
        FIO.read_pairs(pairs, root, check_files=False)
    pairs.write_text("x y z\n")
    with pytest.raises(DataError, match="line 1: header must be"):
        FIO.read_pairs(pairs, root, check_files=False)


def test_degraded_copies_equal_the_degradation(small_bin, tmp_path, capsys):
    rc = B.main(
        ["degrade", "--bin", str(small_bin), "--out-dir", str(tmp_path), "--blur", "2", "--lowres", "14", "--cross"]
    )
    assert rc == 0
    names = sorted(p.name for p in tmp_path.glob("*.bin"))
    assert names == [
        "lfw_small_blur2.bin",
        "lfw_small_blur2_cross.bin",
        "lfw_small_lr14.bin",
        "lfw_small_lr14_cross.bin",
    ]
    orig, issame = FIO.read_bin(small_bin)
    for name, fn in (("blur2", lambda x: gaussian_blur(x, 2.0)), ("lr14", lambda x: bicubic_down_up(x, 14))):
        full, same_full = FIO.read_bin(tmp_path / f"lfw_small_{name}.bin")
        cross, same_cross = FIO.read_bin(tmp_path / f"lfw_small_{name}_cross.bin")
        assert same_full == same_cross == issame
        for i in range(len(orig)):
            assert full[i][:8] == b"\x89PNG\r\n\x1a\n"  # lossless re-encode
            src = torch.from_numpy(_decode(orig[i]).copy()).permute(2, 0, 1).float()
            expect = fn(src).permute(1, 2, 0).numpy()
            got = _decode(full[i]).astype(np.float64)
            assert np.abs(got - expect).max() <= 0.5 + 1e-3  # only uint8 rounding
            if i % 2 == 0:
                assert cross[i] == orig[i]  # first image of each pair: byte-identical
            else:
                assert cross[i] == full[i]
    # the blur itself against an independent implementation (scipy, mirror padding, radius 3σ)
    img = _decode(orig[0]).astype(np.float64)
    ref = np.stack([ndimage.gaussian_filter(img[..., c], 2.0, mode="mirror", truncate=3.0) for c in range(3)], -1)
    got = _decode(FIO.read_bin(tmp_path / "lfw_small_blur2.bin")[0][0]).astype(np.float64)
    assert np.abs(got - ref).max() <= 0.5 + 1e-3
    # low resolution really removed detail: 14 px copy is smoother than the original
    lr = _decode(FIO.read_bin(tmp_path / "lfw_small_lr14.bin")[0][0]).astype(np.float64)
    assert np.abs(np.diff(lr, axis=1)).mean() < 0.6 * np.abs(np.diff(img, axis=1)).mean()


def test_cross_only_and_info(small_bin, tmp_path, capsys):
    rc = B.main(["degrade", "--bin", str(small_bin), "--out-dir", str(tmp_path), "--lowres", "7", "--cross-only"])
    assert rc == 0
    assert [p.name for p in tmp_path.glob("*.bin")] == ["lfw_small_lr7_cross.bin"]
    capsys.readouterr()
    assert B.main(["info", str(tmp_path / "lfw_small_lr7_cross.bin")]) == 0
    out = capsys.readouterr().out
    assert "pairs: 20" in out and "'jpeg': 20" in out and "'png': 20" in out and "112x112" in out


def test_bad_input(tmp_path, small_bin, capsys):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01 not a pickle")
    with pytest.raises(DataError, match="junk.bin: not a pickle of \\(bins, issame\\)"):
        FIO.read_bin(junk)
    three = tmp_path / "three.bin"
    three.write_bytes(pickle.dumps(([b"a"], [True], 3)))
    with pytest.raises(DataError, match="three.bin: not a pickle of \\(bins, issame\\)"):
        FIO.read_bin(three)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True])))
    with pytest.raises(DataError, match="odd.bin: 3 images for 1 pairs"):
        FIO.read_bin(odd)
    ints = tmp_path / "ints.bin"
    ints.write_bytes(pickle.dumps(([1, 2], [True])))
    with pytest.raises(DataError, match="ints.bin: image 0 is a int"):
        FIO.read_bin(ints)
    undecodable = tmp_path / "undecodable.bin"
    FIO.write_bin(undecodable, [b"\xff\xd8junk", b"junk"], [True])
    rc = B.main(["degrade", "--bin", str(undecodable), "--out-dir", str(tmp_path / "o"), "--blur", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "undecodable.bin image 0: cannot decode" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    rc = B.main(["degrade", "--bin", str(small_bin), "--out-dir", str(tmp_path / "o"), "--lowres", "0"])
    assert rc == 2 and "bad degradation level" in capsys.readouterr().err
    assert B.main(["info", str(tmp_path / "nope.bin")]) == 2
    assert "nope.bin: .bin file does not exist" in capsys.readouterr().err
    with pytest.raises(DataError, match="4 images for 1 pairs"):
        FIO.write_bin(tmp_path / "w.bin", [b"a"] * 4, [True])
