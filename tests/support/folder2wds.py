"""Shared by tests/unit/test_folder2wds.py and tests/integration/test_folder2wds.py: fixtures and helpers of both halves."""

from __future__ import annotations

import tarfile
from pathlib import Path

from data_prep import folder2wds, shards
from data_prep.manifest import read_manifest


def run(argv) -> int:
    return shards.main_wrapper(folder2wds.main, [str(a) for a in argv] + ["--no-progress"])


def samples(out: Path) -> dict[str, dict[str, bytes]]:
    got: dict[str, dict[str, bytes]] = {}
    for s in read_manifest(out).shards:
        with tarfile.open(out / s.name) as tf:
            for ti in tf:
                key, ext = ti.name.split(".", 1)
                got.setdefault(key, {})[ext] = tf.extractfile(ti).read()
    return got
