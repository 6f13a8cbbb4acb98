"""Running the grid: cores and GPUs per cell, cells as subprocesses (``--cell``) in parallel, progress, interrupts."""

from __future__ import annotations

import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoint import save_json
from pipeline.experiments.grid import STATUS_TEXT, Cell, base_record, cell_status, log_tail, read_json, record_matches
from pipeline.experiments.spec import CELL_JSON, EXIT_BUSY, Spec, SpecError
from pipeline.progress import hms
from pipeline.runlock import die_with_parent


@dataclass(frozen=True)
class Plan:
    """How many cells run at once, with how many threads each, and which GPUs each slot owns."""

    jobs: int
    threads: int
    gpu_sets: tuple[str, ...] = ()  # CUDA_VISIBLE_DEVICES per slot; empty on CPU

    def describe(self) -> str:
        where = f"GPUs {' / '.join(self.gpu_sets)}" if self.gpu_sets else "CPU"
        return f"{self.jobs} cell(s) at a time, {self.threads} thread(s) per process, {where}"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    count = torch.cuda.device_count()
    return listed[:count] if listed else [str(i) for i in range(count)]


def plan_resources(spec: Spec, cells: list[Cell], jobs: int | None, cells_to_run: int) -> Plan:
    cores = spec.processes or cpu_count()
    uses_gpu = any(c.config.device in ("auto", "cuda") for c in cells)
    gpus = _visible_gpus() if uses_gpu else []
    if gpus and spec.nproc > len(gpus):
        raise SpecError(
            f"{spec.path}: key 'nproc': {spec.nproc} processes per cell, but {len(gpus)} GPU(s) are visible"
        )
    default = len(gpus) // spec.nproc if gpus else cores // spec.nproc
    jobs = max(1, min(jobs or spec.parallel or default, max(1, cells_to_run)))
    threads = max(1, cores // (jobs * spec.nproc))
    # slot k owns nproc GPUs; with more slots than GPUs / nproc (small models) slots share them round-robin
    gpu_sets = [
        ",".join(gpus[(k * spec.nproc + r) % len(gpus)] for r in range(spec.nproc)) for k in range(jobs if gpus else 0)
    ]
    return Plan(jobs, threads, tuple(gpu_sets) if gpus else ())


class Progress:
    """Cells done / total and an ETA from the mean wall time of the cells finished in this run."""

    def __init__(self, total: int, done: int, jobs: int):
        from tqdm import tqdm

        self.total, self.done, self.jobs, self.walls = total, done, jobs, []
        self.bar = tqdm(total=total, initial=done, unit="cell", disable=not sys.stderr.isatty())

    def say(self, text: str) -> None:
        if self.bar.disable:
            print(text, flush=True)
        else:
            self.bar.write(text)

    def finished(self, cell: Cell, record: dict, wall: float) -> None:
        self.done += 1
        self.walls.append(wall)
        self.bar.update(1)
        left = self.total - self.done
        eta = sum(self.walls) / len(self.walls) * math.ceil(left / self.jobs) if left else 0.0
        self.say(
            f"[ablate] {self.done}/{self.total} cells done; {cell.label}: {describe_record(record)} "
            f"in {wall:.0f} s; ETA {hms(eta)}"
        )

    def close(self) -> None:
        self.bar.close()


def describe_record(record: dict) -> str:
    if record.get("status") == "ok":
        shown = []
        for n, m in record.get("metrics", {}).items():
            key = "accuracy" if "accuracy" in m else next((k for k in m if k.startswith("tar@far=")), None)
            value = m.get(key) if key else None
            shown.append(
                f"{n} {'–' if value is None else f'{100 * value:.2f}'}{'' if key == 'accuracy' else f' ({key})'}"
            )
        return "ok, accuracy % " + ", ".join(shown)
    detail = f"exit {record.get('exit_code')}, log {record.get('log')}"
    return f"{str(record.get('status')).upper()} ({detail}): {record.get('error', '')}"


def cell_command(spec: Spec, cell: Cell) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.ablate",
        str(spec.path.resolve()),
        "--cell",
        cell.key,  # by arm and seed, not index: an arm or seed added to the spec meanwhile shifts the indices
        "--output",
        str(spec.out_dir),
        *spec.extra,
    ]


