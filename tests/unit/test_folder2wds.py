"""folder2wds on the real LFW faces (folder tree and train_list.txt), read back with tarfile,
webdataset and DALI; determinism; corrupt and bad input.

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_folder2wds.py.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

from data_prep import folder2wds
from data_prep.manifest import read_manifest
from tests.support.folder2wds import run, samples


def _small_tree(tmp_path: Path, lfw_train: Path, n_ids=4, per_id=5) -> Path:
    root = tmp_path / "tree"
    for d in sorted(p for p in lfw_train.iterdir() if p.is_dir())[:n_ids]:
        (root / d.name).mkdir(parents=True)
        for f in sorted(d.glob("*.jpg"))[:per_id]:
            shutil.copy(f, root / d.name / f.name)
    return root


def test_corrupt_images_and_real_format(tmp_path, lfw_train):
    root = _small_tree(tmp_path, lfw_train)  # 20 images
    first = sorted(root.iterdir())[0]
    good = sorted(first.glob("*.jpg"))[0].read_bytes()
    (first / "garbage.jpg").write_bytes(b"this is not an image" * 20)
    (first / "cut.jpg").write_bytes(good[: len(good) // 2])
    buf = io.BytesIO()
    Image.open(io.BytesIO(good)).save(buf, format="PNG")
    (first / "really_png.jpg").write_bytes(buf.getvalue())
    (first / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "wds"
    # 2 bad of 23 = 8.7% > 1%: exit 1, no manifest
    assert run(["--root", root, "--out", out, "--shard-size", "6"]) == 1
    assert not (out / "manifest.json").exists()
    assert run(["--root", root, "--out", out, "--shard-size", "6", "--max-bad-fraction", "0.1"]) == 0
    m = read_manifest(out)
    assert m.num_images == 21 and m.corrupt["count"] == 2
    bad = {c["source"]: c["reason"] for c in m.corrupt["records"]}
    assert bad == {f"{first.name}/garbage.jpg": "undecodable", f"{first.name}/cut.jpg": "undecodable"}
    got = {v["src"].decode(): v for v in samples(out).values()}
    png = got[f"{first.name}/really_png.jpg"]
    assert "png" in png and "jpg" not in png and png["png"] == buf.getvalue()
    assert m.extra["formats"] == {"jpg": 20, "png": 1}


def test_bad_input_one_line_errors(tmp_path, capsys, lfw_train):
    assert run(["--root", tmp_path / "missing", "--out", tmp_path / "o"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing: --root does not exist" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert run(["--root", tmp_path / "empty", "--out", tmp_path / "o"]) == 2
    assert "holds no class sub-folders with images" in capsys.readouterr().err
    lst = tmp_path / "list.txt"
    first = sorted(lfw_train.glob("*/*.jpg"))[0]
    lst.write_text(f"{first} 0\n{first} zero\n")
    assert run(["--list", lst, "--out", tmp_path / "o"]) == 2
    err = capsys.readouterr().err
    assert "list.txt:2:" in err and err.count("\n") == 1
    assert run(["--list", tmp_path / "nolist.txt", "--out", tmp_path / "o"]) == 2
    assert "nolist.txt: --list file does not exist" in capsys.readouterr().err
    # a listed file that is missing is a bad record (counted), not a crash
    lst.write_text(f"{first} 0\n{tmp_path / 'gone.jpg'} 1\n")
    assert run(["--list", lst, "--out", tmp_path / "o2", "--max-bad-fraction", "0.5"]) == 0
    m = read_manifest(tmp_path / "o2")
    assert m.num_images == 1 and m.corrupt["by_reason"] == {"missing_file": 1} and m.num_classes == 2
    with pytest.raises(SystemExit):
        folder2wds.build_parser().parse_args(["--out", "x"])  # neither --root nor --list
