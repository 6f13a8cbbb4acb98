"""``python -m pipeline.ablate``: the command line of the experiments room."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from data_prep.manifest import DataError
from pipeline.config import ConfigError
from pipeline.core.errors import print_error
from pipeline.experiments.cell import run_cell
from pipeline.experiments.grid import STATUS_TEXT, Cell, build_grid, cell_status
from pipeline.experiments.render import write_report
from pipeline.experiments.runner import cpu_count, describe_record, run_grid
from pipeline.experiments.spec import (
    EXIT_BUSY,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_SPEC,
    Spec,
    SpecError,
    load_spec,
)
from pipeline.runlock import FolderLock, FolderLocked


def print_grid(spec: Spec, cells: list[Cell]) -> None:
    width = max(len(c.arm) for c in cells)
    print(f"{'#':>4}  {'arm':<{width}}  {'seed':>6}  status")
    statuses = [cell_status(c) for c in cells]
    for cell, status in zip(cells, statuses):
        print(f"{cell.index:>4}  {cell.arm:<{width}}  {cell.seed:>6}  {STATUS_TEXT.get(status, status)}")
    cached = statuses.count("cached")
    print(
        f"{len(cells)} cells ({len(spec.arms)} arms × {len(spec.seeds)} seeds): {cached} cached, {len(cells) - cached} to run"
    )
    base = ["python", "-m", "pipeline.ablate", str(spec.path), *spec.extra, "--output", spec.output]
    inner = (
        (shlex.join(base) + " --cell $SLURM_ARRAY_TASK_ID")
        .replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("$", "\\$")
    )
    print(f'Slurm: sbatch --array=0-{len(cells) - 1} --wrap "{inner}"')
    print(f"then:  {shlex.join([*base, '--report-only'])}")


def _threads_here(spec: Spec) -> int:
    """Threads for a --cell run: OMP_NUM_THREADS when set (the runner sets it), else this task's cores / nproc."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0) or spec.processes or cpu_count()
    return max(1, cores // spec.nproc)


def find_cell(cells: list[Cell], which: str | int) -> Cell:
    """``--cell``'s cell: an index into the grid, or ``ARM@SEED`` (what the runner passes its subprocesses)."""
    text = str(which).strip()
    if "@" in text:
        arm, _, seed = text.rpartition("@")
        for cell in cells:
            if cell.arm == arm and str(cell.seed) == seed:
                return cell
        raise SpecError(f"--cell {text}: no arm '{arm}' with seed {seed} in the spec (the spec changed?); see --list")
    if not text.lstrip("-").isdigit():
        raise SpecError(f"--cell {text}: give a cell index or ARM@SEED")
    index = int(text)
    if not 0 <= index < len(cells):
        raise SpecError(f"--cell {index}: the grid has {len(cells)} cells (0-{len(cells) - 1}); see --list")
    return cells[index]


def run_one(spec: Spec, cells: list[Cell], which: str | int) -> int:
    """``--cell``: train and evaluate one cell, holding its folder's lock: the holder is the one writer of the
    cell's train_state.json and cell.json, and a second process for the same cell refuses (exit 75)."""
    cell = find_cell(cells, which)
    try:
        lock = FolderLock(cell.dir, "ablation cell").acquire()
    except FolderLocked as exc:
        print(f"error: {cell.label}: {exc}", file=sys.stderr, flush=True)
        return EXIT_BUSY
    try:
        record = run_cell(spec, cell, _threads_here(spec))
    finally:
        lock.release()
    print(f"[ablate] {cell.label}: {describe_record(record)}", flush=True)
    return 0 if record["status"] == "ok" else EXIT_INCOMPLETE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.ablate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python -m pipeline.ablate configs/ablations/smoke_scan.yaml --list, then without --list.",
    )
    ap.add_argument("spec", help="the ablation spec (YAML), e.g. configs/ablations/smoke_scan.yaml")
    ap.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides for every arm, after the spec's (e.g. data.train=/scratch/shards); "
        "give the same ones to --cell and --report-only",
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--list", action="store_true", help="print the grid (index, arm, seed, status) and the sbatch line"
    )
    mode.add_argument(
        "--cell",
        metavar="INDEX|ARM@SEED",
        help="run only that cell: its index (a Slurm array task: --cell $SLURM_ARRAY_TASK_ID) or arm@seed",
    )
    mode.add_argument(
        "--report-only", action="store_true", help="write results.json / results.md from the cells on disk"
    )
    ap.add_argument(
        "--jobs", type=int, metavar="N", help="cells at a time (default: the spec's parallel:, else automatic)"
    )
    ap.add_argument("--output", metavar="DIR", help="output folder (default: the spec's output:)")
    args = ap.parse_intermixed_args(argv)
    if args.jobs is not None and args.jobs < 1:
        ap.error("--jobs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = load_spec(args.spec, args.overrides, args.output)
        cells = build_grid(spec)
        if args.list:
            print_grid(spec, cells)
            return 0
        if args.cell is not None:
            return run_one(spec, cells, args.cell)
        finished = True if args.report_only else run_grid(spec, cells, args.jobs)
        report = write_report(spec, cells)
    except (SpecError, ConfigError, DataError) as exc:
        print_error(exc)
        return EXIT_SPEC
    print(report["markdown"], flush=True)
    print(f"[ablate] wrote {spec.out_dir / 'results.md'} and {spec.out_dir / 'results.json'}", flush=True)
    if not finished:
        return EXIT_INTERRUPTED
    return 0 if report["complete"] else EXIT_INCOMPLETE
