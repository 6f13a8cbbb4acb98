"""What several test modules share: the repository root, the trainer's command lines, one subprocess runner, and
the small config every in-process model test builds. Fixtures live in tests/conftest.py (one of each name)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# every smoke run: the ArcFace recipe shrunk by configs/smoke.yaml (a tiny iresnet, 16-face batches, CPU)
SMOKE = ["--config", str(CONFIGS / "arcface_r50.yaml"), "--config", str(CONFIGS / "smoke.yaml")]


def env(**extra: str) -> dict[str, str]:
    """The environment of a child process: one OpenMP thread each (two cores are shared by every child), output
    unbuffered (tests read a running trainer's lines as they come)."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def train_command(*args, configs: list[str] | None = None, nproc: int = 1) -> list[str]:
    """``python -m pipeline.train`` on the smoke ArcFace recipe (or ``configs``, each a --config; ``[]``: none) +
    ``args``; with ``nproc`` > 1 under torchrun (``--standalone``) with that many ranks."""
    layers = SMOKE if configs is None else [x for c in configs for x in ("--config", str(c))]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return [sys.executable, *launcher, "-m", "pipeline.train", *layers, *map(str, args)]


def run(cmd, timeout: float = 600, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repository root; with ``check`` a non-zero exit fails the test with both outputs' tails."""
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=REPO, env=env(**extra_env), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


@contextlib.contextmanager
def restore_environ():
    """Put ``os.environ`` back as it was (e.g. after an in-process ``distributed.init`` exported RANK, MASTER_PORT…)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
