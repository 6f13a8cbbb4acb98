"""Shared by tests/unit/test_rec2wds.py and tests/integration/test_rec2wds.py: fixtures and helpers of both halves."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

from data_prep import rec2wds, recordio, shards
from data_prep.manifest import read_manifest
from tests.helpers import REPO

FIX = REPO / "tests" / "fixtures" / "mxnet_rec"


EXPECTED = json.loads((FIX / "expected.json").read_text())


LAYOUTS = {"insightface": 8, "multilabel": 6, "im2rec": 5}  # name → num_classes


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """All samples of a shard directory: key → {ext: bytes}, in tar order (dict order)."""
    m = read_manifest(out)
    samples: dict[str, dict[str, bytes]] = {}
    for s in m.shards:
        with tarfile.open(out / s.name) as tf:
            keys = set()
            for ti in tf:
                key, ext = ti.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(ti).read()
                keys.add(key)
            assert len(keys) == s.count, s.name
    return samples


def run(argv) -> int:
    return shards.main_wrapper(rec2wds.main, [str(a) for a in argv] + ["--no-progress"])


def _lfw_rec(tmp_path: Path, lfw_root: Path, n_ids=20, per_id=8) -> tuple[Path, Path]:
    people = [d for d in sorted(lfw_root.iterdir()) if d.is_dir()][:n_ids]
    classes = [[f.read_bytes() for f in sorted(d.glob("*.jpg"))[:per_id]] for d in people]
    rec, idx = tmp_path / "lfw.rec", tmp_path / "lfw.idx"
    recordio.write_insightface_rec(rec, idx, classes, tmp_path / "property")
    return rec, idx
