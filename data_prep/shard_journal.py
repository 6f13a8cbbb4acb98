"""The resume journal ``OUT/.journal.jsonl``: a header line naming the plan, then one line per finished shard (name,
count, sha256, bytes, corrupt records, …).

A run started again after a kill keeps each shard whose file still has the journaled size and sha256 and rewrites the
others, so it ends with identical shards. Shards or a manifest of another plan in OUT are an error unless the run may
overwrite them.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.manifest import MANIFEST, DataError, atomic_write_text, sha256_file
from data_prep.shard_plan import TOOL_VERSION, Plan
from data_prep.shard_summary import CORRUPT_REPORT
from data_prep.shard_writer import SHARD_PATTERN

JOURNAL = ".journal.jsonl"


def resume(out: Path, plan: Plan, tool: str, overwrite: bool) -> tuple[dict[int, dict], list[int]]:
    """Make ``out`` ready for writing ``plan``: (journal records of the shards already complete, indices of the
    shards still to write). Starts the journal when there is none (or nothing of it is kept)."""
    journal_path = out / JOURNAL
    done = _claim(out, plan.digest, overwrite)
    _remove_leftovers(out, len(plan.shards))
    results, todo = _verified_shards(out, done, len(plan.shards))
    if not journal_path.exists() or done == {} and not results:
        atomic_write_text(journal_path, json.dumps({"plan": plan.digest, "tool": tool, "version": TOOL_VERSION}) + "\n")
    return results, todo


def append(jf, rec: dict) -> None:
    """Journal one finished shard (``jf``: the journal opened for appending)."""
    jf.write(json.dumps(rec, sort_keys=True) + "\n")
    jf.flush()


def _read_journal(path: Path, digest: str) -> dict[int, dict] | None:
    """Completed shards of the journal for plan ``digest``; None if the journal is of another plan."""
    if not path.is_file():
        return {}
    done = {}
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines:
        return {}
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError:
        return None
    if head.get("plan") != digest:
        return None
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill: that shard is simply redone
            continue
        done[int(rec["shard"])] = rec
    return done


def _claim(out: Path, digest: str, overwrite: bool) -> dict[int, dict]:
    """The journaled shards of plan ``digest`` in ``out``; outputs of another run are cleared (``overwrite``) or a
    DataError."""
    journal_path = out / JOURNAL
    done = _read_journal(journal_path, digest)
    has_outputs = any(out.glob("shard-*.tar")) or (out / MANIFEST).exists()
    if done is None or (not done and has_outputs and not journal_path.exists()):
        if not overwrite:
            raise DataError(
                f"{out}: holds shards or a manifest from a different run (other input, seed or "
                f"shard size); pass --overwrite to replace them or choose another --out"
            )
        _clear_outputs(out)
        done = {}
    return done


def _clear_outputs(out: Path) -> None:
    for p in list(out.glob("shard-*.tar")) + [out / JOURNAL, out / MANIFEST, out / CORRUPT_REPORT]:
        if p.exists():
            p.unlink()


def _remove_leftovers(out: Path, num_shards: int) -> None:
    """Delete the temporary tars of a killed run and shard files numbered beyond this plan."""
    for stale in out.glob(".shard-*.tar.tmp*"):  # left by a killed run
        stale.unlink()
    # stale shard files numbered beyond this plan (only possible after --overwrite races): drop them
    for p in out.glob("shard-*.tar"):
        try:
            if int(p.stem.split("-")[1]) >= num_shards:
                p.unlink()
        except ValueError:
            pass


def _verified_shards(out: Path, done: dict[int, dict], num_shards: int) -> tuple[dict[int, dict], list[int]]:
    """Split the plan's shards into those whose file still matches its journal record (kept) and the rest."""
    results: dict[int, dict] = {}
    todo = []
    for i in range(num_shards):
        rec = done.get(i)
        path = out / SHARD_PATTERN.format(i)
        if rec and path.is_file() and path.stat().st_size == rec["bytes"] and sha256_file(path) == rec["sha256"]:
            results[i] = rec
        else:
            todo.append(i)
    return results, todo
