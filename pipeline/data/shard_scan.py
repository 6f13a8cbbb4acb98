"""The start-up check of WebDataset shards for the DALI reader, and the DALI index files of their good samples.

DALI stops on a truncated tar or an undecodable image, so every shard is scanned at start-up (tar headers; each
sample's image magic bytes and its ``.cls`` label; the result is cached per shard path/size/mtime under
``LOWQ_CACHE`` or ~/.cache/lowq-face) and the DALI index files are written for the good samples only; a truncated
shard keeps its complete samples, a garbage shard is dropped. A sample with a ``.crc`` member (every shard data_prep
writes) has its image bytes checked against it in the same scan, so an image whose body was damaged after sharding
(which libjpeg decodes into a wrong picture, only printing "Corrupt JPEG data") is skipped; the scan then reads the
whole shard once (cached). The loader (:mod:`pipeline.data.dali_loader`) warns about and counts what is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.manifest import READ_EXTENSIONS, DataError, atomic_write_text
from data_prep.shards import check_crc

log = logging.getLogger("pipeline.data")

#: what DALI's image decoder reads of :data:`data_prep.manifest.READ_EXTENSIONS` (not GIF)
DALI_EXTENSIONS = tuple(e for e in READ_EXTENSIONS if e != "gif")
# the formats' magic
_MAGIC = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"BM",
    b"RIFF",
    b"II*\x00",
    b"MM\x00*",
    b"P1",
    b"P2",
    b"P3",
    b"P4",
    b"P5",
    b"P6",
)


@dataclass
class ShardScan:
    path: str
    samples: list = field(default_factory=list)  # per good sample: [(ext, offset, size, name), ...]
    bad_samples: list = field(default_factory=list)  # (key, reason)
    error: str | None = None  # shard-level problem (truncated, not a tar)


def _split_name(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return name, ""
    prefix = name[: len(name) - len(base)]
    stem, ext = base.split(".", 1)
    return prefix + stem, ext.lower()


SCAN_VERSION = 2  # in the scan cache's key: 2 = image bytes checked against their .crc member


def scan_shard(path: str | Path, num_classes: int) -> ShardScan:
    """Check a tar's structure and each sample's image header and label (reads headers only)."""
    scan = ShardScan(str(path))
    size = os.path.getsize(path)
    groups: dict[str, dict] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                if m.offset_data + m.size > size:
                    scan.error = f"truncated: member {m.name} ends at byte {m.offset_data + m.size} > file size {size}"
                    break
                key, ext = _split_name(m.name)
                if key.rsplit("/", 1)[-1].startswith(".") or not ext:
                    continue
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext] = m
    except (tarfile.TarError, OSError, EOFError) as exc:
        scan.error = f"{type(exc).__name__}: {exc}"
    with open(path, "rb") as f:
        for key in order:
            comps = groups[key]
            img = next((comps[e] for e in READ_EXTENSIONS if e in comps), None)
            if img is None or "cls" not in comps:
                scan.bad_samples.append((key, "missing " + ("image" if img is None else ".cls")))
                continue
            f.seek(img.offset_data)
            head = f.read(8)
            if "crc" in comps:
                f.seek(img.offset_data)
                body = f.read(img.size)
                f.seek(comps["crc"].offset_data)
                try:
                    check_crc(body, f.read(comps["crc"].size))
                except DataError as exc:
                    scan.bad_samples.append((key, f"{img.name}: {exc}"))
                    continue
            if not any(head.startswith(mg) for mg in _MAGIC):
                what = "GIF (DALI cannot decode it; use data.loader=torch)" if head.startswith(b"GIF8") else "an image"
                scan.bad_samples.append((key, f"{img.name}: not {what} (starts {head[:4]!r})"))
                continue
            f.seek(comps["cls"].offset_data)
            raw = f.read(comps["cls"].size)
            try:
                label = int(raw.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                scan.bad_samples.append((key, f"unparsable label {raw[:16]!r}"))
                continue
            if not 0 <= label < num_classes:
                scan.bad_samples.append((key, f"label {label} outside [0, {num_classes})"))
                continue
            scan.samples.append([(e, m.offset_data, m.size, m.name) for e, m in comps.items()])
    return scan


def cache_dir() -> Path:
    """Where shard scans are cached (``LOWQ_CACHE`` or ~/.cache/lowq-face)."""
    return Path(os.environ.get("LOWQ_CACHE") or Path.home() / ".cache" / "lowq-face") / "shard-scans"


def scan_shard_cached(path: str | Path, num_classes: int) -> ShardScan:
    """:func:`scan_shard`, remembered per (absolute path, size, mtime, num_classes): reruns and the
    other ranks of a node skip the scan of a multi-million-image dataset."""
    st = os.stat(path)
    what = f"{SCAN_VERSION}|{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{num_classes}"
    key = hashlib.sha1(what.encode()).hexdigest()
    cached = cache_dir() / f"{key}.json"
    try:
        data = json.loads(cached.read_text())
        return ShardScan(
            str(path),
            [[tuple(c) for c in comps] for comps in data["samples"]],
            [tuple(b) for b in data["bad_samples"]],
            data["error"],
        )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    scan = scan_shard(path, num_classes)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            cached, json.dumps({"samples": scan.samples, "bad_samples": scan.bad_samples, "error": scan.error})
        )
    except OSError as exc:  # a read-only home is no reason to stop
        log.info("shard scan cache not written (%s)", exc)
    return scan


def write_index(scan: ShardScan, path: str | Path) -> None:
    """DALI webdataset index (v1.2): one line per sample, ``ext offset size name`` per component."""
    lines = [f"v1.2 {len(scan.samples)}"]
    # the name field is informational (data is located by offset/size); the format is space-separated
    lines += [" ".join(f"{e} {o} {s} {'_'.join(str(n).split())}" for e, o, s, n in comps) for comps in scan.samples]
    Path(path).write_text("\n".join(lines) + "\n")


__all__ = [
    "DALI_EXTENSIONS",
    "SCAN_VERSION",
    "ShardScan",
    "cache_dir",
    "scan_shard",
    "scan_shard_cached",
    "write_index",
]
