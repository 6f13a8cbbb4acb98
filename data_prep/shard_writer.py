"""Writing one shard as a whole (in a worker process of the run, or in the run's own process).

The tar is written to ``.shard-NNNNNN.tar.tmp<pid>``, fsynced and renamed, so no half-written tar ever carries a final
name. Tars are deterministic (fixed mtime/uid/gid/uname, USTAR, members in plan order, each sample's members sorted by
extension: :class:`TarStream`), so a rerun gives byte-identical shards. A record the source cannot read, whose label is
out of range or whose image does not decode is left out and described in the shard's record (``corrupt``).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections import Counter
from pathlib import Path

from data_prep.shard_images import image_crc, image_ext
from data_prep.shard_source import BadRecord, Sample, Source

SHARD_PATTERN = "shard-{:06d}.tar"


class TarStream:
    """Deterministic USTAR writer: every member ``mode 0644, uid/gid 0, empty uname/gname, mtime 0``.

    Its bytes equal what :mod:`tarfile` writes (``USTAR_FORMAT``) for the same members — checked
    by ``tests/unit/test_rec2wds.py::test_tar_stream_matches_tarfile`` — at a fraction of the cost
    (tarfile builds each 512-byte header through ~40 Python calls, which dominated the run time).
    Everything written goes through sha256, so a shard's digest costs no second read.
    """

    _BLOCK = tarfile.BLOCKSIZE
    _RECORD = tarfile.RECORDSIZE
    # fixed fields after name (100 bytes): mode, uid, gid | size | mtime, chksum placeholder, type,
    # linkname | magic+version, uname, gname, devmajor, devminor, prefix
    _MID = b"0000644\0" + b"0000000\0" + b"0000000\0"
    _TAIL = (
        b"00000000000\0" + b" " * 8 + b"0" + b"\0" * 100 + tarfile.POSIX_MAGIC + b"\0" * 64 + b"\0" * 16 + b"\0" * 155
    )  # devmajor/devminor empty for regular files, as tarfile

    def __init__(self, f):
        self.f = f
        self.h = hashlib.sha256()
        self.n = 0

    def _write(self, b: bytes) -> None:
        self.h.update(b)
        self.f.write(b)
        self.n += len(b)

    def add(self, name: str, data: bytes) -> None:
        raw = name.encode("utf-8")
        if len(raw) > 100:
            raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
        size = len(data)
        if size >= 8**11:
            raise ValueError(f"tar member {name!r} too large for USTAR ({size} bytes)")
        head = raw.ljust(100, b"\0") + self._MID + b"%011o\0" % size + self._TAIL
        head = head.ljust(self._BLOCK, b"\0")
        chk = sum(head)  # checksum field counted as 8 spaces, as POSIX specifies
        head = head[:148] + b"%06o\0" % chk + head[155:]
        self._write(head)
        self._write(data)
        if size % self._BLOCK:
            self._write(b"\0" * (self._BLOCK - size % self._BLOCK))

    def close(self) -> None:
        self._write(b"\0" * (2 * self._BLOCK))
        if self.n % self._RECORD:
            self._write(b"\0" * (self._RECORD - self.n % self._RECORD))

    def hexdigest(self) -> str:
        return self.h.hexdigest()


_WORKER: dict = {}


def init_worker(source, out_dir, verify, num_classes):
    """Set what :func:`write_shard` reads in this process (the pool's initializer, or called once in-process)."""
    _WORKER.update(source=source, out=Path(out_dir), verify=verify, num_classes=num_classes)


def write_shard(task) -> dict:
    """Write shard ``task = (shard index, [(index, ref), ...])``; return its journal record."""
    shard_idx, entries = task
    source: Source = _WORKER["source"]
    out: Path = _WORKER["out"]
    verify, num_classes = _WORKER["verify"], _WORKER["num_classes"]
    name = SHARD_PATTERN.format(shard_idx)
    tmp = out / f".{name}.tmp{os.getpid()}"
    corrupt, formats, labels = [], Counter(), Counter()
    count = 0
    with open(tmp, "wb", buffering=1 << 20) as raw:
        tw = TarStream(raw)
        for index, ref in entries:
            try:
                s, ext = _checked_sample(source, ref, verify, num_classes)
            except BadRecord as exc:
                corrupt.append(_corrupt_record(source, index, ref, exc))
                continue
            _add_sample(tw, f"{index:09d}", s, ext)
            formats[ext] += 1
            labels[s.label] += 1
            count += 1
        tw.close()
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, out / name)
    return {
        "shard": shard_idx,
        "name": name,
        "count": count,
        "sha256": tw.hexdigest(),
        "bytes": tw.n,
        "corrupt": corrupt,
        "formats": dict(formats),
        "max_label": max(labels) if labels else -1,
        "labels": len(labels),
    }


def _checked_sample(source: Source, ref, verify: str, num_classes: int | None) -> tuple[Sample, str]:
    """The sample of ``ref`` and its image extension; BadRecord if it is unreadable, mislabelled or undecodable."""
    s = source.read(ref)
    if s.label < 0 or (num_classes is not None and s.label >= num_classes):
        raise BadRecord("label_out_of_range", f"label {s.label} outside [0, {num_classes})", None)
    return s, image_ext(s.image, verify)


def _corrupt_record(source: Source, index: int, ref, exc: BadRecord) -> dict:
    """The report entry of a skipped record (the ``corrupt`` lists of the journal, manifest and corrupt.json)."""
    off = exc.offset if exc.offset is not None else source.offset_of(ref)
    return {
        "index": index,
        "offset": off,
        "source": _ref_src(source, ref),
        "reason": exc.reason,
        "message": exc.message,
    }


def _add_sample(tw: TarStream, key: str, s: Sample, ext: str) -> None:
    """The tar members of one sample, sorted by extension: image, ``cls``, ``src``, ``crc`` and the source's extras."""
    members = {
        "cls": str(s.label).encode(),
        ext: s.image,
        "src": s.src.encode(),
        "crc": image_crc(s.image).encode(),
        **s.extra,
    }
    for e in sorted(members):
        tw.add(f"{key}.{e}", members[e])


def _ref_src(source, ref):
    fn = getattr(source, "describe", None)
    return fn(ref) if fn else str(ref)
