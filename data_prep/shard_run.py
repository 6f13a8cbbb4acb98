"""The conversion driver :func:`run`: plan a source's shards, write them (resumably, in parallel) and describe them.

The steps live in their own modules: :mod:`data_prep.shard_plan` (the plan), :mod:`data_prep.shard_journal` (what a
restarted run keeps), :mod:`data_prep.shard_writer` (one shard, in a worker process) and
:mod:`data_prep.shard_summary` (manifest or corrupt report).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

from data_prep import shard_journal
from data_prep.manifest import DataError
from data_prep.shard_journal import JOURNAL
from data_prep.shard_plan import Plan, make_plan
from data_prep.shard_source import Source
from data_prep.shard_summary import RunResult, summarise
from data_prep.shard_writer import init_worker, write_shard

#: Test hook: stop the run (exit status 75) after this many newly written shards, simulating a kill.
STOP_ENV = "DATA_PREP_STOP_AFTER_SHARDS"


def run(
    source: Source,
    out: str | Path,
    *,
    seed: int = 0,
    shard_size: int | None = None,
    shard_bytes: int | None = None,
    workers: int = 1,
    verify: str = "decode",
    max_bad_fraction: float = 0.01,
    overwrite: bool = False,
    progress: bool | None = None,
    log=print,
) -> RunResult:
    """Plan, write (resumably, in parallel) and describe the shards of ``source`` in ``out``."""
    t0 = time.perf_counter()
    _check_settings(verify, shard_size, shard_bytes, max_bad_fraction)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --out exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    plan = make_plan(source, seed, shard_size, shard_bytes, verify)
    results, todo = shard_journal.resume(out, plan, source.tool, overwrite)
    kept = len(results)
    if kept:
        log(f"resuming: {kept} of {len(plan.shards)} shards already complete")

    num_classes = source.num_classes
    written = _write_shards(
        source,
        out,
        plan,
        todo,
        results,
        workers=workers,
        verify=verify,
        num_classes=num_classes,
        progress=progress,
        log=log,
    )
    return summarise(
        source,
        plan,
        results,
        out,
        settings={"seed": seed, "shard_size": shard_size, "shard_bytes": shard_bytes, "verify": verify},
        num_classes=num_classes,
        max_bad_fraction=max_bad_fraction,
        t0=t0,
        written=written,
        log=log,
    )


def _check_settings(verify: str, shard_size: int | None, shard_bytes: int | None, max_bad_fraction: float) -> None:
    if verify not in ("decode", "header", "none"):
        raise DataError(f"--verify must be decode, header or none, not {verify!r}")
    if shard_size is not None and shard_size <= 0:
        raise DataError(f"--shard-size must be positive, got {shard_size}")
    if shard_bytes is not None and shard_bytes <= 0:
        raise DataError(f"--shard-bytes must be positive, got {shard_bytes}")
    if not 0 <= max_bad_fraction <= 1:
        raise DataError(f"--max-bad-fraction must lie in [0, 1], got {max_bad_fraction}")


def _write_shards(
    source: Source,
    out: Path,
    plan: Plan,
    todo: list[int],
    results: dict[int, dict],
    *,
    workers: int,
    verify: str,
    num_classes: int | None,
    progress: bool | None,
    log,
) -> int:
    """Write the shards ``todo`` (in worker processes when ``workers`` > 1), journaling each one as it finishes and
    adding its record to ``results``; return how many were written."""
    stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
    bar = _progress_bar(source, out, plan, results, progress)
    written = 0
    workers = max(1, int(workers))
    pool = None
    # tasks carry their (index, ref) lists, built lazily: the pool's feeder blocks on a full pipe
    tasks = ((i, [source.entry(int(p)) for p in plan.shards[i]]) for i in todo)
    try:
        if workers > 1 and len(todo) > 1:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(
                min(workers, len(todo)), initializer=init_worker, initargs=(source, out, verify, num_classes)
            )
            it = pool.imap_unordered(write_shard, tasks, chunksize=1)
        else:
            init_worker(source, out, verify, num_classes)
            it = map(write_shard, tasks)
        with open(out / JOURNAL, "a") as jf:
            for rec in it:
                shard_journal.append(jf, rec)
                results[rec["shard"]] = rec
                bar.update(len(plan.shards[rec["shard"]]))
                written += 1
                if stop_after and written >= stop_after:
                    _simulated_kill(stop_after, written, log)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
    finally:
        bar.close()
        if pool is not None:  # an exception (e.g. Ctrl-C): stop the workers
            pool.terminate()
            pool.join()
    return written


def _progress_bar(source: Source, out: Path, plan: Plan, results: dict[int, dict], progress: bool | None):
    """A tqdm bar over the plan's images, starting at those of the shards already complete."""
    from tqdm import tqdm

    return tqdm(
        total=plan.num_entries,
        initial=sum(len(plan.shards[i]) for i in results),
        unit="img",
        unit_scale=True,
        desc=f"{source.tool} → {out.name}",
        disable=(not progress) if progress is not None else None,
        smoothing=0.1,
    )


def _simulated_kill(stop_after: int, written: int, log) -> None:
    """The ``STOP_ENV`` test hook: exit like a kill -9, without any cleanup."""
    log(f"{STOP_ENV}={stop_after}: stopping after {written} shards (simulated kill)")
    sys.stderr.flush()
    os._exit(75)
