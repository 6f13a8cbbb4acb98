"""What a run's TensorBoard logs hold, on a terminal: every scalar tag with its step range, number of points and
last value (``tensorboard --inspect`` lists tag names only).

    python -m pipeline.tb runs/r50            # the run folder (its tb/) or a tb/ folder
    python -m pipeline.tb runs/r50 loss/      # only tags starting with loss/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def scalar_summary(logdir: str | Path, prefix: str = "") -> list[tuple[str, int, int, int, float]]:
    """(tag, first step, last step, points, last value) of every scalar tag under ``logdir`` (sorted by tag)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    rows = []
    for tag in sorted(acc.Tags().get("scalars", [])):
        if not tag.startswith(prefix):
            continue
        events = acc.Scalars(tag)
        if events:
            rows.append((tag, events[0].step, events[-1].step, len(events), events[-1].value))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.tb", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("run", help="a run's output.dir (holding tb/) or a TensorBoard log folder")
    ap.add_argument("prefix", nargs="?", default="", help="only tags starting with this, e.g. loss/ or monitor/")
    args = ap.parse_args(argv)
    logdir = Path(args.run)
    if (logdir / "tb").is_dir():
        logdir = logdir / "tb"
    if not logdir.is_dir():
        print(f"error: {args.run}: no such folder", file=sys.stderr)
        return 2
    rows = scalar_summary(logdir, args.prefix)
    if not rows:
        print(
            f"error: {logdir}: no scalar tags{f' starting with {args.prefix!r}' if args.prefix else ''}",
            file=sys.stderr,
        )
        return 2
    width = max(len(r[0]) for r in rows)
    print(f"{'tag':<{width}}  {'steps':>15}  {'points':>6}  last value")
    for tag, first, last, n, value in rows:
        print(f"{tag:<{width}}  {f'{first}–{last}':>15}  {n:>6}  {value:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
