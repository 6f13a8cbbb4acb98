"""Runs that survive, round 2 (issue 22): one run per folder (a lock that names its holder), resumes that name what
changed, config ranges with the types.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_runs_round2.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pipeline.runlock import FolderLock, FolderLocked, is_locked
from tests.helpers import REPO, env, train_command
from tests.support.runs_round2 import R18, train


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# --------------------------------------------------------------------------- 2. one run per folder


def test_the_folder_lock_excludes_a_second_holder_and_dies_with_its_process(tmp_path):
    lock = FolderLock(tmp_path / "run", "training run").acquire()
    assert lock.held and is_locked(tmp_path / "run").startswith("host ")
    with pytest.raises(FolderLocked) as err:
        FolderLock(tmp_path / "run", "training run").acquire()
    msg = str(err.value)
    assert "\n" not in msg and f"pid {os.getpid()}" in msg and "started 20" in msg and str(tmp_path / "run") in msg
    lock.release()
    assert is_locked(tmp_path / "run") is None
    # a holder killed with -9 leaves the lock file but not the lock: the folder is free again at once
    child = subprocess.Popen(
        [sys.executable, "-c", f"from pipeline.runlock import FolderLock; import time; "
         f"FolderLock({str(tmp_path / 'k')!r}).acquire(); print('held', flush=True); time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout.readline().strip() == "held"
    assert f"pid {child.pid}" in is_locked(tmp_path / "k")
    child.kill()
    child.wait()
    assert is_locked(tmp_path / "k") is None
    FolderLock(tmp_path / "k").acquire().release()


@pytest.mark.slow
def test_two_trainers_into_one_folder_the_second_refuses_naming_the_first(lfw_shards, tmp_path):
    out = tmp_path / "run"
    args = [f"data.train={lfw_shards}", f"output.dir={out}", "schedule.max_steps=40", "output.log_every=1"]
    first = subprocess.Popen(
        train_command(R18, *args), cwd=REPO, env=env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for line in first.stdout:  # the first holds the folder once it trains
            if "[train] step 1/" in line:
                break
        t0 = time.time()
        second = train(*args)
        assert second.returncode == 2, second.stderr[-2000:]
        line = last_line(second.stderr)
        assert line.startswith("error: output.dir: ") and "another training run is using this folder" in line
        assert f"pid {first.pid}" in line and "host " in line and "started " in line
        assert time.time() - t0 < 120
    finally:
        first.kill()
        first.wait()
    # killed -9: its own resume is not blocked
    proc = train(*args, "schedule.max_steps=2", "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------- 4. resume names what changed


@pytest.mark.slow
def test_resume_refuses_breaking_changes_and_records_accepted_ones(lfw_shards, tmp_path):
    out = tmp_path / "run"
    base = [f"data.train={lfw_shards}", f"output.dir={out}", "schedule.max_steps=2", "output.checkpoint_every=2"]
    assert train(*base).returncode == 0
    for change, key in (
        ("optim.name=adamw", "optim.name"),
        ("seed=5", "seed"),
        ("model.head.embedding_size=32", "model.head.embedding_size"),
    ):
        proc = train(*base, "schedule.max_steps=4", change, "--resume")
        assert proc.returncode == 2, (change, proc.stderr[-1500:])
        line = last_line(proc.stderr)
        assert line.startswith(f"error: --resume: {key} is ") and "was trained with" in line, line
        assert "Traceback" not in proc.stderr
    proc = train(*base, "schedule.max_steps=4", "optim.lr=0.05", "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("--resume: optim.lr changed from 0.1 to 0.05") == 1
    assert "--resume: schedule.max_steps changed from 2 to 4" in proc.stdout
    record = [json.loads(x) for x in (out / "resume_changes.jsonl").read_text().splitlines()]
    assert record[-1]["changes"]["optim.lr"] == [0.1, 0.05]
    # accepted explicitly: the seed may change when the user says so
    proc = train(*base, "schedule.max_steps=6", "optim.lr=0.05", "--resume", "--resume-changes", "seed", "seed=5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--resume: seed changed from 0 to 5" in proc.stdout
