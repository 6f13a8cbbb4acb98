"""Shared by tests/unit/test_loaders.py and tests/integration/test_loaders.py: fixtures and helpers of both halves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import webdataset as wds

from data_prep.manifest import Manifest, ShardInfo, sha256_file, write_manifest
from data_prep.shards import image_crc
from pipeline.config import AugmentConfig, DataConfig

B = 16


NO_RANDOM = AugmentConfig(flip=0.0)  # every p is 0 by default; flip off too


def make_shards(
    lfw_train: Path,
    out: Path,
    n_images: int,
    per_shard: list[int] | int,
    bad_image_at: int | None = None,
    damaged_body_at: int | None = None,
):
    """WebDataset shards of the first ``n_images`` LFW training faces (label = person index). With
    ``damaged_body_at``, every sample carries its ``.crc`` (as data_prep writes) and that sample's JPEG body has
    bytes flipped *after* the checksum was taken (the header stays valid; libjpeg decodes it without an error)."""
    out.mkdir(parents=True, exist_ok=True)
    people = sorted(p for p in lfw_train.iterdir() if p.is_dir())
    files = [(f, label) for label, p in enumerate(people) for f in sorted(p.glob("*.jpg"))][:n_images]
    sizes = per_shard if isinstance(per_shard, list) else [per_shard] * (len(files) // per_shard)
    assert sum(sizes) == len(files)
    shards, start = [], 0
    for i, n in enumerate(sizes):
        name = f"shard-{i:06d}.tar"
        with wds.TarWriter(str(out / name)) as w:
            for j, (f, label) in enumerate(files[start : start + n]):
                data = f.read_bytes()
                if bad_image_at is not None and start + j == bad_image_at:
                    data = b"this is not an image" * 10
                sample = {
                    "__key__": f"s{start + j:05d}",
                    "jpg": data,
                    "cls": str(label).encode(),
                    "src": f"{f.parent.name}/{f.name}".encode(),
                }
                if damaged_body_at is not None:
                    sample["crc"] = image_crc(data).encode()
                    if start + j == damaged_body_at:
                        body = bytearray(data)
                        sos = data.find(b"\xff\xda")
                        for k in range(sos + 40, sos + 240, 7):
                            body[k] ^= 0x5A
                        sample["jpg"] = bytes(body)
                w.write(sample)
        shards.append(ShardInfo(name, n, sha256_file(out / name)))
        start += n
    write_manifest(out, Manifest(num_classes=files[-1][1] + 1, num_images=len(files), shards=shards))
    return out, [f"{f.parent.name}/{f.name}" for f, _ in files]


@pytest.fixture(autouse=True)
def _scan_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LOWQ_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def shards4(lfw_train, tmp_path_factory):
    return make_shards(lfw_train, tmp_path_factory.mktemp("wds4"), 128, 32)


def _cfg(root, loader, aug=NO_RANDOM, **kw) -> DataConfig:
    kw.setdefault("batch_size", B)
    kw.setdefault("num_workers", 2)
    kw.setdefault("shuffle_buffer", 0)
    return DataConfig(train=str(root), loader=loader, augment=aug, **kw)


def _run(loader, it=None) -> list[dict]:
    """All batches of an epoch (tensors cloned: DALI may reuse its buffers)."""
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in b.items()} for b in (it or loader)]


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]
