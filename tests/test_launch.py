"""pipeline.launch: argument handling, the sbatch file submitit would submit, and a real 2-task
run of the trainer through submitit's local executor on shards of real LFW faces (CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import launch

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--config", "configs/arcface_r50.yaml", "--config", "configs/smoke.yaml"]


def test_intermixed_arguments(monkeypatch):
    monkeypatch.chdir(REPO)
    a = launch.parse_args(
        [
            "--config",
            "configs/arcface_r50.yaml",
            "optim.lr=0.05",
            "--nodes",
            "2",
            "--config",
            "configs/smoke.yaml",
            "data.train=/d",
            "--gpus-per-node",
            "4",
        ]
    )
    assert a.config == ["configs/arcface_r50.yaml", "configs/smoke.yaml"]
    assert a.overrides == ["optim.lr=0.05", "data.train=/d"] and (a.nodes, a.gpus_per_node) == (2, 4)
    # Config paths are made absolute (the job may start elsewhere); overrides keep their order.
    assert launch.train_argv(a) == [
        "--config",
        str(REPO / "configs/arcface_r50.yaml"),
        "--config",
        str(REPO / "configs/smoke.yaml"),
        "optim.lr=0.05",
        "data.train=/d",
    ]


def test_port_rule_matches_job_scripts():
    # jobs/_common.sh: MASTER_PORT=$((10000 + SLURM_JOB_ID % 50000))
    assert launch._port_from_job_id("123") == 10123
    assert launch._port_from_job_id("50007") == 10007
    assert launch._port_from_job_id("4242_3") == 10000 + 42423 % 50000  # array job ids


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--executor", "local", "--nodes", "2"], "--nodes: the local executor runs on this machine only"),
        (["--executor", "debug", "--tasks-per-node", "2"], "--tasks-per-node: the debug executor runs one task"),
        (["--gpus-per-node", "-1"], "--gpus-per-node: must be >= 0"),
        (["--slurm-arg", "account"], "--slurm-arg: expected KEY=VALUE, got 'account'"),
    ],
)
def test_bad_arguments_one_line_error(tmp_path, capsys, extra, message):
    rc = launch.main(SMOKE + ["--folder", str(tmp_path), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_missing_config(capsys, tmp_path):
    assert launch.main(["--config", str(tmp_path / "nope.yaml"), "--executor", "local"]) == 2
    assert "error: --config: " in capsys.readouterr().err


@pytest.mark.slurm
def test_slurm_submission_file(tmp_path):
    """What `--executor slurm` hands to sbatch: one task per GPU, requeue, preemption signal, srun CPUs.
    submitit's Slurm executor needs `srun` on the machine: the real Slurm client, installed here when
    missing (on a fresh machine this test runs before test_slurm.py's cluster fixture would install it)."""
    from slurm_cluster import install

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
