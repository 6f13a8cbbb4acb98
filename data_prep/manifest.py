"""The shard-directory manifest: what every producer writes and every loader reads.

Layout of a shard directory::

    OUT/manifest.json
    OUT/shard-000000.tar ...   # WebDataset tars; per sample: <key>.<ext> (original image bytes,
                               # ext in IMAGE_EXTENSIONS after the bytes' real format: jpg|png in
                               # practice), <key>.cls (ASCII integer label), <key>.src (source
                               # path, or "<file>.rec:<key>"), <key>.crc (CRC-32 of the image
                               # bytes, hex; loaders skip a sample that fails it), and only for RecordIO records with
                               # several float labels <key>.labels (JSON list, the first = class)
    OUT/.journal.jsonl         # the writers' resume journal (not for loaders)
    OUT/corrupt.json           # only when a run failed its --max-bad-fraction gate (no manifest then)

``manifest.json`` holds ``format``, ``num_classes``, ``num_images``, ``shards`` (list of
``{"name", "count", "sha256"}``), ``corrupt`` (``count``, ``by_reason``, first 1000 ``records``
each with ``index``, byte ``offset`` (RecordIO) or null, ``source``, ``reason``, ``message``),
``sources`` (input files with sizes) and ``tool`` (name and version), plus ``extra``: ``plan``
(hash of input listing + seed + shard size), ``seed``, ``shard_size``/``shard_bytes``,
``verify``, ``formats`` (count per extension), ``identities_per_shard`` (min/max), and per tool
``layout``/``property``/``identity_records`` (rec2wds) or ``class_names`` (folder2wds --root).
No timestamps: a rerun writes the same bytes. It is written to a temporary name and renamed,
so it is never seen half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "lowq-face-wds/1"
#: Image member extensions a shard may hold (loaders: DALI ext "jpg;png;...", webdataset decoders).
IMAGE_EXTENSIONS = ("jpg", "png", "bmp", "webp", "tif", "gif", "pgm", "ppm", "pbm")
#: The one list of image extensions read: a shard's image member (the torch loader, the start-up scan) and an image
#: file in a folder (folder2wds, identity folders): the above and the long spellings other writers use.
READ_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "gif", "pgm", "pbm", "ppm")
MANIFEST = "manifest.json"


class DataError(ValueError):
    """Bad input data, with a one-line message naming the file or record."""


@dataclass
class ShardInfo:
    name: str
    count: int
    sha256: str = ""


@dataclass
class Manifest:
    num_classes: int
    num_images: int
    shards: list[ShardInfo]
    format: str = FORMAT
    corrupt: dict = field(default_factory=lambda: {"count": 0, "records": []})
    sources: list = field(default_factory=list)
    tool: str = ""
    extra: dict = field(default_factory=dict)

    def shard_paths(self, root: str | Path) -> list[str]:
        return [str(Path(root) / s.name) for s in self.shards]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_manifest(root: str | Path, manifest: Manifest) -> Path:
    path = Path(root) / MANIFEST
    data = asdict(manifest)
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def read_manifest(root: str | Path) -> Manifest:
    """Read ``root/manifest.json``; every problem is a one-line :class:`DataError`."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: shard directory does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected a WebDataset shard directory)")
    path = root / MANIFEST
    if not path.is_file():
        tars = sorted(root.glob("*.tar"))
        hint = f"; it holds {len(tars)} .tar files but no manifest" if tars else "; the directory holds no shards"
        raise DataError(f"{path}: missing manifest{hint} (make one with python -m data_prep.folder2wds)")
    try:
        data = json.loads(path.read_text())
        shards = [ShardInfo(**s) for s in data.pop("shards")]
        known = {f for f in Manifest.__dataclass_fields__} - {"shards"}
        extra = {k: data.pop(k) for k in list(data) if k not in known}
        m = Manifest(shards=shards, **data)
        m.extra.update(extra)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a valid manifest ({exc})") from None
    if not m.shards or m.num_images <= 0:
        raise DataError(f"{path}: manifest lists no images (empty shard directory)")
    for s in m.shards:
        if not (root / s.name).is_file():
            raise DataError(f"{root / s.name}: shard listed in the manifest is missing")
    return m
