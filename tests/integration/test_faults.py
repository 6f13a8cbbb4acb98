"""Fault injection (issue 10): real trainer processes on gloo and the real LFW shards, one scenario per test.

| scenario | expected |
|---|---|
| a fresh run in an output.dir that holds a run | one-line error (exit 2); `output.overwrite=true` starts over |
| pruning with an older run's `step_0000040` beside new `step_0000004` | by step number, the new one kept |
| `latest` naming a missing directory | newest complete checkpoint, with a warning |
| SIGTERM to the process group (DataLoader workers included), 1 process | checkpoint written, exit 4 |
| SIGTERM to torchrun, 2 processes | every rank stops at the same step, checkpoint written |
| SIGINT (Ctrl-C) | checkpoint written, exit 4 |
| `optim.lr=1e6` (NaN from step 3) | steps skipped and counted, exit 3 after 5 in a row, finite checkpoint kept |
| one NaN batch in the middle of a run | that step skipped, training goes on, weights finite |
| `output.log_every=0` and friends | one-line error at start-up |

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_faults.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline import checkpoint as ckpt
from tests.helpers import REPO, env, last_line, train_command
from tests.support.faults import run


def train_cmd(*args, nproc: int = 1):
    """The smoke ArcFace run on an iresnet18 (torchrun with ``nproc`` > 1)."""
    return train_command("model.backbone=iresnet18", *args, nproc=nproc)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_fresh_run_refuses_a_used_output_dir(lfw_shards, tmp_path):
    out = tmp_path / "run"
    args = [f"data.train={lfw_shards}", f"output.dir={out}", "schedule.max_steps=2"]
    assert run(train_cmd(*args)).returncode == 0
    proc = run(train_cmd(*args))
    assert proc.returncode == 2
    line = last_line(proc.stderr)
    assert line.startswith("error: output.dir:") and "already holds a run" in line and "output.overwrite=true" in line
    proc = run(train_cmd(*args, "output.overwrite=true"))
    assert proc.returncode == 0 and "output.overwrite: cleared" in proc.stdout
    assert [p.name for p in ckpt.checkpoints(out / "checkpoints")] == ["step_0000002"]


# --------------------------------------------------------------------------- signals


def _start(cmd) -> subprocess.Popen:
    return subprocess.Popen(
        [str(c) for c in cmd],
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for(proc: subprocess.Popen, needle: str, timeout: float = 300) -> str:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"never saw {needle!r}:\n{''.join(seen)[-3000:]}")


def _stop_run(lfw_shards, tmp_path, sig, nproc=1, to_group=True):
    out = tmp_path / "run"
    proc = _start(
        train_cmd(
            f"data.train={lfw_shards}",
            f"output.dir={out}",
            "schedule.max_steps=400",
            "output.log_every=1",
            "output.checkpoint_every=1000",
            "data.num_workers=2",
            nproc=nproc,
        )
    )
    _wait_for(proc, "step 3/400")
    if to_group:
        os.killpg(proc.pid, sig)  # what scancel / torchrun / a terminal's Ctrl-C do: every process of the run
    else:
        proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=180)
    return proc.returncode, rest, out


@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_and_exits_4(lfw_shards, tmp_path):
    rc, log, out = _stop_run(lfw_shards, tmp_path, signal.SIGTERM)
    assert "killed by signal" not in log, log[-2000:]
    assert rc == 4, log[-2000:]
    assert "stopped by signal" in log and "continue with --resume" in log
    found = ckpt.resolve(out / "checkpoints")
    assert json.loads((found / "trainer.json").read_text())["step"] >= 3


@pytest.mark.slow
def test_sigint_checkpoints_too(lfw_shards, tmp_path):
    rc, log, out = _stop_run(lfw_shards, tmp_path, signal.SIGINT)
    assert rc == 4 and "KeyboardInterrupt" not in log, log[-2000:]
    assert ckpt.checkpoints(out / "checkpoints")


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_one_step(lfw_shards, tmp_path):
    rc, log, out = _stop_run(lfw_shards, tmp_path, signal.SIGTERM, nproc=2, to_group=False)
    assert "killed by signal: Terminated" not in log, log[-2000:]
    found = ckpt.resolve(out / "checkpoints")
    meta = json.loads((found / "trainer.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] >= 3
    assert (found / "deepspeed").is_dir() and (found / "classifier.pt").is_file()


# --------------------------------------------------------------------------- NaN guard


@pytest.mark.slow
def test_divergence_stops_with_one_line_and_keeps_the_finite_checkpoint(lfw_shards, tmp_path):
    out = tmp_path / "run"
    proc = run(
        train_cmd(
            f"data.train={lfw_shards}",
            f"output.dir={out}",
            "optim.lr=1e6",
            "schedule.max_steps=40",
            "output.log_every=1",
            "output.checkpoint_every=2",
            "output.keep_checkpoints=5",
        )
    )
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = last_line(proc.stderr)
    assert line.startswith(
        "error: training diverged: 5 consecutive skipped steps (non-finite loss or BatchNorm statistics)"
    ), line
    assert proc.stdout.count("step skipped") == 5
    kept = ckpt.checkpoints(out / "checkpoints")
    assert kept[0].name == "step_0000002" and kept[-1].name in line
    # the skipped steps left no trace: every later checkpoint holds step 2's weights and BN statistics
    first = torch.load(kept[0] / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in first.values() if v.is_floating_point())
    for later in kept[1:]:
        state = torch.load(later / "model.pt", weights_only=True)
        assert all(torch.equal(state[k], first[k]) for k in first), later.name


@pytest.mark.slow
def test_one_nan_batch_is_skipped_and_training_goes_on(lfw_shards, tmp_path):
    """In-process: good batch, a batch with a NaN pixel, good batch (tests/workers/nan_step_worker.py)."""
    proc = run(
        [sys.executable, str(REPO / "tests" / "workers" / "nan_step_worker.py"), str(lfw_shards), str(tmp_path / "w")]
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["nonfinite_steps"] == 1 and res["steps"] == 3 and res["finite"]
    assert res["changed_by_nan_step"] == 0.0  # the skipped step did not move a weight
    assert res["changed_by_good_step"] > 0


# --------------------------------------------------------------------------- start-up checks


@pytest.mark.slow
def test_corrupt_checkpoint_falls_back_or_is_named(lfw_shards, tmp_path):
    out = tmp_path / "run"
    base = [f"data.train={lfw_shards}", f"output.dir={out}", "output.checkpoint_every=2", "output.keep_checkpoints=3"]
    assert run(train_cmd(*base, "schedule.max_steps=4")).returncode == 0
    root = out / "checkpoints"
    assert (root / "step_0000004" / "checksums.json").is_file()
    cls = root / "step_0000004" / "classifier.pt"
    cls.write_bytes(cls.read_bytes()[:100])  # truncated
    # an explicit checkpoint: one line naming the file
    proc = run(train_cmd(*base, "schedule.max_steps=6", f"--resume={root / 'step_0000004'}"))
    assert proc.returncode == 2
    line = last_line(proc.stderr)
    assert line.startswith("error: --resume: no verifiable checkpoint") and "classifier.pt" in line, line
    # the run's latest: the previous complete checkpoint, with a warning
    proc = run(train_cmd(*base, "schedule.max_steps=6", "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert "skipped step_0000004" in proc.stderr
    (root / "step_0000006" / "trainer.json").write_text("")  # an empty file
    for step in (2, 4):
        (root / ckpt.step_name(step) / "checksums.json").unlink()  # unverifiable
    proc = run(train_cmd(*base, "schedule.max_steps=8", "--resume"))
    assert proc.returncode == 2 and "trainer.json" in last_line(proc.stderr), proc.stderr[-2000:]


# --------------------------------------------------------------------------- chaos


@pytest.mark.slow
def test_chaos_kill_stop_and_signals_end_with_the_uninterrupted_weights(lfw_shards, tmp_path):
    """One 14-step run interrupted at seeded random steps by SIGTERM, kill -9, SIGSTOP/SIGCONT and SIGINT, each
    time resumed with --resume, ends with the weights and class centres of the uninterrupted run."""
    import random

    rng = random.Random(7)
    steps = 14
    base = [
        f"data.train={lfw_shards}",
        f"schedule.max_steps={steps}",
        "output.log_every=1",
        "output.checkpoint_every=2",
        "output.keep_checkpoints=2",
    ]
    ref = tmp_path / "ref"
    assert run(train_cmd(*base, f"output.dir={ref}")).returncode == 0
    out = tmp_path / "chaos"
    events = ["SIGTERM", "KILL", "STOP", "SIGINT"]
    rng.shuffle(events)
    at = sorted(rng.sample(range(3, steps - 1), len(events)))
    log, proc, started, floor = [], None, False, 1
    for event, step in zip(events, at):
        if proc is None:
            done = ckpt.latest_or_none(out / "checkpoints")
            floor = (json.loads((done / "trainer.json").read_text())["step"] if done else 0) + 1
            proc = _start(train_cmd(*base, f"output.dir={out}", *(["--resume"] if started else [])))
            started = True
        # a signal can land a step late under load, and a resume starts after its checkpoint: never wait for a
        # step this process has already passed
        step = max(step, floor)
        if step >= steps:
            break
        _wait_for(proc, f"step {step}/{steps}")
        floor = step + 1
        if event == "STOP":  # a stalled run carries on where it was
            os.killpg(proc.pid, signal.SIGSTOP)
            time.sleep(2)
            os.killpg(proc.pid, signal.SIGCONT)
            log.append((event, step, None))
            continue
        os.killpg(proc.pid, {"SIGTERM": signal.SIGTERM, "KILL": signal.SIGKILL, "SIGINT": signal.SIGINT}[event])
        rest, _ = proc.communicate(timeout=300)
        log.append((event, step, proc.returncode))
        assert proc.returncode in ((-9,) if event == "KILL" else (4, 0)), (event, rest[-2000:])
        proc = None
    if proc is not None:
        rest, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, rest[-2000:]
    else:
        assert run(train_cmd(*base, f"output.dir={out}", "--resume")).returncode == 0
    print("chaos:", log)
    a = ckpt.resolve(ref / "checkpoints")
    b = ckpt.resolve(out / "checkpoints")
    assert a.name == b.name == ckpt.step_name(steps), (a, b, log)
    wa, wb = torch.load(a / "recipe.pt", weights_only=True), torch.load(b / "recipe.pt", weights_only=True)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k} after {log}: {m}")
    ca = torch.load(a / "classifier.pt", weights_only=True)
    cb = torch.load(b / "classifier.pt", weights_only=True)
    torch.testing.assert_close(ca["weight"], cb["weight"], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- hangs end


@pytest.mark.slow
def test_a_stopped_rank_is_named_and_a_killed_rank_ends_the_job(lfw_shards, tmp_path):
    """SIGSTOP on rank 1: rank 0 names it within collective_warn_s; after SIGCONT the run goes on. kill -9 of a
    rank: torchrun ends every rank quickly."""
    import re

    proc = _start(
        train_cmd(
            f"data.train={lfw_shards}",
            f"output.dir={tmp_path / 'a'}",
            "schedule.max_steps=400",
            "output.log_every=1",
            "collective_warn_s=3",
            "data.num_workers=1",
            nproc=2,
        )
    )
    head = _wait_for(proc, "step 3/400")
    pids = subprocess.run(
        ["pgrep", "-f", "-P", str(proc.pid), "pipeline.train"], capture_output=True, text=True
    ).stdout.split()
    assert len(pids) == 2, (pids, head[-1000:])
    # torchrun starts rank 0 first: the higher pid is rank 1
    rank1 = max(int(p) for p in pids)
    os.kill(rank1, signal.SIGSTOP)
    named = _wait_for(proc, "[dist] rank 0", timeout=60)
    assert re.search(r"has waited \d+ s in \w+ at step \d+; behind: rank 1 at step \d+", named), named[-1500:]
    os.kill(rank1, signal.SIGCONT)
    _wait_for(proc, "step 12/400", timeout=120)
    t0 = time.monotonic()
    os.kill(rank1, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.monotonic() - t0 < 60, time.monotonic() - t0


@pytest.mark.slow
def test_a_bad_val_bin_fails_at_start_up(lfw_shards, tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x80\x04not a pickle at all")
    t0 = time.monotonic()
    proc = run(train_cmd(f"data.train={lfw_shards}", f"output.dir={tmp_path / 'r'}", f"data.val=[{bad}]"))
    assert proc.returncode == 2 and time.monotonic() - t0 < 60
    line = last_line(proc.stderr)
    assert line.startswith("error: data.val:") and "bad.bin" in line, line
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.slow
def test_too_many_bad_samples_stop_the_run_in_one_line(lfw_shards, tmp_path):
    """A manifest claiming 60 classes for 111: ~half the samples carry a label the classifier cannot have."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(lfw_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["num_classes"] = 60
    (shards / "manifest.json").write_text(json.dumps(manifest))
    proc = run(
        train_cmd(f"data.train={shards}", f"output.dir={tmp_path / 'r'}", "schedule.max_steps=8", "output.log_every=2")
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = last_line(proc.stderr)
    assert line.startswith("error: data.train:") and "data.max_bad_fraction=0.01" in line, line
    # and a tolerant setting lets it run, with the counts printed at the end
    proc = run(
        train_cmd(
            f"data.train={shards}", f"output.dir={tmp_path / 'r2'}", "schedule.max_steps=4", "data.max_bad_fraction=0.9"
        )
    )
    assert proc.returncode == 0 and "corrupt samples and 0 corrupt shards skipped" in proc.stdout
