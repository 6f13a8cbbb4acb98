"""What the folder2wds and rec2wds commands share: their shard options, their body after the source is built
(:func:`run_cli`: shard, print the one-line summary, optionally check against a known dataset) and the error wrapper
of their ``main`` (:func:`main_wrapper`).
"""

from __future__ import annotations

import sys

from data_prep.manifest import DataError
from data_prep.shard_run import run
from data_prep.shard_summary import CORRUPT_REPORT, RunResult


def finish(res: RunResult, max_bad_fraction: float, log=print) -> int:
    """Print the one-line summary of a run; return the CLI exit status."""
    rate = (res.manifest.num_images if res.manifest else 0) / max(res.seconds, 1e-9)
    if res.manifest is None:
        log(
            f"error: {res.num_bad} bad records = {res.bad_fraction:.2%} of the input, more than "
            f"--max-bad-fraction {max_bad_fraction:.2%}; no manifest written, see {res.out / CORRUPT_REPORT}"
        )
        return 1
    m = res.manifest
    log(
        f"wrote {m.num_images} images of {m.num_classes} classes in {len(m.shards)} shards to {res.out} "
        f"({res.written_shards} shards written this run, {res.num_bad} bad records skipped) "
        f"in {res.seconds:.1f} s, {rate:.0f} img/s"
    )
    return 0


def add_common_args(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--shard-size", type=int, default=None, help="samples per shard (default 10000 when --shard-bytes is not given)"
    )
    g.add_argument(
        "--shard-bytes",
        type=_parse_bytes,
        default=None,
        help="approximate bytes per shard, e.g. 500M or 1G (instead of --shard-size)",
    )
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes, each writes whole shards")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled sample → shard assignment")
    p.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="exit with status 1 (and write no manifest) when more than this fraction is bad",
    )
    p.add_argument(
        "--verify",
        choices=["decode", "header", "none"],
        default="decode",
        help="image check: full decode (default), header parse only, or none",
    )
    p.add_argument("--overwrite", action="store_true", help="replace shards of a different earlier run in --out")
    p.add_argument(
        "--dataset",
        default=None,
        help="known dataset (ms1mv2, webface4m, casia_webface): compare the counts at the end",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_bytes(text: str) -> int:
    t = text.strip().upper().rstrip("B")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        v = int(float(t) * mult)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (examples: 500000000, 500M, 1G)") from None
    return v


def run_cli(source, args) -> int:
    """The body shared by the folder2wds and rec2wds CLIs: shard, report, optionally check the
    manifest against a known dataset (``--dataset``); returns the exit status."""

    def log(m):
        print(m, file=sys.stderr)

    res = run(
        source,
        args.out,
        seed=args.seed,
        shard_size=args.shard_size,
        shard_bytes=args.shard_bytes,
        workers=args.workers,
        verify=args.verify,
        max_bad_fraction=args.max_bad_fraction,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
        log=log,
    )
    status = finish(res, args.max_bad_fraction, log=log)
    if status == 0 and args.dataset:
        from data_prep import datasets

        status = datasets.check_cli(args.out, args.dataset)
    return status


def main_wrapper(fn, argv=None) -> int:
    """Run a CLI body: DataError (or an OS error such as an unwritable --out) → ``error: <msg>``, status 2."""
    try:
        return fn(argv)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
