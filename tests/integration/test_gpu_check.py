"""CPU rehearsal of `make gpu-stage` / receive.sh / `make gpu-check` (docs/gpu-check.md).

Offline, with small hand-made wheels: split into parts, receive each part from a fresh "device work
tree" into an outside folder, reassemble, sha256 checks (a corrupt or missing part gives one line),
`pip install --no-index --no-deps --target`, the namespace fix for `nvidia/`, the fallback wheels
(`if_image_lacks`), the whole gpu_check.sh orchestration (GPU_CHECK_ALLOW_CPU=1, timeouts), the
fast one-line failure without CUDA, and the length of every device command.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_gpu_check.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO
from tests.support.gpu_check import GC, device, receive, stage


def receive_all(st, man, outside, tmp_path):
    for i, part in enumerate(man["parts"]):
        r = receive(st, part, outside, tmp_path)
        assert r.returncode == 0, r.stderr
        if i < len(man["parts"]) - 1:
            assert f"{i + 1}/{man['n_parts']} parts here" in r.stdout
        else:
            assert f"all {man['n_parts']} parts here" in r.stdout


def run_device(*args, env_extra=None, timeout=120):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(GC / "device.py"), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_receive_assemble_install(staged, image_site, tmp_path):
    st, man, _ = staged
    outside, target = tmp_path / "outside", tmp_path / "site"
    receive_all(st, man, outside, tmp_path)
    env = {"PYTHONPATH": str(image_site)}  # the image's site-packages is on this python's path
    r = run_device("install", "--stage", str(outside), "--target", str(target), env_extra=env)
    assert r.returncode == 0, r.stderr
    line = one_line(r.stdout)
    assert "installed into" in line and "tooold 2.0" in line and "namespace folders made shared: nvidia" in line
    # newenough: the image's 1.5 satisfies >=1.0, so the fallback wheel is not installed
    assert not (target / "newenough.py").exists() and (target / "tooold.py").exists()
    assert (target / "nvidia" / "__init__.py").read_text() == device.NAMESPACE_INIT
    # the target in front, the image behind: both nvidia.* portions import, the carried ones win
    code = (
        "import tinya, bigdali, nvidia.fakelib, nvidia.imagelib, newenough, tooold;"
        "print(tinya.VALUE, nvidia.fakelib.NAME, nvidia.imagelib.NAME, newenough.WHO, tooold.WHO)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": f"{target}:{image_site}"},
        capture_output=True,
        text=True,
    )
    assert out.stdout.split() == ["1", "fakelib", "imagelib", "image", "carried"], out.stderr
    r = run_device("install", "--stage", str(outside), "--target", str(target), env_extra=env)
    assert r.returncode == 0 and "already installed" in r.stdout


def test_corrupt_part_is_caught_at_receive(staged, tmp_path):
    st, man, _ = staged
    part = man["parts"][1]
    chunk = next((st / part).glob("*.whl.*"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    r = receive(st, part, tmp_path / "outside", tmp_path)
    assert r.returncode == 4
    line = one_line(r.stderr)
    assert part in line and "corrupt" in line and chunk.name in line
    # a call that forgot to carry its part
    r = subprocess.run(["bash", str(GC / "receive.sh"), "part_01"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 3 and "carry" in one_line(r.stderr)


def test_corrupt_and_missing_are_one_line_naming_the_wheel(staged, tmp_path):
    st, man, _ = staged
    outside = tmp_path / "outside"
    receive_all(st, man, outside, tmp_path)
    big = next(w for w in man["wheels"] if w["name"] == "bigdali")
    # corrupt: flip one byte of a chunk after it arrived
    c = big["chunks"][1]
    data = bytearray((outside / c["file"]).read_bytes())
    data[0] ^= 1
    (outside / c["file"]).write_bytes(bytes(data))
    r = run_device("assemble", "--stage", str(outside))
    assert r.returncode == 3
    line = one_line(r.stderr)
    assert big["file"] in line and "corrupt" in line and c["part"] in line
    # missing: a part holding only bigdali chunks never arrived
    (outside / c["file"]).unlink()
    r = run_device("assemble", "--stage", str(outside))
    assert r.returncode == 3
    line = one_line(r.stderr)
    assert f"{big['file']} missing ({c['part']} not received)" in line and "GPU_CHECK_WITHOUT=dali" in line
    # the operator may go on without that group
    r = run_device("assemble", "--stage", str(outside), "--without", "dali")
    assert r.returncode == 0, r.stderr
    # nothing received at all (a fresh machine)
    r = run_device("assemble", "--stage", str(tmp_path / "nothing"))
    assert r.returncode == 3 and "no part was received" in one_line(r.stderr)


def test_device_commands_fit(staged, tmp_path):
    st, man, _ = staged
    many = dict(man, parts=[f"part_{i:02d}" for i in range(60)], n_parts=60)
    for m in (man, many):
        calls = stage.device_calls(m)
        assert len(calls) == m["n_parts"]
        for c in calls:
            assert len(c["command"]) < stage.COMMAND_LIMIT
            assert len(c["carry"]) <= 8 and all(len(p) <= 200 for p in c["carry"])
            assert 1 <= c["timeout_s"] <= 600
        # call 1: the core phase with the faces; the middle calls do a queued task; the last the DALI phase
        assert [c["phase"] for c in calls] == ["core"] + ["more"] * (len(calls) - 2) + ["dali"]
        assert calls[0]["command"].endswith("GPU_CHECK_PHASE=core bash scripts/gpu_check/gpu_check.sh")
        assert calls[0]["carry"] == [".gpu_stage/part_00", ".gpu_stage/shared"]
        assert calls[-1]["command"].endswith("GPU_CHECK_PHASE=dali bash scripts/gpu_check/gpu_check.sh")
        assert calls[0]["timeout_s"] >= 360 + 30 and calls[-1]["timeout_s"] >= 300 + 30
    r = subprocess.run(
        [sys.executable, str(GC / "stage.py"), "--print-commands", "--stage-dir", str(st)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    printed = [ln for ln in r.stdout.splitlines() if "run(command=" in ln]
    assert len(printed) == man["n_parts"]
    for ln in printed:
        assert len(json.loads(ln.split("command=", 1)[1].split(", carry=")[0])) < stage.COMMAND_LIMIT
    # the carried folder is ignored by git, so it travels only when a call names it
    assert subprocess.run(["git", "check-ignore", "-q", ".gpu_stage/part_00"], cwd=REPO).returncode == 0


def _no_gpu_path(tmp_path: Path) -> str:
    """PATH with a failing nvidia-smi first, so the test means the same on any machine."""
    fake = tmp_path / "fakebin"
    fake.mkdir(exist_ok=True)
    (fake / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    (fake / "nvidia-smi").chmod(0o755)
    return f"{fake}:{os.environ['PATH']}"


def test_gpu_check_fails_fast_without_cuda(tmp_path):
    env = {**os.environ, "PATH": _no_gpu_path(tmp_path), "OUT": str(tmp_path / "out")}
    env.pop("GPU_CHECK_ALLOW_CPU", None)
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(GC / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stdout == ""
    assert "no CUDA GPU here" in one_line(r.stderr)
    r = subprocess.run(["make", "-s", "gpu-check"], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and r.stderr.splitlines()[0].startswith("gpu-check: no CUDA GPU here")
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "out").exists()


def test_gpu_check_orchestration_rehearsed_on_cpu(staged, image_site, tmp_path):
    """The whole gpu_check.sh with GPU_CHECK_ALLOW_CPU=1: install, probe, pytest, bench, summary;
    then again with a bench that overruns its time limit."""
    st, man, _ = staged
    outside, site, out = tmp_path / "outside", tmp_path / "site", tmp_path / "out"
    receive_all(st, man, outside, tmp_path)
    tdir = tmp_path / "gputests"
    tdir.mkdir()
    (tdir / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    (tdir / "test_fake_gpu.py").write_text(
        "import pytest\n\n@pytest.mark.gpu\ndef test_installed():\n    import tinya, nvidia.fakelib\n"
        "    assert tinya.VALUE == 1\n"
    )
    bench = tmp_path / "bench_fake.py"
    bench.write_text(
        "import sys, json, time, pathlib\nout = pathlib.Path(sys.argv[sys.argv.index('--out') + 1])\n"
        "time.sleep(float(__import__('os').environ.get('FAKE_BENCH_SLEEP', '0')))\n"
        "(out / 'bench_gpu.json').write_text(json.dumps({'argv': sys.argv[1:]}))\nprint('bench done')\n"
    )
    bench_eval = tmp_path / "bench_eval_fake.py"
    bench_eval.write_text(
        "import sys, json, pathlib\npathlib.Path(sys.argv[sys.argv.index('--json') + 1]).write_text("
        "json.dumps({'argv': sys.argv[1:]}))\nprint('bench_eval done')\n"
    )
    env = {
        **os.environ,
        "GPU_CHECK_ALLOW_CPU": "1",
        "GPU_CHECK_PYTHON": sys.executable,
        "LOWQ_GPU_STAGE": str(outside),
        "LOWQ_GPU_SITE": str(site),
        "OUT": str(out),
        "PYTHONPATH": str(image_site),
        "GPU_CHECK_IMPORTS": "tinya",
        "GPU_CHECK_PYTEST_ARGS": f"-m gpu -q -p no:cacheprovider -c {tdir / 'pytest.ini'} {tdir}",
        "GPU_CHECK_BENCH": str(bench),
        "GPU_CHECK_BENCH_ARGS": "--parts train,scan",
        "GPU_CHECK_BENCH_EVAL": str(bench_eval),
        "GPU_CHECK_BENCH_EVAL_ARGS": "--images 64",
        "GPU_CHECK_WITHOUT": "",  # this rehearsal installs every group in call 1 (its fake test imports them)
    }
    # call 1 (core): the bench first (the figures that matter), then the training tests; a table printed last
    r = subprocess.run(["bash", str(GC / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=240)
    print(r.stdout, r.stderr)  # shown when the test fails
    assert r.returncode == 0, r.stdout + r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu-check: PASS") and "install:rc=0" in last and "tests:rc=0" in last
    assert "bench:rc=0" in last
    summary = json.loads((out / "summary.json").read_text())
    assert summary["result"] == "PASS" and [s["step"] for s in summary["steps"]] == [
        "install",
        "probe",
        "bench",
        "tests",
    ]
    assert summary["env"]["imports"]["tinya"].startswith("ok")
    assert sorted(p.name for p in out.iterdir()) == [
        "bench_gpu.json",
        "bench_gpu.log",
        "gpu_check.log",
        "pytest_gpu.log",
        "summary.json",
    ]
    assert "1 passed" in (out / "pytest_gpu.log").read_text()
    assert json.loads((out / "bench_gpu.json").read_text())["argv"] == ["--out", str(out), "--parts", "train,scan"]
    assert "bench done" in (out / "bench_gpu.log").read_text()
    assert "WARNING" not in r.stdout  # everything in $OUT comes back
    assert (outside / "more_todo").read_text().split() == [
        "bench_eval",
        "tests_rest",
        "bench_again",
        "classifier_rates",
    ]

    # call 2 (more): a DALI part arrives and one queued task runs (bench_eval), no install, no probe
    shutil.rmtree(out)
    r = subprocess.run(
        ["bash", str(GC / "gpu_check.sh")], env={**env, "GPU_CHECK_PHASE": "more"}, capture_output=True, text=True
    )
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["bench_eval"]
    assert json.loads((out / "bench_eval.json").read_text())["argv"] == [
        "--json",
        str(out / "bench_eval.json"),
        "--images",
        "64",
    ]
    assert (outside / "more_todo").read_text().split() == ["tests_rest", "bench_again", "classifier_rates"]

    # second run on the "warm machine": install is skipped, the bench overruns its 3 s and is killed
    env.update(FAKE_BENCH_SLEEP="60", GPU_CHECK_BENCH_S="3")
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(GC / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=240)
    print(r.stdout, r.stderr)
    assert time.monotonic() - t0 < 120
    assert r.returncode == 1
    assert "already installed" in r.stdout and "bench: TIMED OUT after 3 s" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    bench_step = next(s for s in summary["steps"] if s["step"] == "bench")
    assert summary["result"] == "FAIL" and bench_step["rc"] in (124, 137)
