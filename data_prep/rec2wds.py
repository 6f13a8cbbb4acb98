"""MXNet RecordIO (insightface ``train.rec``/``train.idx``/``property``) → WebDataset shards.

Usage::

    python -m data_prep.rec2wds --rec faces_emore/train.rec --idx faces_emore/train.idx \\
        --out shards/ms1mv2 --workers 8 --shard-size 10000 --dataset ms1mv2

Both layouts are read: insightface (record 0 is a header with labels (id_idx, widx); images are
keys 1 .. id_idx-1; identity records id_idx .. widx-1 hold [start, end) ranges) and im2rec (no
header; every indexed key is an image). A record with several float labels (IRHeader flag > 1)
gets the first one as its class and all of them in a ``<key>.labels`` JSON member. Image bytes
are copied untouched (no re-encode). ``num_classes`` comes from the ``property`` file (next to the
rec, or ``--property``), else the header's identity range, else the largest label + 1.

The run is parallel (``--workers``), resumable (a killed run started again keeps every finished
shard and ends with identical files), idempotent (a rerun is byte-identical, manifest included)
and atomic; bad records (bad magic, truncated, undecodable image, label out of range) are skipped,
reported with record index and byte offset and counted in ``manifest.json``; more than
``--max-bad-fraction`` bad → exit 1. Bad arguments or unreadable index/property → exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from data_prep import recordio, shard_cli
from data_prep.manifest import DataError, sha256_file
from data_prep.shard_source import BadRecord, Sample, Source
from data_prep.shard_summary import MAX_LISTED_CORRUPT


def index_lookup(keys: np.ndarray, offs: np.ndarray):
    """A function mapping an array of record keys to their offsets in the index (-1 where a key is not in it)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]

    def lookup(wanted: np.ndarray) -> np.ndarray:
        """Offsets of ``wanted`` keys (-1 where a key is not in the index)."""
        pos = np.clip(np.searchsorted(sorted_keys, wanted), 0, len(sorted_keys) - 1)
        found = sorted_keys[pos] == wanted
        return np.where(found, offs[order[pos]], -1)

    return lookup


