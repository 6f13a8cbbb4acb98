"""What a converter provides to the shard writer (:mod:`data_prep.shards`): a :class:`Source` of :class:`Sample`\\ s.

A source lists its samples once, in a canonical order (``Source.sizes`` / ``Source.entry``; big listings live in numpy
arrays, ~24 bytes per record), and reads one sample on demand (``Source.read``), raising :class:`BadRecord` for a
record to skip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class BadRecord(Exception):
    """Raised by ``Source.read`` for a record to skip; carries a short reason tag."""

    def __init__(self, reason: str, message: str, offset: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.offset = offset


@dataclass
class Sample:
    label: int
    image: bytes
    src: str
    extra: dict = field(default_factory=dict)  # ext → bytes (e.g. "labels")


class Source:
    """What a tool provides: a listing in canonical order, and a reader of one sample.

    ``sizes()``: int64 array of per-sample byte estimates (its length is the number of samples);
    ``entry(pos)`` → (index, ref): ``index`` identifies the record in reports and names the tar
    key, ``ref`` is what ``read`` needs (small and picklable: it travels to the workers).
    """

    tool = "data_prep"

    def sizes(self) -> np.ndarray:
        raise NotImplementedError

    def entry(self, pos: int) -> tuple[int, Any]:
        raise NotImplementedError

    def read(self, ref) -> Sample:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        raise NotImplementedError

    def sources(self) -> list[dict]:
        raise NotImplementedError

    def offset_of(self, ref) -> int | None:
        """Byte offset of a record in its source file (None for one-file-per-image sources)."""
        return None

    num_classes: int | None = None  # known before reading the images (None: max label + 1)
    pre_corrupt: list = []  # bad records found while listing (e.g. keys missing from the index)
    extra: dict = {}
