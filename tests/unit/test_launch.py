"""pipeline.launch: argument handling, the sbatch file submitit would submit, and a real 2-task
run of the trainer through submitit's local executor on shards of real LFW faces (CPU).

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_launch.py.
"""

from __future__ import annotations

import pytest

from pipeline import launch
from tests.helpers import REPO
from tests.support.launch import SMOKE


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
