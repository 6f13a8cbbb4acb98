"""Submit :mod:`pipeline.train` with submitit (Slurm, or local processes for tests and laptops).

    python -m pipeline.launch --config configs/scan_r101_ms1mv2.yaml data.train=/data/ms1mv2 \\
        --nodes 2 --gpus-per-node 8 --partition gpu --time 2880
    python -m pipeline.launch --config configs/arcface_r50.yaml --config configs/smoke.yaml \\
        data.train=shards/lfw --executor local --gpus-per-node 0 --tasks-per-node 2

One task per GPU (``--tasks-per-node`` defaults to ``max(1, --gpus-per-node)``). Each task sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from :class:`submitit.JobEnvironment`
and calls :func:`pipeline.train.main` with the same ``--config`` layers and ``key=value``
overrides that ``python -m pipeline.train`` takes.

Executors (always chosen explicitly: submitit's ``AutoExecutor`` would pick Slurm whenever
``srun`` is on PATH): ``slurm`` submits an sbatch job and returns its id (``--wait`` to block);
``local`` runs the tasks as local processes and waits; ``debug`` runs one task in this process.

Preemption on Slurm: submitit asks Slurm for its preemption signal (SIGUSR2) ``--signal-delay``
seconds before the time limit; each task turns it into the trainer's SIGUSR1, on which the trainer
checkpoints at a step all ranks agree on and requeues the job (``scontrol requeue``). The requeued
job runs the same submission again with ``SLURM_RESTART_COUNT > 0`` and resumes from the newest
checkpoint in ``output.dir``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

EXECUTORS = ("slurm", "local", "debug")


class LaunchError(ValueError):
    """A bad launcher argument, with a one-line message naming the option."""


def _master_addr(env) -> str:
    """Address of the job's first node: 127.0.0.1 for local runs, else the Slurm NodeAddr."""
    if not os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return "127.0.0.1"
    first = env.hostnames[0]
    # A node name need not resolve (e.g. simulated nodes n1/n2); its NodeAddr does.
    try:
        out = subprocess.run(["scontrol", "show", "node", first], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return first
    m = re.search(r"NodeAddr=(\S+)", out)
    return m.group(1) if m else first


def _port_from_job_id(job_id: str) -> int:
    """10000 + job id % 50000, the rule of jobs/_common.sh (stable across requeues)."""
    digits = int(re.sub(r"\D", "", str(job_id)) or 0)
    return 10000 + digits % 50000


_PREEMPTED = False  # set when submitit's preemption signal reached this task


def _requeued() -> bool:
    """True when this run was told to stop for preemption, or Slurm no longer sees the job running
    (``scontrol requeue`` moves it to REQUEUED/COMPLETING/PENDING while its tasks still exit)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return False
    if _PREEMPTED:
        return True
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    m = re.search(r"\bJobState=(\S+)", out)
    return bool(m) and m.group(1) != "RUNNING"


def _forward_preemption(signum, frame) -> None:
    """submitit's preemption signal → the trainer's SIGUSR1 (checkpoint, requeue, exit)."""
    global _PREEMPTED
    if callable(signal.getsignal(signal.SIGUSR1)):
        _PREEMPTED = True
        signal.raise_signal(signal.SIGUSR1)
    else:  # still starting up (no handler yet): nothing to save; Slurm will stop the job
        print(f"[launch] signal {signum} before the trainer started its loop; ignored", flush=True)


def train_task(argv: list[str], master_port: int | None = None) -> int:
    """Body of every submitit task: set the process-group variables, then run the trainer."""
    import submitit

    from pipeline import train

    env = submitit.JobEnvironment()
    os.environ.update(
        RANK=str(env.global_rank),
        WORLD_SIZE=str(env.num_tasks),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=_master_addr(env),
        MASTER_PORT=str(master_port if master_port else _port_from_job_id(env.job_id)),
    )
    # submitit's preemption signal (SUBMITIT_PREEMPT_SIGNAL, default USR2) → the trainer's SIGUSR1.
    signal.signal(getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")), _forward_preemption)
    rc = train.main(list(argv))
    if rc == 0 and _requeued():
        # The trainer checkpointed and requeued the job: Slurm is about to kill this task. Returning
        # now would let submitit write a result pickle, and `job.results()` would report the job
        # as finished while its requeued run is still to come. Wait to be killed instead.
        print("[launch] job requeued after preemption; waiting for Slurm to stop this run", flush=True)
        time.sleep(600)
        raise RuntimeError("the job was requeued but this run was not stopped by Slurm within 600 s")
    if rc:
        train.kill_workers()  # submitit still writes its result; then the exit handlers must not wait on workers
        raise RuntimeError(f"pipeline.train exited with status {rc} on rank {env.global_rank} (see the task log)")
    return rc


def _parse_kv(items: list[str], option: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"{option}: expected KEY=VALUE, got '{item}'")
        out[key] = value
    return out


def build_executor(args: argparse.Namespace):
    import submitit

    if args.executor not in EXECUTORS:
        raise LaunchError(f"--executor: unknown '{args.executor}' (known: {', '.join(EXECUTORS)})")
    if args.nodes < 1:
        raise LaunchError(f"--nodes: must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node: must be >= 0, got {args.gpus_per_node}")
    tasks = args.tasks_per_node if args.tasks_per_node is not None else max(1, args.gpus_per_node)
    if tasks < 1:
        raise LaunchError(f"--tasks-per-node: must be >= 1, got {tasks}")
    if args.executor != "slurm" and args.nodes != 1:
        raise LaunchError(f"--nodes: the {args.executor} executor runs on this machine only (got --nodes {args.nodes})")
    if args.executor == "debug" and tasks != 1:
        raise LaunchError(f"--tasks-per-node: the debug executor runs one task in this process (got {tasks})")
    extra = _parse_kv(args.slurm_arg, "--slurm-arg")

    executor = submitit.AutoExecutor(folder=args.folder, cluster=args.executor)
    params = dict(
        name=args.name, nodes=args.nodes, tasks_per_node=tasks, cpus_per_task=args.cpus_per_task, timeout_min=args.time
    )
    if args.executor == "slurm":
        params.update(
            gpus_per_node=args.gpus_per_node,
            slurm_signal_delay_s=args.signal_delay,
            slurm_additional_parameters={"requeue": True, **extra},
            # srun (Slurm 22.05) does not inherit --cpus-per-task from sbatch.
            slurm_srun_args=[f"--cpus-per-task={args.cpus_per_task}"],
        )
        if args.partition:
            params["slurm_partition"] = args.partition
    elif args.executor == "local" and args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    executor.update_parameters(**params)
    return executor, tasks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.launch",
        description="Submit pipeline.train with submitit: one task per GPU on Slurm, or local processes.",
        epilog="examples:\n"
        "  python -m pipeline.launch --config configs/scan_r101_ms1mv2.yaml data.train=/data/ms1mv2 \\\n"
        "      --nodes 2 --gpus-per-node 8 --partition gpu --time 2880\n"
        "  python -m pipeline.launch --config configs/arcface_r50.yaml --config configs/smoke.yaml \\\n"
        "      data.train=shards/lfw output.dir=runs/try --executor local --gpus-per-node 0 --tasks-per-node 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="YAML",
        help="config layer for pipeline.train; repeat to stack (later layers win)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides passed to pipeline.train")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CKPT",
        help="passed to pipeline.train (resume from CKPT, or output.dir's latest)",
    )
    _add_job_arguments(p)
    args = p.parse_intermixed_args(argv)
    if not args.config:
        p.error("at least one --config is required")
    return args


def _add_job_arguments(p: argparse.ArgumentParser) -> None:
    """Where and how the job runs: executor, nodes, tasks, CPUs, time, Slurm options."""
    p.add_argument(
        "--executor",
        default="slurm",
        choices=EXECUTORS,
        help="slurm (sbatch), local (processes on this machine) or debug (in this process); default slurm",
    )
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; 0 for CPU runs (default 8)")
    p.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        help="processes per node (default: max(1, --gpus-per-node), i.e. one per GPU)",
    )
    p.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per task (default 8)")
    p.add_argument("--time", type=int, default=2880, help="time limit in minutes (default 2880 = 2 days)")
    p.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    p.add_argument(
        "--slurm-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra sbatch option, e.g. --slurm-arg account=vision --slurm-arg qos=high",
    )
    p.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        help="seconds before the time limit at which the job is told to checkpoint (default 120)",
    )
    p.add_argument("--name", default="lowq-train", help="job name (default lowq-train)")
    p.add_argument(
        "--folder", default="logs/submitit/%j", help="submitit folder for pickles and logs (default logs/submitit/%%j)"
    )
    p.add_argument("--wait", action="store_true", help="with --executor slurm: block until the job ends")


def train_argv(args: argparse.Namespace) -> list[str]:
    argv = [a for path in args.config for a in ("--config", str(Path(path).resolve()))]
    if args.resume:
        argv += ["--resume", args.resume]
    return argv + list(args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for path in args.config:
            if not Path(path).is_file():
                raise LaunchError(f"--config: '{path}' does not exist")
        executor, tasks = build_executor(args)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from pipeline.distributed import free_port

    # Local tasks share this machine: pick a free port now. On Slurm the port comes from the job id.
    port = None if args.executor == "slurm" else free_port()
    job = executor.submit(train_task, train_argv(args), port)
    world = args.nodes * tasks
    print(
        f"[launch] {args.executor} job {job.job_id}: {args.nodes} node(s) x {tasks} task(s) = world {world}; "
        f"logs in {job.paths.folder}",
        flush=True,
    )
    if args.executor == "slurm" and not args.wait:
        return 0
    try:
        job.results()  # one result per task; raises if any task failed
    except Exception as exc:  # submitit re-raises the task's error with its traceback text
        print(
            f"error: job {job.job_id} failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}"
            f" (logs: {job.paths.stdout} / {job.paths.stderr})",
            file=sys.stderr,
        )
        return 1
    print(f"[launch] job {job.job_id} finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
