"""Image folder tree or ``path label`` list → WebDataset shards + ``manifest.json``.

Usage::

    python -m data_prep.folder2wds --root ../shared/data/lfw_view1_112/train_112 --out shards/lfw --shard-size 200
    python -m data_prep.folder2wds --list ../shared/data/lfw_view1_112/train_list.txt --out shards/lfw

``--root DIR``: one sub-folder per identity; classes are the sorted names of the sub-folders that
hold at least one image (searched recursively), numbered 0..C-1 (names in the manifest's
``extra.class_names``). ``--list FILE``: lines ``<path> <label>`` (tab or spaces; ``#`` comments
and blank lines skipped), paths relative to the list file's directory; ``num_classes`` is the
largest label + 1. Image bytes are copied untouched; each sample's member extension follows the
bytes' real format. Undecodable or missing images are skipped, reported and counted; more than
``--max-bad-fraction`` of them → exit 1 and no manifest. A missing/empty root or a bad list line
→ one-line error, exit 2. Reruns are byte-identical; a killed run started again resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

from data_prep import shard_cli
from data_prep.manifest import READ_EXTENSIONS, DataError
from data_prep.shard_source import BadRecord, Sample, Source

IMAGE_SUFFIXES = frozenset(f".{e}" for e in READ_EXTENSIONS)


def image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively), sorted: the order an identity folder is read in."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def identity_folder_images(root: str | Path) -> list[tuple[Path, str]]:
    """``(image, identity)`` of a folder of ``<identity>/<images>`` (images searched recursively; top-level files
    ignored), in identity then file order; a folder without any is a DataError."""
    root = Path(root)
    out = [(f, d.name) for d in sorted(p for p in root.iterdir() if p.is_dir()) for f in image_files(d)]
    if not out:
        raise DataError(f"{root}: holds no <identity>/<image> files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return out


def read_list_file(lf: Path) -> list[tuple[str, int]]:
    """``(path, label)`` of each ``<path> <label>`` line of a list file (``#`` comments and blank lines skipped); a line
    of another shape or with a negative label is a DataError naming the line."""
    items = []
    with open(lf, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            fields = s.rsplit(None, 1)
            try:
                if len(fields) != 2:
                    raise ValueError
                label = int(fields[1])
                if label < 0:
                    raise ValueError
            except ValueError:
                raise DataError(
                    f"{lf}:{lineno}: expected '<path> <non-negative integer label>', got {s[:80]!r}"
                ) from None
            items.append((fields[0], label))
    return items


class FolderSource(Source):
    tool = "data_prep.folder2wds"

    def __init__(self, root: str | Path | None = None, list_file: str | Path | None = None):
        if (root is None) == (list_file is None):
            raise DataError("give exactly one of --root DIR or --list FILE")
        self.pre_corrupt = []
        self.extra = {}
        if root is not None:
            items = self._list_root(Path(root))
        else:
            items = self._list_from_file(Path(list_file))
        self._index(items)
        self.extra["source_kind"] = self.kind

    def _list_root(self, base: Path) -> list[tuple[str, int]]:
        """(path relative to ``base``, label) of every image under the class sub-folders of ``base``."""
        self.base = base
        self.kind = "folder"
        if not self.base.exists():
            raise DataError(f"{self.base}: --root does not exist")
        if not self.base.is_dir():
            raise DataError(f"{self.base}: --root is not a directory")
        per_class = {}
        for d in sorted(p for p in self.base.iterdir() if p.is_dir()):
            files = sorted(str(f.relative_to(self.base)) for f in image_files(d))  # sorted as strings, as before
            if files:
                per_class[d.name] = files
        if not per_class:
            raise DataError(
                f"{self.base}: --root holds no class sub-folders with images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        names = sorted(per_class)
        items = [(f, label) for label, name in enumerate(names) for f in per_class[name]]
        self.num_classes = len(names)
        self.extra["class_names"] = names
        self.extra["ignored_top_level_files"] = sum(1 for p in self.base.iterdir() if p.is_file())
        return items

    def _list_from_file(self, lf: Path) -> list[tuple[str, int]]:
        """(path relative to the list file's directory, label) of every line of the list file ``lf``."""
        self.kind = "list"
        if not lf.is_file():
            raise DataError(f"{lf}: --list file does not exist")
        self.base = lf.parent
        self.list_file = lf
        items = read_list_file(lf)
        if not items:
            raise DataError(f"{lf}: --list file lists no images")
        self.num_classes = max(lab for _, lab in items) + 1
        return items

    def _index(self, items: list[tuple[str, int]]) -> None:
        """Stat every listed file: the listing (refs, sizes) of those present, a ``missing_file`` record for each of
        the others, and the listing's sha256."""
        refs, sizes = [], []
        h = hashlib.sha256()
        for i, (rel, label) in enumerate(items):
            p = self.base / rel
            try:
                size = p.stat().st_size
            except OSError:
                self.pre_corrupt.append(
                    {
                        "index": i,
                        "offset": None,
                        "source": rel,
                        "reason": "missing_file",
                        "message": f"{p} does not exist",
                    }
                )
                h.update(f"{rel}\t{label}\t-\n".encode())
                continue
            refs.append((i, (rel, label)))
            sizes.append(size)
            h.update(f"{rel}\t{label}\t{size}\n".encode())
        self._refs = refs
        self._sizes = np.array(sizes, dtype=np.int64)
        self._digest = h.hexdigest()

    def sizes(self) -> np.ndarray:
        return self._sizes

    def entry(self, pos: int):
        return self._refs[pos]

    def __getstate__(self):  # what a spawned worker receives: no listing
        d = dict(self.__dict__)
        d["_refs"] = d["_sizes"] = None
        return d

    def describe(self, ref) -> str:
        return ref[0]

    def read(self, ref) -> Sample:
        rel, label = ref
        try:
            data = (self.base / rel).read_bytes()
        except OSError as exc:
            raise BadRecord("unreadable_file", f"{self.base / rel}: {exc.strerror}") from None
        return Sample(label, data, rel)

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "listing_sha256": self._digest, "num_classes": self.num_classes}

    def sources(self) -> list[dict]:
        if self.kind == "folder":
            return [
                {
                    "path": str(self.base.resolve()),
                    "role": "folder",
                    "files": len(self._refs) + len(self.pre_corrupt),
                    "listing_sha256": self._digest,
                }
            ]
        return [
            {
                "path": str(self.list_file.resolve()),
                "role": "list",
                "bytes": self.list_file.stat().st_size,
                "files": len(self._refs) + len(self.pre_corrupt),
                "listing_sha256": self._digest,
            }
        ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.folder2wds",
        description="Turn a class-per-folder image tree or a 'path label' list into WebDataset tar shards "
        "plus manifest.json (original image bytes, seeded shuffled shard assignment).",
        epilog="example: python -m data_prep.folder2wds --root ../shared/data/lfw_view1_112/train_112 "
        "--out shards/lfw --shard-size 200 --workers 2",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", help="directory with one sub-folder of images per identity")
    src.add_argument("--list", help="text file of '<path> <label>' lines, paths relative to the file's directory")
    p.add_argument("--out", required=True, help="output shard directory (created)")
    shard_cli.add_common_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    source = FolderSource(root=args.root, list_file=args.list)
    return shard_cli.run_cli(source, args)


if __name__ == "__main__":
    sys.exit(shard_cli.main_wrapper(main))
