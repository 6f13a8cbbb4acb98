"""One cell: train it (``pipeline.train``, resumed when it stopped) and evaluate it on every set of the spec, writing ``cell.json``."""

from __future__ import annotations

import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from data_prep.manifest import DataError
from pipeline.checkpoint import latest_or_none, load_json, save_json
from pipeline.config import ConfigError, dump_config
from pipeline.experiments.diagnostics import DiagnosticContext, run_diagnostics
from pipeline.experiments.grid import STATUS_TEXT, Cell, base_record, cell_status, log_tail, read_json, training_state
from pipeline.experiments.spec import CELL_JSON, EVAL_BATCH, KEPT_METRICS, TRAIN_STATE, Spec
from pipeline.runlock import die_with_parent


def run_cell(spec: Spec, cell: Cell, threads: int) -> dict:
    """Train (or resume) and evaluate one cell, holding its lock (:func:`run_one`); writes and returns its cell.json
    record."""
    status = cell_status(cell, holding_lock=True)
    if status == "cached":
        print(f"[ablate] {cell.label}: cached", flush=True)
        return load_json(cell.dir / CELL_JSON)
    cell.dir.mkdir(parents=True, exist_ok=True)
    (cell.dir / CELL_JSON).unlink(missing_ok=True)  # what the parent reads afterwards is this run's
    print(f"[ablate] {cell.label}: {STATUS_TEXT.get(status, status)}", flush=True)
    record = base_record(cell)
    training = training_state(cell)
    if training == "done":  # only the evaluation changed, or it failed last time
        record["train_s"] = (read_json(cell.dir / TRAIN_STATE) or {}).get("train_s")
    else:
        exit_code, record["train_s"] = train_cell(cell, spec.nproc, training == "resume", threads)
        if exit_code != 0:
            return _failed(cell, record, exit_code, cell.dir / "train.log")
    try:
        metrics, diagnostics, checkpoint, record["eval_s"] = evaluate_cell(spec, cell, threads)
    except (ConfigError, DataError) as exc:
        record["error"] = " ".join(str(exc).split())
        return _failed(cell, record, 1, None)
    record.update(status="ok", checkpoint=str(checkpoint), metrics=metrics, diagnostics=diagnostics)
    save_json(cell.dir / CELL_JSON, record)
    return record


def _failed(cell: Cell, record: dict, exit_code: int, log: Path | None) -> dict:
    """Record a cell whose training exited non-zero (``log``: its train.log) or whose evaluation failed."""
    from pipeline.train import EXIT_STOPPED

    record.update(
        status="interrupted" if exit_code in (EXIT_STOPPED, -signal.SIGINT, -signal.SIGTERM) else "failed",
        exit_code=exit_code,
        log=str(log) if log else None,
    )
    if log:
        record.setdefault("error", log_tail(log))
    save_json(cell.dir / CELL_JSON, record)
    return record


def trainer_command(config_path: Path, nproc: int, resume: bool) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "pipeline.train", "--config", str(config_path), *(["--resume"] if resume else [])]


def train_cell(cell: Cell, nproc: int, resume: bool, threads: int) -> tuple[int, float]:
    """Run the trainer on the cell's resolved config; (exit code, seconds). A fresh start clears the run's old
    checkpoints (output.overwrite); ``resume`` continues from its latest one."""
    config_path = cell.dir / "config.yaml"
    dump_config(cell.config, config_path)
    save_json(cell.dir / TRAIN_STATE, {"train_hash": cell.train_hash, "status": "training"})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, str(threads))
    cmd = trainer_command(config_path, nproc, resume)
    started = time.perf_counter()
    with open(cell.dir / "train.log", "a" if resume else "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        # its own session: a terminal's Ctrl-C reaches this process only, which passes on exactly one signal
        # (two SIGINTs would make the trainer abort without its checkpoint)
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=die_with_parent
        )  # and it dies with this cell process (SIGTERM: it checkpoints first)
        exit_code = _wait_passing_signals(proc)
    seconds = round(time.perf_counter() - started, 1)
    if exit_code == 0 and not _reached_last_step(cell):
        from pipeline.train import EXIT_STOPPED

        exit_code = EXIT_STOPPED  # preempted under Slurm: the trainer requeued itself and exited 0
    if exit_code == 0:
        save_json(cell.dir / TRAIN_STATE, {"train_hash": cell.train_hash, "status": "done", "train_s": seconds})
    return exit_code, seconds


def _reached_last_step(cell: Cell) -> bool:
    latest = latest_or_none(cell.run_dir / "checkpoints")
    meta = read_json(latest / "trainer.json") if latest else None
    return bool(meta) and meta.get("step", 0) >= meta.get("total_steps", math.inf)


def _wait_passing_signals(proc: subprocess.Popen) -> int:
    """Wait for the trainer; SIGINT / SIGTERM to this process go on to it (it checkpoints and exits 4)."""

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _device(setting: str):
    import torch

    from pipeline.core.device import resolve_device

    return torch.device(resolve_device(setting))


def evaluate_cell(spec: Spec, cell: Cell, threads: int) -> tuple[dict, dict, Path, float]:
    """(metrics per set, diagnostics, checkpoint, seconds) of the cell's final checkpoint, through the one
    evaluation front-end (:func:`pipeline.eval.run.evaluate`), keeping the embeddings for the diagnostics."""
    import torch

    from pipeline.eval.checkpoint import load_network_checked
    from pipeline.eval.run import evaluate, metrics_of

    torch.set_num_threads(threads)
    started = time.perf_counter()
    net, model_cfg, weights = load_network_checked(cell.run_dir)
    device = _device(cell.config.device)
    net = net.to(device).eval()
    sets = [entry.to_eval_set() for entry in spec.eval]
    out = evaluate(
        net.embedder().eval(),
        sets,
        image_size=model_cfg.input_size,
        batch_size=EVAL_BATCH,
        device=device,
        keep_embeddings=True,
    )
    metrics = {}
    for eval_set, row in zip(sets, out["results"]):
        kept = metrics_of(row)
        metrics[eval_set.name] = kept if not eval_set.is_pairs else {k: kept[k] for k in KEPT_METRICS if k in kept}
    ctx = DiagnosticContext(cell.run_dir, sets, device, model_cfg.input_size, out["embeddings"])
    diagnostics = run_diagnostics(spec.diagnostics, net, cell.config, ctx)
    return metrics, diagnostics, weights.parent, round(time.perf_counter() - started, 1)
