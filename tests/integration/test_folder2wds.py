"""folder2wds on the real LFW faces (folder tree and train_list.txt), read back with tarfile,
webdataset and DALI; determinism; corrupt and bad input.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_folder2wds.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from data_prep import shards
from data_prep.manifest import read_manifest
from tests.support.folder2wds import run, samples


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != shards.JOURNAL}


def test_root_tree_exact(tmp_path, lfw_train):
    out = tmp_path / "wds"
    assert run(["--root", lfw_train, "--out", out, "--shard-size", "250", "--workers", "2"]) == 0
    m = read_manifest(out)
    names = sorted(d.name for d in lfw_train.iterdir() if d.is_dir())
    files = sorted(lfw_train.glob("*/*.jpg"))
    assert m.num_classes == len(names) == 111 and m.num_images == len(files) == 1814
    assert m.extra["class_names"] == names
    assert len(m.shards) == 8 and [s.count for s in m.shards] == [250] * 7 + [64]
    got = samples(out)
    assert len(got) == len(files)
    by_src = {v["src"].decode(): v for v in got.values()}
    assert set(by_src) == {str(f.relative_to(lfw_train)) for f in files}
    for rel, v in by_src.items():
        assert v["jpg"] == (lfw_train / rel).read_bytes()
        assert int(v["cls"]) == names.index(rel.split("/")[0])
    # the loaders' libraries read the shards: webdataset and DALI's webdataset reader
    import webdataset as wds

    n = sum(1 for _ in wds.WebDataset([str(p) for p in m.shard_paths(out)], shardshuffle=False))
    assert n == 1814
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=64, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=m.shard_paths(out), ext=["jpg", "cls"], name="r")
        return jpg, cls

    p = pipe()
    p.build()
    assert p.epoch_size("r") == 1814


def test_list_file_and_determinism(tmp_path, shared_data):
    lst = shared_data / "lfw_view1_112" / "train_list.txt"
    want = {}
    for line in lst.read_text().splitlines():
        path, label = line.rsplit(None, 1)
        want[path] = int(label)
    out1, out2 = tmp_path / "a", tmp_path / "b"
    assert run(["--list", lst, "--out", out1, "--shard-size", "500"]) == 0
    got = samples(out1)
    assert {v["src"].decode(): int(v["cls"]) for v in got.values()} == want
    for v in got.values():
        assert (
            hashlib.sha256(v["jpg"]).digest() == hashlib.sha256((lst.parent / v["src"].decode()).read_bytes()).digest()
        )
    m = read_manifest(out1)
    assert m.num_classes == max(want.values()) + 1 and m.num_images == len(want)
    assert m.extra["identities_per_shard"]["min"] > 50  # seeded shuffle mixes the 111 identities
    # rerun in place, and with 2 workers elsewhere: byte-identical shards and manifest
    before = dir_bytes(out1)
    assert run(["--list", lst, "--out", out1, "--shard-size", "500"]) == 0
    assert dir_bytes(out1) == before
    assert run(["--list", lst, "--out", out2, "--shard-size", "500", "--workers", "2"]) == 0
    assert {k: v for k, v in dir_bytes(out2).items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"
    }
    assert (out1 / "manifest.json").read_text() == (out2 / "manifest.json").read_text()
    # a different seed gives a different assignment
    out3 = tmp_path / "c"
    assert run(["--list", lst, "--out", out3, "--shard-size", "500", "--seed", "7"]) == 0
    assert read_manifest(out3).shards[0].sha256 != m.shards[0].sha256