class RecSource(Source):
    tool = "data_prep.rec2wds"

    def __init__(self, rec: str | Path, idx: str | Path, property_path: str | Path | None = None):
        self.rec = Path(rec)
        self.idx = Path(idx)
        self._check_rec()
        keys, offs = recordio.read_index_arrays(self.idx)
        prop = self._read_property(property_path)
        self._fd = None
        self._fd_pid = None
        self.pre_corrupt = []
        self.extra = {}
        lookup = index_lookup(keys, offs)
        image_keys, header_classes = self._find_layout(keys, lookup)
        if prop and header_classes is not None and prop[0] != header_classes:
            raise DataError(
                f"{self.property_path}: says {prop[0]} classes but the header record of {self.rec} "
                f"has {header_classes} identity records"
            )
        self.num_classes = prop[0] if prop else header_classes
        self._list_images(image_keys, lookup(image_keys), offs)
        self.extra["layout"] = self.layout
        self.extra["property"] = list(prop) if prop else None

    # ---- listing
    def _check_rec(self) -> None:
        """The record file must exist and not be empty; sets ``rec_size``."""
        if not self.rec.is_file():
            raise DataError(f"{self.rec}: record file does not exist")
        self.rec_size = self.rec.stat().st_size
        if self.rec_size == 0:
            raise DataError(f"{self.rec}: record file is empty")

    def _read_property(self, property_path: str | Path | None) -> tuple | None:
        """The property file's values (the given one, which must exist, else ``property`` next to the rec if there
        is one); sets ``property_path`` (None when there is no property file)."""
        self.property_path = Path(property_path) if property_path else self.rec.parent / "property"
        prop = None
        if property_path and not self.property_path.is_file():
            raise DataError(f"{self.property_path}: property file does not exist")
        if self.property_path.is_file():
            prop = recordio.read_property(self.property_path)
        else:
            self.property_path = None
        return prop

    def _find_layout(self, keys: np.ndarray, lookup) -> tuple[np.ndarray, int | None]:
        """(image keys, number of classes the header names or None) of the insightface layout (record 0 is a header)
        or of im2rec (every indexed key is an image); sets ``layout`` and checks insightface's identity records."""
        header = self._read_header(int(lookup(np.array([0]))[0]))
        if header is None:
            self.layout = "im2rec"
            return keys, None
        id_idx, widx = header
        self.layout = "insightface"
        self.extra["identity_records"] = self._check_identity_records(
            np.arange(id_idx, widx, dtype=np.int64), lookup(np.arange(id_idx, widx, dtype=np.int64))
        )
        return np.arange(1, id_idx, dtype=np.int64), widx - id_idx

    def _list_images(self, image_keys: np.ndarray, image_offs: np.ndarray, offs: np.ndarray) -> None:
        """The listing (keys, offsets, size estimates) of the image keys found in the index, and a
        ``missing_from_index`` record for each of the others (too many of them is a DataError)."""
        missing = image_keys[image_offs < 0]
        for k in missing[:MAX_LISTED_CORRUPT].tolist():
            self.pre_corrupt.append(
                {
                    "index": k,
                    "offset": None,
                    "source": f"{self.rec.name}:{k}",
                    "reason": "missing_from_index",
                    "message": f"key {k} (an image key of the header) is not in {self.idx.name}",
                }
            )
        if len(missing) > MAX_LISTED_CORRUPT:
            raise DataError(f"{self.idx}: {len(missing)} image keys of the header record are missing from the index")
        self._keys = image_keys[image_offs >= 0]
        self._offs = image_offs[image_offs >= 0]
        # size estimate of each record = distance to the next record start in the file
        starts = np.unique(np.append(offs, self.rec_size))
        nxt = starts[np.minimum(np.searchsorted(starts, self._offs, side="right"), len(starts) - 1)]
        self._sizes = np.maximum(nxt - self._offs, 0)

    # ---- reading
    def _fdesc(self) -> int:
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd = os.open(self.rec, os.O_RDONLY)
            self._fd_pid = os.getpid()
        return self._fd

    def __getstate__(self):  # what a spawned worker receives: no open fd, no listing arrays
        d = dict(self.__dict__)
        d["_fd"] = None
        d["_keys"] = d["_offs"] = d["_sizes"] = None
        return d

    def _read_header(self, off0: int):
        """(id_idx, widx) when record 0 is an insightface header (flag 2, no image bytes), else None."""
        if off0 < 0:
            return None
        try:
            payload, _ = recordio.read_record(self._fdesc(), off0, self.rec_size)
            r = recordio.unpack(payload)
        except recordio.RecordError as exc:
            raise DataError(f"{self.rec}: record 0 (offset {off0}) is unreadable: {exc}") from None
        if r.header.flag == 2 and not r.image:
            a, b = (recordio.label_to_class(v) for v in r.labels)
            if a is None or b is None or not (1 <= a <= b):
                raise DataError(f"{self.rec}: header record 0 has invalid (id_idx, widx) = {r.labels}")
            return a, b
        return None

    def _check_identity_records(self, keys: np.ndarray, offs: np.ndarray) -> dict:
        """Read the identity records (flag 2, [start, end), no image); count the unreadable ones."""
        bad = []
        for k, off in zip(keys.tolist(), offs.tolist()):
            try:
                if off < 0:
                    raise recordio.RecordError("not in the index", "missing")
                r = recordio.unpack(recordio.read_record(self._fdesc(), off, self.rec_size)[0])
                if r.header.flag != 2 or r.image:
                    raise recordio.RecordError("not an identity record", "bad")
            except recordio.RecordError:
                bad.append(k)
        return {"count": len(keys), "bad_keys": bad[:100], "bad": len(bad)}

    def sizes(self) -> np.ndarray:
        return self._sizes

    def entry(self, pos: int):
        k = int(self._keys[pos])
        return k, (k, int(self._offs[pos]))

    def offset_of(self, ref) -> int:
        return ref[1]

    def describe(self, ref) -> str:
        return f"{self.rec.name}:{ref[0]}"

    def read(self, ref) -> Sample:
        key, off = ref
        try:
            payload, _ = recordio.read_record(self._fdesc(), off, self.rec_size)
            r = recordio.unpack(payload)
        except recordio.RecordError as exc:
            raise BadRecord(exc.reason, str(exc), off) from None
        label = recordio.label_to_class(r.labels[0])
        if label is None:
            raise BadRecord("label_out_of_range", f"label {r.labels[0]!r} is not a non-negative integer", off)
        extra = {}
        if len(r.labels) > 1:
            extra["labels"] = json.dumps(list(r.labels)).encode()
        return Sample(label, r.image, f"{self.rec.name}:{key}", extra)

    def _idx_sha(self) -> str:
        if getattr(self, "_idx_sha256", None) is None:
            self._idx_sha256 = sha256_file(self.idx)
        return self._idx_sha256

    def fingerprint(self) -> dict:
        return {
            "rec_size": self.rec_size,
            "idx_sha256": self._idx_sha(),
            "property": self.property_path.read_text().strip() if self.property_path else None,
        }

    def sources(self) -> list[dict]:
        out = [
            {"path": str(self.rec.resolve()), "bytes": self.rec_size, "role": "rec"},
            {
                "path": str(self.idx.resolve()),
                "bytes": self.idx.stat().st_size,
                "role": "idx",
                "sha256": self._idx_sha(),
            },
        ]
        if self.property_path:
            out.append(
                {
                    "path": str(self.property_path.resolve()),
                    "bytes": self.property_path.stat().st_size,
                    "role": "property",
                }
            )
        return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.rec2wds",
        description="Convert an MXNet/insightface RecordIO dataset (.rec + .idx [+ property]) into WebDataset "
        "tar shards plus manifest.json, keeping the original image bytes.",
        epilog="example: python -m data_prep.rec2wds --rec faces_emore/train.rec --idx faces_emore/train.idx "
        "--out shards/ms1mv2 --workers 8 --dataset ms1mv2",
    )
    p.add_argument("--rec", required=True, help="the .rec file")
    p.add_argument("--idx", default=None, help="the .idx file (default: the .rec path with .idx)")
    p.add_argument(
        "--property",
        default=None,
        help="the property file 'num_classes,h,w' (default: 'property' next to the .rec, if present)",
    )
    p.add_argument("--out", required=True, help="output shard directory (created)")
    shard_cli.add_common_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    idx = args.idx or str(Path(args.rec).with_suffix(".idx"))
    source = RecSource(args.rec, idx, args.property)
    return shard_cli.run_cli(source, args)


if __name__ == "__main__":
    sys.exit(shard_cli.main_wrapper(main))
