"""``python -m pipeline.train``: the command line, its exit codes and how the process ends.

python -m pipeline.train --config configs/scan_r101_ms1mv2.yaml [--config configs/smoke.yaml] [key=value ...]
torchrun --nproc_per_node 8 -m pipeline.train --config ...      # one node
sbatch jobs/scan_r101.sh [--config ...] [key=value ...]         # Slurm (srun)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_prep.manifest import DataError, read_manifest
from pipeline import distributed
from pipeline.checkpoint.manager import CheckpointWriteError
from pipeline.config import Config, ConfigError, load_config
from pipeline.runlock import FolderLocked
from pipeline.train.guard import TrainingDiverged
from pipeline.train.preempt import install_signal_handlers

# Exit codes of `python -m pipeline.train` (README "Reliability"): 0 the run reached its last step; 2 a
# configuration or data error (one line); 3 diverged (optim.max_nonfinite_steps); 4 stopped by a signal
# before its last step outside Slurm (a checkpoint was written; `train && eval` does not evaluate it).
EXIT_DIVERGED = 3
EXIT_STOPPED = 4
EXIT_CHECKPOINT = 5  # a checkpoint could not be written (disk full, quota, read-only, ...): the previous one is kept


def check_inputs(cfg: Config) -> None:
    """The files a run needs exist (the config's own validity is checked by the config types)."""
    if not cfg.data.train:
        raise ConfigError("data.train: not set (a WebDataset shard directory with manifest.json)")
    read_manifest(cfg.data.train)  # missing / empty shard directory → one-line DataError
    from pipeline.faces.io import read_bin

    for path in cfg.data.val:
        if not Path(path).is_file():
            raise ConfigError(f"data.val: verification file '{path}' does not exist")
        try:  # parsed now (safely: no code runs), not hours later at the first evaluation
            read_bin(path)
        except DataError as exc:
            raise DataError(f"data.val: {exc}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Train any recipe. Example: python -m pipeline.train --config configs/arcface_r50.yaml "
        "--config configs/smoke.yaml data.train=shards/lfw output.dir=runs/try",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", action="append", default=[], metavar="YAML", help="config layer; repeat to stack (later layers win)"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CKPT",
        help="resume from CKPT, or from output.dir's latest checkpoint when no path is given",
    )
    parser.add_argument(
        "--resume-changes",
        nargs="+",
        default=[],
        metavar="KEY",
        help="with --resume: accept these changes that break the checkpoint's run (e.g. seed, optim.name); "
        "without it such a change is refused, naming the key; other changes (lr, schedule, eval sets) are accepted "
        "and printed",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=0.05 data.batch_size=64")
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("at least one --config is required")
    # `--resume-changes seed seed=5`: what has a '=' is an override, not a key
    args.overrides = [k for k in args.resume_changes if "=" in k] + args.overrides
    args.resume_changes = [k for k in args.resume_changes if "=" not in k]
    if args.resume_changes and args.resume is None:
        parser.error("--resume-changes only means something with --resume")
    return args


def main(argv: list[str] | None = None) -> int:
    """Train; return the exit code. Every failure ends in one ``error: …`` line on stderr (an unexpected one after
    its traceback) and a non-zero code; see :func:`exit_now` for how the process then ends without hanging."""
    install_signal_handlers()
    args = parse_args(argv)
    resume = args.resume
    if resume is None and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        resume = "latest"  # requeued by Slurm after preemption: continue where it stopped
    try:
        cfg = load_config(args.config, args.overrides)
        check_inputs(cfg)
        from pipeline.train.trainer import Trainer  # torch, the models and DeepSpeed: after the arguments parse

        trainer = Trainer(cfg, resume=resume, resume_changes=args.resume_changes)
        trainer.fit()
        if trainer.preempted and not os.environ.get("SLURM_JOB_ID"):
            # stopped before its last step: a checkpoint is written, but `train && eval` must not go on
            print(f"[train] exit {EXIT_STOPPED}: stopped before the last step; continue with --resume", flush=True)
            distributed.cleanup()
            return EXIT_STOPPED
    except (ConfigError, DataError, FolderLocked) as exc:
        return _fail(str(exc), 2)
    except TrainingDiverged as exc:
        return _fail(str(exc), EXIT_DIVERGED)
    except CheckpointWriteError as exc:
        return _fail(str(exc), EXIT_CHECKPOINT)
    except KeyboardInterrupt:
        return _fail("interrupted (a second Ctrl-C): no checkpoint written for the current step", 130)
    except Exception as exc:  # a bug or an environment failure: its traceback, then the one line
        import traceback

        traceback.print_exc()
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _fail(f"{type(exc).__name__}: {cause}" if cause else type(exc).__name__, 1)
    distributed.cleanup()
    return 0


def _fail(message: str, code: int) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    where = f"rank {os.environ.get('RANK', '?')}: " if world > 1 else ""
    print(f"error: {where}{message}", file=sys.stderr, flush=True)
    return code


def kill_workers() -> None:
    """Kill this process's multiprocessing children (DataLoader workers, which ignore SIGTERM by design): after an
    error nothing else would end them, and Python's exit handler joins them forever."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()


def exit_now(code: int) -> None:
    """End the process with ``code``. On an error, without Python's exit handlers: they join DataLoader workers
    (which ignore SIGTERM by design) forever and may wait on a dead peer's collective. The workers are killed
    first; torchrun / srun --kill-on-bad-exit then end the run's other ranks."""
    if code in (0, EXIT_STOPPED):
        sys.exit(code)
    kill_workers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
