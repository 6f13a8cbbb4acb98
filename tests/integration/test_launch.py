"""pipeline.launch: argument handling, the sbatch file submitit would submit, and a real 2-task
run of the trainer through submitit's local executor on shards of real LFW faces (CPU).

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_launch.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline import launch
from tests.helpers import REPO
from tests.support.launch import SMOKE


@pytest.mark.slurm
def test_slurm_submission_file(tmp_path):
    """What `--executor slurm` hands to sbatch: one task per GPU, requeue, preemption signal, srun CPUs.
    submitit's Slurm executor needs `srun` on the machine: the real Slurm client, installed here when
    missing (on a fresh machine this test runs before test_slurm.py's cluster fixture would install it)."""
    from tests.cluster.slurm_cluster import install

    install()
    args = launch.parse_args(
        SMOKE
        + [
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--cpus-per-task",
            "6",
            "--time",
            "90",
            "--partition",
            "gpu",
            "--slurm-arg",
            "account=vision",
            "--folder",
            str(tmp_path),
        ]
    )
    executor, tasks = launch.build_executor(args)
    assert tasks == 8
    text = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --time=90",
        "#SBATCH --partition=gpu",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --account=vision",
    ):
        assert line in text.splitlines(), f"{line!r} not in:\n{text}"
    assert "--cpus-per-task=6" in [w for ln in text.splitlines() if ln.startswith("srun") for w in ln.split()]


@pytest.mark.timeout(600)
def test_local_executor_two_tasks_real_trainer(lfw_shards, tmp_path):
    run, folder = tmp_path / "run", tmp_path / "submitit"
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    # The smoke layer cut to 4 steps: this test is about the launcher, not the training.
    cmd = [
        sys.executable,
        "-m",
        "pipeline.launch",
        *SMOKE,
        f"data.train={lfw_shards}",
        f"output.dir={run}",
        "schedule.max_steps=4",
        "output.log_every=2",
        "--executor",
        "local",
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "2",
        "--cpus-per-task",
        "1",
        "--time",
        "20",
        "--folder",
        str(folder),
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=560)
    logs = "\n".join(
        f"--- {p}\n{p.read_text(errors='replace')[-4000:]}"
        for p in sorted(folder.rglob("*.out")) + sorted(folder.rglob("*.err"))
    )
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{logs}"
    assert "world 2" in r.stdout and "finished" in r.stdout, r.stdout
    assert "world=2" in logs, logs  # the trainer saw both tasks
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "model.pt").is_file() and (ckpts[-1] / "config.yaml").is_file(), logs
