"""rec2wds against RecordIO files written by real MXNet 1.9.1 (tests/fixtures/mxnet_rec, made by
tests/fixtures/make_mxnet_rec.py), cross-checked with DALI's fn.readers.mxnet; corrupt input,
resumability, idempotence, identity mixing; the dataset-count check.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_rec2wds.py.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import recordio, shards
from data_prep.manifest import IMAGE_EXTENSIONS, read_manifest
from tests.helpers import REPO
from tests.support.rec2wds import EXPECTED, FIX, LAYOUTS, _lfw_rec, read_shards, run, sha


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != shards.JOURNAL}


def image_records(layout: str) -> dict[int, dict]:
    exp = EXPECTED[layout]
    if layout == "insightface":
        h = EXPECTED["insightface_header"]
        return {int(k): v for k, v in exp.items() if 1 <= int(k) < h["id_idx"]}
    return {int(k): v for k, v in exp.items()}


# --------------------------------------------------------------------------- exactness vs mxnet


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_reproduces_mxnet_images_and_labels(tmp_path, layout):
    out = tmp_path / "wds"
    assert (
        run(
            [
                "--rec",
                FIX / layout / "train.rec",
                "--idx",
                FIX / layout / "train.idx",
                "--out",
                out,
                "--shard-size",
                "7",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    m = read_manifest(out)
    want = image_records(layout)
    assert m.num_images == len(want) and m.num_classes == LAYOUTS[layout]
    assert m.corrupt["count"] == 0
    assert m.extra["layout"] == ("insightface" if layout == "insightface" else "im2rec")
    got = read_shards(out)
    assert len(got) == len(want)
    seen = set()
    for members in got.values():
        rkey = int(members["src"].decode().split(":")[1])
        assert members["src"].decode() == f"train.rec:{rkey}"
        e = want[rkey]
        img_ext = [x for x in members if x in IMAGE_EXTENSIONS]
        assert len(img_ext) == 1
        assert sha(members[img_ext[0]]) == e["image_sha256"], f"image bytes differ for key {rkey}"
        assert int(members["cls"]) == int(e["labels"][0])
        if e["flag"] > 1:
            assert json.loads(members["labels"]) == e["labels"]
        else:
            assert "labels" not in members
        seen.add(rkey)
    assert seen == set(want)
    if layout == "insightface":
        # the pack_img(.png) record is stored as png; the 3-part record (magic in a JPEG comment) is intact
        src = {k.split(":")[1]: v for k, v in EXPECTED["sources"].items() if k.startswith("insightface:")}
        png_key = next(int(k) for k, v in src.items() if ".png" in v)
        split_key = next(int(k) for k, v in src.items() if "multi-part" in v)
        by_rkey = {int(v["src"].decode().split(":")[1]): v for v in got.values()}
        assert "png" in by_rkey[png_key] and "jpg" not in by_rkey[png_key]
        assert struct.pack("<I", recordio.MAGIC) in by_rkey[split_key]["jpg"]
        assert m.extra["identity_records"] == {"count": 8, "bad_keys": [], "bad": 0}


def test_resume_after_kill_and_idempotence(tmp_path, lfw_train):
    rec, idx = _lfw_rec(tmp_path, lfw_train)
    ref = tmp_path / "ref"
    assert run(["--rec", rec, "--idx", idx, "--out", ref, "--shard-size", "16", "--workers", "1"]) == 0
    ref_files = dir_bytes(ref)
    assert len(read_manifest(ref).shards) == 10
    # idempotent: a rerun in place and a run with 2 workers elsewhere give byte-identical files
    assert run(["--rec", rec, "--idx", idx, "--out", ref, "--shard-size", "16"]) == 0
    assert dir_bytes(ref) == ref_files
    par = tmp_path / "par"
    assert run(["--rec", rec, "--idx", idx, "--out", par, "--shard-size", "16", "--workers", "2"]) == 0
    assert dir_bytes(par) == ref_files
    # a run killed after 3 shards (separate process, 2 workers), then started again
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "data_prep.rec2wds",
        "--rec",
        str(rec),
        "--idx",
        str(idx),
        "--out",
        str(out),
        "--shard-size",
        "16",
        "--workers",
        "2",
        "--no-progress",
    ]
    env = {**os.environ, shards.STOP_ENV: "3"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 75, r.stderr
    assert not (out / "manifest.json").exists()
    # the journal holds exactly the 3 shards the killed process committed; its 2 workers may have
    # finished (some of) the other files meanwhile — uncommitted files the rerun must verify or rewrite
    committed = [json.loads(x) for x in (out / shards.JOURNAL).read_text().splitlines()[1:]]
    assert len(committed) == 3, committed
    (out / ".shard-000009.tar.tmp999").write_bytes(b"half a tar")  # what a kill mid-write leaves
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr
    assert "resuming: 3 of 10 shards already complete" in r.stderr
    assert dir_bytes(out) == ref_files
    assert not list(out.glob(".shard-*.tmp*"))
    # a deleted shard and a damaged shard are rewritten, the others kept
    (out / "shard-000002.tar").unlink()
    blob = bytearray((out / "shard-000005.tar").read_bytes())
    blob[1000] ^= 0xFF
    (out / "shard-000005.tar").write_bytes(bytes(blob))
    mtime_kept = (out / "shard-000000.tar").stat().st_mtime_ns
    assert run(["--rec", rec, "--idx", idx, "--out", out, "--shard-size", "16"]) == 0
    assert dir_bytes(out) == ref_files
    assert (out / "shard-000000.tar").stat().st_mtime_ns == mtime_kept
    # another plan (other seed) in the same directory is refused unless --overwrite
    assert run(["--rec", rec, "--idx", idx, "--out", out, "--shard-size", "16", "--seed", "1"]) == 2
    assert run(["--rec", rec, "--idx", idx, "--out", out, "--shard-size", "16", "--seed", "1", "--overwrite"]) == 0
    assert dir_bytes(out) != ref_files


def test_dataset_check_cli(tmp_path):
    out = tmp_path / "wds"
    assert run(["--rec", FIX / "im2rec" / "train.rec", "--idx", FIX / "im2rec" / "train.idx", "--out", out]) == 0
    r = subprocess.run(
        [sys.executable, "-m", "data_prep.datasets", "check", "--manifest", str(out), "--dataset", "ms1mv2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and r.stdout.startswith("mismatch: ms1mv2") and r.stdout.count("\n") == 1
    # --dataset on the converter runs the same check at the end
    assert (
        run(
            [
                "--rec",
                FIX / "im2rec" / "train.rec",
                "--idx",
                FIX / "im2rec" / "train.idx",
                "--out",
                out,
                "--dataset",
                "casia_webface",
            ]
        )
        == 1
    )
