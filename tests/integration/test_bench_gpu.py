"""python -m benchmarks.bench_gpu: the --cpu-smoke mode runs every part on the CPU and writes every section.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_bench_gpu.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

BENCH = ["-m", "benchmarks.bench_gpu"]  # run from the repository root (cwd=REPO)
ALL_PARTS = ("loader", "train", "levers", "scan", "classifier", "dali")


@pytest.mark.timeout(400)
def test_cpu_smoke_writes_every_section(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, *BENCH, "--cpu-smoke", "--out", str(out), "--parts", ",".join(ALL_PARTS)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((out / "bench_gpu.json").read_text())
    assert (out / "bench_gpu.md").read_text().startswith("# bench_gpu.py")
    for section in ("machine", "flops", *ALL_PARTS):
        assert section in res, section
    assert res["machine"]["cpu_smoke"] is True
    assert not res["errors"], res["errors"]

    # FLOP count of the full-width iresnet100 matches the published figure (2 FLOPs per multiply-add)
    assert abs(res["flops"]["r100_vs_published"] - 1.0) < 0.01

    # loader: DALI (CPU mode here) and the torch loader were both timed
    assert res["loader"]["dali_img_s"] > 0 and res["loader"]["torch_img_s"] > 0

    # training step: both depths, bare loop and the real Trainer, ratio present
    runs = res["train"]["runs"]
    assert {r["depth"] for r in runs} == set(res["machine"]["sizes"]["depths"])
    for r in runs:
        assert r["bare"]["img_s"] > 0
        assert r["trainer_over_bare"] is not None and r["trainer_over_bare"] > 0, r["trainer_note"]

    # every lever (and all together) ran and has a ratio against the default
    variants = res["levers"]["variants"]
    # (channels_last is a CUDA lever: on the CPU its backward can abort torch 2.13, so the bench skips it there)
    assert "channels_last" not in variants
    for name in ("default", "fused_sgd", "cudnn_benchmark", "compile", "all"):
        assert variants[name]["speedup_vs_default"] is not None, (name, variants[name])

    scan = res["scan"]
    assert scan["params_equal"] and scan["train_scan_over_plain"] > 0 and scan["infer_folded_over_plain"] > 0

    rates = {r["sample_rate"] for r in res["classifier"]["runs"]}
    assert rates == {1.0, 0.1}
    for r in res["classifier"]["runs"]:
        assert r["step_s"] > 0 and r["predicted_peak_mib"] > 0
        # the live-tensor peak of a step is the buffer count of BENCHMARKS.md "Scale on paper"
        assert abs(r["peak_over_predicted"] - 1.0) < 0.05, r

    # the DALI part: the knob sweep and the trainer fed by DALI against in-memory batches
    dali = res["dali"]
    assert dali["sweep"] and all(r["img_s"] > 0 for r in dali["sweep"]) and dali["best"] in dali["sweep"]
    assert dali["trainer_fed"].get("fed_over_memory", 0) > 0, dali["trainer_fed"]

    # make gpu-check prints these figures last, in at most 40 lines (scripts/gpu_check/device.py table)
    sys.path.insert(0, str(REPO / "scripts" / "gpu_check"))
    try:
        import device
    finally:
        sys.path.pop(0)
    rows = device.table(out)
    print("\n".join(rows))
    assert 10 <= len(rows) <= 40
    for start in ("train r18 b4: bare", "lever r18 b4 compile", "scan r18: train SCAN/plain", "classifier rate 1.0",
                  "dali best:", "dali: trainer fed by DALI"):  # fmt: skip
        assert any(r.startswith(start) for r in rows), (start, rows)


def test_without_cuda_nothing_measured(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, *BENCH, "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no CUDA: nothing measured (--cpu-smoke runs every part at tiny sizes on the CPU)"
    assert not list(tmp_path.iterdir())
