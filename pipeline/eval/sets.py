"""Evaluation sets: the one type every evaluation reads (:class:`EvalSet`: an insightface ``.bin``, an LFW pairs list
with its image folder, or a labelled image set) and the readers behind it — ``.bin`` and pairs decoded and cached by
path + modification time, labelled images from ``<image path> <label>`` lists or ``<identity>/<images>`` folders."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_prep.folder2wds import identity_folder_images
from data_prep.manifest import DataError
from pipeline.eval.embed import read_file, stack_images
from pipeline.eval.tarfar import ALL_PAIRS_FARS
from pipeline.faces.io import decode_image, read_bin, read_pairs

PAIRS, LABELLED = "pairs", "labelled"
_CACHE_MAX = 8  # decoded sets kept per process (LFW dev-test: 2,000 faces, 75 MB)
_DECODED: dict[tuple, tuple] = {}


# --------------------------------------------------------------------------- labelled image sets


@dataclass
class ImageSet:
    """Images with identity labels (strings: list labels and folder names share one namespace)."""

    paths: list[Path]
    labels: list[str]
    source: str  # the list file or folder it was read from, for messages

    def __len__(self) -> int:
        return len(self.paths)


def read_image_list(path: str | Path, labelled: bool = True) -> ImageSet:
    """``<image path> <label>`` lines (paths relative to the list's folder); every image must exist.

    ``labelled=False`` (distractors): a line may be a path alone (without spaces, or it reads as
    ``<path> <label>``); labels of distractors match nothing in the search."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text file (byte {exc.start} is not UTF-8)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    paths, labels = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        fields = s.rsplit(None, 1)
        if len(fields) == 2:
            image, label = fields
        elif not labelled:
            image, label = s, ""
        else:
            raise DataError(f"{path}:{lineno}: expected '<image path> <label>', got {s[:80]!r}")
        p = path.parent / image
        if not p.is_file():
            raise DataError(f"{path}:{lineno}: image {p} does not exist")
        paths.append(p)
        labels.append(label)
    if not paths:
        raise DataError(f"{path}: lists no images")
    return ImageSet(paths, labels, str(path))


def read_identity_folder(path: str | Path) -> ImageSet:
    """A folder of ``<identity>/<images>`` (images searched recursively; top-level files ignored)."""
    images = identity_folder_images(path)
    return ImageSet([p for p, _ in images], [label for _, label in images], str(path))


def read_image_set(path: str | Path, labelled: bool = True) -> ImageSet:
    """A list file or an identity folder, whichever ``path`` is."""
    path = Path(path)
    if path.is_dir():
        return read_identity_folder(path)
    if path.is_file():
        return read_image_list(path, labelled)
    raise DataError(f"{path}: does not exist (expected a list of '<image path> <label>' lines or an identity folder)")


def concat_image_sets(sets: list[ImageSet]) -> ImageSet:
    return ImageSet(
        [p for s in sets for p in s.paths], [lab for s in sets for lab in s.labels], ", ".join(s.source for s in sets)
    )


# --------------------------------------------------------------------------- pair sets


def load_bin(path: str | Path, image_size: int | None = 112) -> tuple[torch.Tensor, np.ndarray]:
    """Decoded ``.bin``: (uint8 tensor (2P, H, W, 3) RGB, bool array (P,)), decoded once per path + mtime.

    ``image_size`` resizes images of another size (None keeps the first image's size).
    """
    return EvalSet.from_bin(path).load(image_size)


def load_pairs(
    pairs_path: str | Path, root: str | Path, image_size: int | None = 112, ext: str = "jpg"
) -> tuple[torch.Tensor, np.ndarray]:
    """LFW pairs.txt + image folder → the same structure as :func:`load_bin` (fold order)."""
    return EvalSet.from_pairs(pairs_path, root, ext).load(image_size)


# --------------------------------------------------------------------------- the one set type


@dataclass(frozen=True)
class Decoded:
    """A set's images decoded at their stored size: ``keys[i]`` (sha1 of image i's bytes) → ``images[key]``;
    ``target``: issame per pair (pair sets) or a label per image (labelled sets)."""

    keys: list[str]
    images: dict[str, np.ndarray]
    target: np.ndarray


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set. ``kind`` ``pairs`` (a ``.bin`` or a pairs list + image folder: 10-fold verification of its
    pairs) or ``labelled`` (identity folders or a list file: TAR at ``fars`` over all its pairs). Build it with
    :meth:`from_bin`, :meth:`from_pairs`, :meth:`from_images`."""

    name: str
    kind: str
    path: str  # the .bin, the pairs list or the labelled images
    root: str = ""  # the image folder of a pairs list
    ext: str = "jpg"
    fars: tuple[float, ...] = field(default=ALL_PAIRS_FARS)

    @classmethod
    def from_bin(cls, path: str | Path, name: str = "") -> EvalSet:
        return cls(name or Path(path).stem, PAIRS, str(path))

    @classmethod
    def from_pairs(cls, pairs: str | Path, root: str | Path, ext: str = "jpg", name: str = "") -> EvalSet:
        return cls(name or Path(pairs).stem, PAIRS, str(pairs), str(root), ext)

    @classmethod
    def from_images(cls, path: str | Path, name: str = "", fars=ALL_PAIRS_FARS) -> EvalSet:
        return cls(name or Path(path).stem, LABELLED, str(path), fars=tuple(fars))

    @property
    def is_pairs(self) -> bool:
        return self.kind == PAIRS

    @property
    def what(self) -> str:
        return "labelled image set" if self.kind == LABELLED else "pairs file" if self.root else ".bin file"

    def encoded(self) -> tuple[list[bytes], np.ndarray, list[str]]:
        """(the images' bytes in set order, target, what names each image in a message) — pair k = images 2k,
        2k+1."""
        if self.kind == LABELLED:
            image_set = read_image_set(self.path)
            files = image_set.paths
            return [read_file(p) for p in files], np.asarray(image_set.labels), [str(p) for p in files]
        if self.root:
            pairs, issame = read_pairs(self.path, self.root, self.ext)
            files = [p for ab in pairs for p in ab]
            return [read_file(p) for p in files], np.asarray(issame, dtype=bool), [str(p) for p in files]
        bins, issame = read_bin(self.path)
        return bins, np.asarray(issame, dtype=bool), [f"{self.path} image {i}" for i in range(len(bins))]

    def decoded(self) -> Decoded:
        """The set decoded at its stored size, each distinct image once; cached by path + mtime + size."""
        key = (self.kind, self.path, self.root, self.ext, _stamp(self.path, self.what))
        if key not in _DECODED:
            data, target, where = self.encoded()
            if self.is_pairs and len(data) != 2 * len(target):
                raise DataError(f"{self.name}: {len(data)} images for {len(target)} pairs")
            keys, images = [], {}
            for i, b in enumerate(data):
                h = hashlib.sha1(b).hexdigest()
                if h not in images:
                    images[h] = decode_image(b, where[i])
                keys.append(h)
            if len(_DECODED) >= _CACHE_MAX:
                _DECODED.pop(next(iter(_DECODED)))
            _DECODED[key] = Decoded(keys, images, target)
        return _DECODED[key]

    def load(self, image_size: int | None = 112) -> tuple[torch.Tensor, np.ndarray]:
        """(uint8 images (N, S, S, 3) in set order, resized to ``image_size``; target)."""
        d = self.decoded()
        return stack_images([d.images[k] for k in d.keys], self.path, image_size), d.target


def _stamp(path: str, what: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        raise DataError(f"{path}: {what} does not exist") from None
    return st.st_mtime_ns, st.st_size