class GridRunner:
    """Runs the cells that are not cached as ``--cell`` subprocesses, ``plan.jobs`` at a time."""

    def __init__(self, spec: Spec, cells: list[Cell], plan: Plan):
        self.spec, self.cells, self.plan = spec, cells, plan
        self.slots: queue.Queue[int] = queue.Queue()
        for slot in range(plan.jobs):
            self.slots.put(slot)
        self.running: dict[int, subprocess.Popen] = {}
        self.stopping = threading.Event()

    def run(self, todo: list[Cell], progress: Progress) -> bool:
        """True when every cell got its turn; False when interrupted (running cells checkpoint first)."""
        with ThreadPoolExecutor(self.plan.jobs) as pool:
            futures = {pool.submit(self._run_one, cell): cell for cell in todo}
            try:
                for future in as_completed(futures):
                    outcome = future.result()
                    if outcome is not None:
                        progress.finished(futures[future], *outcome)
            except KeyboardInterrupt:
                self.stopping.set()
                progress.say(
                    "[ablate] interrupted: the running cells write a checkpoint and stop (a rerun resumes them)"
                )
                for proc in list(self.running.values()):
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGINT)
                for future in futures:
                    future.result()
                return False
        return True

    def _run_one(self, cell: Cell) -> tuple[dict, float] | None:
        slot = self.slots.get()
        try:
            if self.stopping.is_set():
                return None
            env = {**os.environ, "OMP_NUM_THREADS": str(self.plan.threads), "MKL_NUM_THREADS": str(self.plan.threads)}
            if self.plan.gpu_sets:
                env["CUDA_VISIBLE_DEVICES"] = self.plan.gpu_sets[slot]
            cell.dir.mkdir(parents=True, exist_ok=True)
            log_path = cell.dir / "cell.log"
            started = time.perf_counter()
            with open(log_path, "w") as log:
                proc = subprocess.Popen(
                    cell_command(self.spec, cell),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # Ctrl-C reaches the runner, which passes on one SIGINT per cell
                    preexec_fn=die_with_parent,  # a cell never outlives its runner (kill -9, the OOM killer)
                )
                self.running[cell.index] = proc
                exit_code = proc.wait()
            record = self._record_of(cell, exit_code, log_path)
            return record, time.perf_counter() - started
        finally:
            self.running.pop(cell.index, None)
            self.slots.put(slot)

    def _record_of(self, cell: Cell, exit_code: int, log_path: Path) -> dict:
        """The cell's cell.json; a subprocess that died before writing one is recorded here."""
        if exit_code == EXIT_BUSY:  # another process holds the cell (it is the one writer of its records)
            return {**base_record(cell), "status": "running", "exit_code": exit_code, "log": str(log_path)}
        record = read_json(cell.dir / CELL_JSON)
        if record_matches(record, cell):
            return record
        # the spec (or a config layer) was edited while the cell ran, and the cell ran the edited one: its
        # cell.json is valid for the new spec (a rerun finds it cached) and is kept; this run's report leaves it out
        edited = record is not None and record.get("status") == "ok" and exit_code == 0
        record = {
            **base_record(cell),
            "status": "interrupted" if self.stopping.is_set() and not edited else "failed",
            "exit_code": exit_code,
            "log": str(log_path),
            "error": "the spec or a config it names changed while the cell ran; rerun the runner to use it"
            if edited
            else log_tail(log_path),
        }
        if not edited:
            save_json(cell.dir / CELL_JSON, record)
        return record


def run_grid(spec: Spec, cells: list[Cell], jobs: int | None) -> bool:
    """Train and evaluate every cell that is not cached; False when interrupted."""
    statuses = {c.index: cell_status(c) for c in cells}
    # seed-major: every arm of seed 0, then of seed 1, ... — a run stopped part-way still gives paired seeds
    todo = sorted(
        (c for c in cells if statuses[c.index] not in ("cached", "running")),
        key=lambda c: (spec.seeds.index(c.seed), c.index),
    )
    plan = plan_resources(spec, cells, jobs, len(todo))
    print(
        f"[ablate] {spec.path}: {len(cells)} cells ({len(spec.arms)} arms × {len(spec.seeds)} seeds), "
        f"{len(cells) - len(todo)} cached, {len(todo)} to run; {plan.describe()}; output {spec.out_dir}",
        flush=True,
    )
    for cell in cells:
        if statuses[cell.index] != "new":
            print(f"[ablate] {cell.label}: {STATUS_TEXT.get(statuses[cell.index], statuses[cell.index])}", flush=True)
    if not todo:
        return True
    progress = Progress(len(cells), len(cells) - len(todo), plan.jobs)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # scancel / kill: stop as for Ctrl-C
    try:
        return GridRunner(spec, cells, plan).run(todo, progress)
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()


def _raise_interrupt(_signum, _frame):
    raise KeyboardInterrupt
