"""Known training datasets and a check of a shard manifest against their published counts.

Facts live in ``configs/datasets/<name>.yaml`` (pure data files under a top-level ``dataset:``
block, never loaded as config layers). Usage::

    python -m data_prep.datasets list
    python -m data_prep.datasets check --manifest shards/ms1mv2 --dataset ms1mv2

Verdicts (one line; exit 0 for the first three, 1 for ``mismatch``, 2 for bad input):

* ``match``: identities and images equal a published variant exactly;
* ``match-with-skips``: identities equal, and images written + bad records skipped equal the
  published count (the source is complete; only corrupt records were dropped);
* ``close``: identities equal and images within ``IMAGE_TOLERANCE`` (1 %) of a published count.
  1 % is the converters' default ``--max-bad-fraction``: a conversion that passed that gate is
  close, not wrong. Identities get no tolerance: the classifier's row count depends on them, and a
  different count means a different release;
* ``mismatch``: anything else.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from data_prep.manifest import DataError, Manifest, read_manifest

DATASET_DIR = Path(__file__).resolve().parents[1] / "configs" / "datasets"
IMAGE_TOLERANCE = 0.01


@dataclass(frozen=True)
class Variant:
    name: str
    num_classes: int
    num_images: int
    source: str


@dataclass(frozen=True)
class DatasetFacts:
    name: str
    aliases: tuple
    variants: tuple


def known() -> dict[str, DatasetFacts]:
    out = {}
    for path in sorted(DATASET_DIR.glob("*.yaml")):
        facts = _load_file(path)
        out[facts.name] = facts
    return out


def _load_file(path: Path) -> DatasetFacts:
    try:
        data = yaml.safe_load(path.read_text())
        d = data["dataset"]
        variants = tuple(
            Variant(str(v["name"]), int(v["num_classes"]), int(v["num_images"]), str(v.get("source", "")))
            for v in d["variants"]
        )
        if not variants:
            raise ValueError("no variants")
        return DatasetFacts(str(d["name"]), tuple(d.get("aliases", [])), variants)
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: not a dataset facts file ({exc})") from None


def load(name: str) -> DatasetFacts:
    table = known()
    key = name.lower().replace("-", "_")
    for facts in table.values():
        if key == facts.name or key in {a.lower().replace("-", "_") for a in facts.aliases}:
            return facts
    raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(table))} (files in {DATASET_DIR})")


def check(manifest: Manifest, facts: DatasetFacts) -> tuple[str, str]:
    """(verdict, one-line message) of a manifest against the best-matching published variant."""
    bad = int(manifest.corrupt.get("count", 0)) if isinstance(manifest.corrupt, dict) else 0
    best = None
    for v in facts.variants:
        rel = abs(manifest.num_images - v.num_images) / v.num_images
        if manifest.num_classes == v.num_classes and manifest.num_images == v.num_images:
            verdict = "match"
        elif manifest.num_classes == v.num_classes and manifest.num_images + bad == v.num_images:
            verdict = "match-with-skips"
        elif manifest.num_classes == v.num_classes and rel <= IMAGE_TOLERANCE:
            verdict = "close"
        else:
            verdict = "mismatch"
        rank = ["match", "match-with-skips", "close", "mismatch"].index(verdict)
        score = (rank, abs(manifest.num_classes - v.num_classes), rel)
        if best is None or score < best[0]:
            best = (score, verdict, v, rel)
    _, verdict, v, rel = best
    msg = (
        f"{verdict}: {facts.name} ({v.name}) has {v.num_classes} identities / {v.num_images} images; "
        f"manifest has {manifest.num_classes} / {manifest.num_images} ({bad} bad records skipped, "
        f"images off by {rel:.3%}; tolerance {IMAGE_TOLERANCE:.0%} on images, none on identities)"
    )
    return verdict, msg


def check_cli(manifest_dir: str | Path, dataset: str) -> int:
    verdict, msg = check(read_manifest(manifest_dir), load(dataset))
    print(msg)
    return 1 if verdict == "mismatch" else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.datasets",
        description="Known face-recognition training sets and a check of shard manifests "
        "against their published identity/image counts.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser(
        "check",
        help="compare a shard directory's manifest.json to a known dataset",
        description="example: python -m data_prep.datasets check --manifest shards/ms1mv2 --dataset ms1mv2",
    )
    c.add_argument("--manifest", required=True, help="shard directory holding manifest.json (or the file itself)")
    c.add_argument("--dataset", required=True, help="ms1mv2 | webface4m | casia_webface (or an alias)")
    sub.add_parser("list", help="print the known datasets and their published counts")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "list":
            for f in known().values():
                for v in f.variants:
                    print(f"{f.name}\t{v.num_classes} ids\t{v.num_images} images\t{v.name}")
            return 0
        path = Path(args.manifest)
        if path.name == "manifest.json":
            path = path.parent
        return check_cli(path, args.dataset)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
