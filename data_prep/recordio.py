"""Pure-Python reader and writer of MXNet RecordIO (``.rec`` + ``.idx``), no mxnet needed.

Format (dmlc-core ``recordio.h``; checked byte-identical against MXNet 1.9.1's own writer by
``tests/fixtures/make_mxnet_rec.py`` and ``tests/{unit,integration}/test_rec2wds.py``):

* A record is ``uint32 magic 0xced7230a``, ``uint32 lrecord``, payload, zero padding to a multiple
  of 4 bytes. ``lrecord``: low 29 bits = payload length, high 3 bits = continuation flag
  ``cflag``: 0 = whole record; 1 = first part, 2 = middle part, 3 = last part. The writer splits a
  record wherever the magic word occurs in the payload at a 4-byte aligned position and drops that
  word; the reader glues the parts back together with the magic word in between.
* The payload (``mx.recordio.pack``) starts with the image-record header ``IRHeader`` =
  ``struct '<IfQQ'`` (flag, label, id, id2). ``flag > 0``: ``flag`` float32 labels follow (and
  ``label`` is 0). The rest is the encoded image, stored untouched.
* ``.idx``: text lines ``key<TAB>offset`` giving each record's first byte.
* insightface layout: record 0 is a header with labels ``(id_idx, widx)`` and no image; images
  are keys ``1 .. id_idx-1``; identity records ``id_idx .. widx-1`` carry ``[start, end)`` image
  key ranges. im2rec layout: no header, every key is an image. The ``property`` file next to the
  rec holds ``num_classes,height,width``.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.manifest import DataError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24


class RecordError(DataError):
    """A record that cannot be read; ``reason`` is a short machine-readable tag."""

    def __init__(self, msg: str, reason: str):
        super().__init__(msg)
        self.reason = reason


@dataclass(frozen=True)
class IRHeader:
    flag: int
    label: float
    id: int
    id2: int


@dataclass(frozen=True)
class ImageRecord:
    """One unpacked record: ``labels`` is the tuple of float labels (1 value when flag == 0)."""

    header: IRHeader
    labels: tuple
    image: bytes


# --------------------------------------------------------------------------- payload


def pack(labels, image: bytes, id: int = 0, id2: int = 0) -> bytes:
    """Same bytes as ``mx.recordio.pack(IRHeader(0, labels, id, id2), image)``.

    ``labels`` a number → flag 0, label in the header; a sequence → flag = len, float32 array
    before the image (mxnet's rule, including for a 1-element sequence).
    """
    if isinstance(labels, (int, float, np.integer, np.floating)):
        head = struct.pack(IR_FORMAT, 0, float(labels), id, id2)
        return head + image
    arr = np.asarray(labels, dtype="<f4").ravel()
    return struct.pack(IR_FORMAT, arr.size, 0.0, id, id2) + arr.tobytes() + image


def unpack(payload: bytes) -> ImageRecord:
    """Inverse of :func:`pack`; raises :class:`RecordError` ('short_header'/'short_labels')."""
    if len(payload) < IR_SIZE:
        raise RecordError(f"payload of {len(payload)} bytes is shorter than the 24-byte IRHeader", "short_header")
    h = IRHeader(*struct.unpack_from(IR_FORMAT, payload, 0))
    if h.flag > 0:
        end = IR_SIZE + 4 * h.flag
        if len(payload) < end:
            raise RecordError(f"header announces {h.flag} float labels but the payload is too short", "short_labels")
        labels = tuple(float(x) for x in np.frombuffer(payload, dtype="<f4", count=h.flag, offset=IR_SIZE))
        return ImageRecord(h, labels, payload[end:])
    return ImageRecord(h, (float(h.label),), payload[IR_SIZE:])


# --------------------------------------------------------------------------- framing


def frame(payload: bytes) -> bytes:
    """Frame one payload exactly as dmlc ``RecordIOWriter::WriteRecord`` does (multi-part split)."""
    n = len(payload)
    if n >= 1 << 29:
        raise DataError(f"record of {n} bytes exceeds RecordIO's 2^29-byte limit")
    out = bytearray()
    lower = n & ~3
    dptr = 0
    i = payload.find(_MAGIC_BYTES)
    while 0 <= i < lower:
        if i % 4 == 0:
            cflag = 1 if dptr == 0 else 2
            out += _MAGIC_BYTES + struct.pack("<I", (cflag << 29) | (i - dptr)) + payload[dptr:i]
            dptr = i + 4
            i = payload.find(_MAGIC_BYTES, dptr)
        else:
            i = payload.find(_MAGIC_BYTES, i + 1)
    cflag = 3 if dptr else 0
    out += _MAGIC_BYTES + struct.pack("<I", (cflag << 29) | (n - dptr)) + payload[dptr:]
    out += b"\0" * (-n % 4)
    return bytes(out)


def read_record(fd: int, offset: int, file_size: int) -> tuple[bytes, int]:
    """Read the (possibly multi-part) record starting at ``offset`` of an open file descriptor.

    Returns (payload, offset of the next record). Raises :class:`RecordError` with reason
    'bad_magic', 'truncated', 'bad_cflag' naming the byte offset.
    """
    parts = []
    pos = offset
    first = True
    while True:
        head = os.pread(fd, 8, pos)
        if len(head) < 8:
            raise RecordError(f"offset {pos}: record header cut off at end of file", "truncated")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordError(f"offset {pos}: bad magic 0x{magic:08x} (expected 0xced7230a)", "bad_magic")
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        if (first and cflag not in (0, 1)) or (not first and cflag not in (2, 3)):
            raise RecordError(f"offset {pos}: unexpected continuation flag {cflag}", "bad_cflag")
        padded = (length + 3) & ~3
        if pos + 8 + padded > file_size:
            raise RecordError(
                f"offset {pos}: record of {length} bytes runs past the end of the file ({file_size} bytes)", "truncated"
            )
        parts.append(os.pread(fd, length, pos + 8))
        pos += 8 + padded
        if cflag in (0, 3):
            break
        first = False
    return _MAGIC_BYTES.join(parts), pos


def iter_file(path: str | Path):
    """Sequentially scan a ``.rec`` without an index: yields (offset, payload)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            payload, nxt = read_record(fd, pos, size)
            yield pos, payload
            pos = nxt
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- index / property


def read_index_arrays(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a ``.idx`` file into (keys, offsets) int64 arrays in file order.

    Fast path: numpy's C text parser (millions of lines in seconds, 16 bytes per record). On any
    problem the slow line-by-line parser finds the bad line and raises a :class:`DataError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: index file does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: index file is empty")
    try:
        arr = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
        if arr.shape[1] != 2 or (arr < 0).any():
            raise ValueError
    except ValueError:
        pairs = read_index(path)  # raises the precise, line-numbered error
        arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    keys, offs = arr[:, 0].copy(), arr[:, 1].copy()
    uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = int(uniq[counts > 1][0])
        line = int(np.flatnonzero(keys == dup)[1]) + 1
        raise DataError(f"{path}:{line}: duplicate key {dup}")
    return keys, offs


def read_index(path: str | Path) -> list[tuple[int, int]]:
    """Read a ``.idx`` file into [(key, offset)] in file order; bad lines → :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: index file does not exist")
    out = []
    seen = set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            fields = line.split()
            try:
                if len(fields) != 2:
                    raise ValueError
                key, off = int(fields[0]), int(fields[1])
                if key < 0 or off < 0:
                    raise ValueError
            except ValueError:
                raise DataError(f"{path}:{lineno}: expected 'key<TAB>offset', got {raw[:60]!r}") from None
            if key in seen:
                raise DataError(f"{path}:{lineno}: duplicate key {key}")
            seen.add(key)
            out.append((key, off))
    if not out:
        raise DataError(f"{path}: index file is empty")
    return out


def read_property(path: str | Path) -> tuple[int, int, int]:
    """``property`` file → (num_classes, height, width)."""
    path = Path(path)
    text = path.read_text().strip()
    try:
        vals = [int(v) for v in text.split(",")]
        if len(vals) != 3 or min(vals) <= 0:
            raise ValueError
    except ValueError:
        raise DataError(f"{path}: expected 'num_classes,height,width', got {text[:60]!r}") from None
    return vals[0], vals[1], vals[2]


def label_to_class(value: float) -> int | None:
    """A float label → integer class, or None when it is not a finite non-negative integer."""
    if not math.isfinite(value) or value < 0 or value != int(value) or value >= 2**31:
        return None
    return int(value)


# --------------------------------------------------------------------------- writer


class RecordWriter:
    """Write ``.rec`` + ``.idx`` byte-identical to ``mx.recordio.MXIndexedRecordIO(..., 'w')``.

    Used for benchmarks and corrupt-input tests; the real-mxnet fixture checks the equivalence.
    """

    def __init__(self, rec: str | Path, idx: str | Path):
        self._rec = open(rec, "wb")
        self._idx = open(idx, "w")
        self._pos = 0

    def write(self, key: int, payload: bytes) -> int:
        offset = self._pos
        data = frame(payload)
        self._rec.write(data)
        self._pos += len(data)
        self._idx.write(f"{key}\t{offset}\n")
        return offset

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_insightface_rec(
    rec: str | Path,
    idx: str | Path,
    images_by_class: list[list[bytes]],
    property_path: str | Path | None = None,
    size: tuple[int, int] = (112, 112),
) -> int:
    """Write an insightface-layout rec (header record 0, images, identity records); returns #images."""
    n_img = sum(len(c) for c in images_by_class)
    id_idx = n_img + 1
    widx = id_idx + len(images_by_class)
    with RecordWriter(rec, idx) as w:
        w.write(0, pack([float(id_idx), float(widx)], b""))
        key = 1
        ranges = []
        for label, imgs in enumerate(images_by_class):
            start = key
            for img in imgs:
                w.write(key, pack(float(label), img, id=key))
                key += 1
            ranges.append((start, key))
        for c, (a, b) in enumerate(ranges):
            w.write(id_idx + c, pack([float(a), float(b)], b"", id=id_idx + c))
    if property_path is not None:
        Path(property_path).write_text(f"{len(images_by_class)},{size[0]},{size[1]}")
    return n_img
