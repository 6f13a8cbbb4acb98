"""The end of a shard run: the finished shards' records summed up into ``manifest.json`` (atomic) — or, when more than
``max_bad_fraction`` of the records were bad, into ``OUT/corrupt.json`` and no manifest — and the :class:`RunResult`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from data_prep.manifest import MANIFEST, Manifest, ShardInfo, atomic_write_text, write_manifest
from data_prep.shard_plan import TOOL_VERSION, Plan
from data_prep.shard_source import Source

CORRUPT_REPORT = "corrupt.json"
MAX_LISTED_CORRUPT = 1000
_LOGGED_BAD_RECORDS = 20


@dataclass
class RunResult:
    manifest: Manifest | None
    out: Path
    num_bad: int
    bad_fraction: float
    seconds: float
    written_shards: int


def summarise(
    source: Source,
    plan: Plan,
    results: dict[int, dict],
    out: Path,
    *,
    settings: dict,
    num_classes: int | None,
    max_bad_fraction: float,
    t0: float,
    written: int,
    log=print,
) -> RunResult:
    """Log the bad records, then write the manifest (or the corrupt report when too many were bad).

    ``results``: the journal record of every shard of ``plan``; ``settings``: the run's seed, shard_size,
    shard_bytes and verify (as the manifest's ``extra`` lists them); ``num_classes``: the source's, None for the
    largest label + 1; ``t0``: when the run started.
    """
    recs = [results[i] for i in range(len(plan.shards))]
    corrupt = sorted(list(source.pre_corrupt) + [c for r in recs for c in r["corrupt"]], key=lambda c: c["index"])
    total = plan.num_entries + len(source.pre_corrupt)
    bad_fraction = len(corrupt) / max(1, total)
    block = _corrupt_block(corrupt)
    seconds = time.perf_counter() - t0
    _log_bad_records(corrupt, log)
    if bad_fraction > max_bad_fraction:
        _write_corrupt_report(out, total, bad_fraction, max_bad_fraction, block)
        if (out / MANIFEST).exists():
            (out / MANIFEST).unlink()
        return RunResult(None, out, len(corrupt), bad_fraction, seconds, written)
    if (out / CORRUPT_REPORT).exists():
        (out / CORRUPT_REPORT).unlink()
    manifest = _manifest(source, plan, recs, block, settings, num_classes)
    write_manifest(out, manifest)
    return RunResult(manifest, out, len(corrupt), bad_fraction, seconds, written)


def _corrupt_block(corrupt: list[dict]) -> dict:
    """The ``corrupt`` entry of the manifest (and of corrupt.json): count, the first records, count per reason."""
    return {
        "count": len(corrupt),
        "records": corrupt[:MAX_LISTED_CORRUPT],
        "by_reason": dict(sorted(Counter(c["reason"] for c in corrupt).items())),
    }


def _log_bad_records(corrupt: list[dict], log) -> None:
    for c in corrupt[:_LOGGED_BAD_RECORDS]:
        log(f"bad record {c['index']} at offset {c['offset']} ({c['source']}): {c['reason']}: {c['message']}")
    if len(corrupt) > _LOGGED_BAD_RECORDS:
        log(f"... and {len(corrupt) - _LOGGED_BAD_RECORDS} more bad records (see manifest.json / corrupt.json)")


def _write_corrupt_report(out: Path, total: int, bad_fraction: float, max_bad_fraction: float, block: dict) -> None:
    atomic_write_text(
        out / CORRUPT_REPORT,
        json.dumps(
            {
                "total_records": total,
                "bad_fraction": bad_fraction,
                "max_bad_fraction": max_bad_fraction,
                **block,
            },
            indent=1,
            sort_keys=True,
        )
        + "\n",
    )


def _manifest(
    source: Source, plan: Plan, recs: list[dict], block: dict, settings: dict, num_classes: int | None
) -> Manifest:
    """The manifest of a run whose shard records are ``recs`` (in shard order)."""
    nc = num_classes if num_classes is not None else max(r["max_label"] for r in recs) + 1
    formats = Counter()
    for r in recs:
        formats.update(r["formats"])
    extra = {
        "plan": plan.digest,
        **settings,
        "formats": dict(sorted(formats.items())),
        "identities_per_shard": {"min": min(r["labels"] for r in recs), "max": max(r["labels"] for r in recs)},
        **source.extra,
    }
    return Manifest(
        num_classes=nc,
        num_images=sum(r["count"] for r in recs),
        shards=[ShardInfo(r["name"], r["count"], r["sha256"]) for r in recs],
        corrupt=block,
        sources=source.sources(),
        tool=f"{source.tool} {TOOL_VERSION}",
        extra=extra,
    )
