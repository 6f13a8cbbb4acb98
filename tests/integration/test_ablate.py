"""pipeline.ablate: the example spec (configs/ablations/smoke_scan.yaml: plain vs SCAN, 2 seeds, 4 steps) run end to
end with the real trainer on the real LFW View-1 faces, then cached, resumed, changed, run cell by cell, reported
from disk; the table arithmetic against a hand computation; one-line errors for bad specs.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_ablate.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scipy.stats import t as student_t

from pipeline.checkpoint import load_json
from pipeline.config import load_config, to_dict
from pipeline.experiments import grid as grid_module
from pipeline.experiments.grid import build_grid
from pipeline.experiments.spec import load_spec
from tests.helpers import REPO
from tests.support.ablate import _flat, _one_line_error, ablate, describe, markdown_rows, markdown_table, write_spec


def cell_records(out: Path) -> dict[tuple[str, int], dict]:
    return {(r["arm"], r["seed"]): r for r in map(load_json, out.glob("cells/*/seed_*/cell.json"))}


def train_logs(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.glob("cells/*/seed_*/train.log")}


# --------------------------------------------------------------------------- 1. end to end


def test_spec_to_tables_whose_numbers_are_the_cells(grid):
    report = load_json(grid.out / "results.json")
    md = (grid.out / "results.md").read_text()
    records = cell_records(grid.out)
    assert report["complete"] and report["counts"] == {"ok": 4}
    assert set(records) == {("plain", 0), ("plain", 1), ("scan", 0), ("scan", 1)}
    sets = ["lfw", "lfw_pairs"]
    assert set(report["summary"]["per_arm"]) == {"plain", "scan"}
    for arm in ("plain", "scan"):
        assert set(report["summary"]["per_arm"][arm]) >= set(sets)
    assert set(report["summary"]["paired"]) == {"scan"}  # plain is the reference
    # the .bin and the pairs list are the same 1,000 pairs: the same accuracy
    for r in records.values():
        assert r["status"] == "ok" and 0.4 < r["metrics"]["lfw"]["accuracy"] < 1.0
        assert r["metrics"]["lfw"]["accuracy"] == r["metrics"]["lfw_pairs"]["accuracy"]
        assert set(r["diagnostics"]) >= {"train_loss", "train_loss/cls_main", "embedding_norm"}

    # every raw number in the Cells table is the cell's cell.json
    head, rows = markdown_table(md, "## Cells")
    assert len(rows) == 4
    for row in rows:
        cell = dict(zip(head, row))
        r = records[(cell["arm"], int(cell["seed"]))]
        assert cell["status"] == "ok"
        for s in sets:
            assert cell[s] == f"{100 * r['metrics'][s]['accuracy']:.2f}"
        assert cell["train_loss"] == f"{r['diagnostics']['train_loss']:.4g}"

    # the summary rows: mean ± sd (ddof = 1) over the cells, and the paired difference with its t interval
    acc = {arm: [records[(arm, s)]["metrics"]["lfw"]["accuracy"] for s in (0, 1)] for arm in ("plain", "scan")}
    summary = {row[0]: row for row in markdown_rows(md, "## accuracy (%)")}
    for arm, label in (("plain", "plain (ref)"), ("scan", "scan")):
        want = f"{100 * statistics.mean(acc[arm]):.2f} ± {100 * statistics.stdev(acc[arm]):.2f}"
        assert summary[label][2:4] == ["2", want]
        assert (
            summary[label][1]
            == f"{grid_module.parameter_count(load_config([grid.out / 'cells' / arm / 'seed_0' / 'config.yaml'])):,}"
        )
    diffs = [b - a for a, b in zip(acc["plain"], acc["scan"])]
    half = student_t.ppf(0.975, 1) * statistics.stdev(diffs) / math.sqrt(2)
    mean = statistics.mean(diffs)
    paired = markdown_rows(md, "## Paired difference")[0]
    assert paired[:2] == ["scan", f"{100 * mean:+.2f} [{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}] (n=2)"]

    # the train_loss diagnostic is the trainer's last logged loss (its console line, 4 decimals)
    log = (grid.out / "cells" / "scan" / "seed_1" / "train.log").read_text()
    last = re.findall(r"\[train\] step 4/4 .*?loss ([0-9.]+)", log)[-1]
    assert f"{records[('scan', 1)]['diagnostics']['train_loss']:.4f}" == last
    # progress: cells done / total and an ETA after each cell
    assert "4/4 cells done" in grid.stdout and "ETA" in grid.stdout


# --------------------------------------------------------------------------- 2. the table arithmetic


def test_rerun_skips_finished_cells_and_a_changed_arm_runs_again(grid, shared_data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(grid.out, out)  # the cache is keyed by config, not by where the cells live
    before = train_logs(out)
    proc = ablate(grid.spec, f"data.train={grid.shards}", "--output", out)
    assert proc.returncode == 0, describe(proc)
    assert len(re.findall(r"\(#\d\): cached", proc.stdout)) == 4 and "cells done" not in proc.stdout
    assert train_logs(out) == before  # nothing trained

    def scan_rmo_half(raw):
        raw["arms"][1] = {"name": "scan", "overrides": ["model.conv.rmo_weight=0.5"]}

    changed = write_spec(tmp_path / "changed.yaml", shared_data, scan_rmo_half)
    proc = ablate(changed, f"data.train={grid.shards}", "--output", out)
    assert proc.returncode == 0, describe(proc)
    assert re.findall(r"plain seed \d \(#\d\): cached", proc.stdout) == [
        "plain seed 0 (#0): cached",
        "plain seed 1 (#1): cached",
    ]
    assert len(re.findall(r"scan seed \d \(#\d\): config changed", proc.stdout)) == 2, proc.stdout
    after = train_logs(out)
    for name, mtime in before.items():
        assert (after[name] == mtime) == name.startswith("cells/plain/"), name
    records = cell_records(out)
    assert load_config([out / "cells" / "scan" / "seed_0" / "config.yaml"]).model.conv.rmo_weight == 0.5
    assert records[("scan", 0)]["train_hash"] != load_json(grid.out / "cells/scan/seed_0/cell.json")["train_hash"]
    assert records[("plain", 0)] == load_json(grid.out / "cells/plain/seed_0/cell.json")


def test_an_images_set_reports_tar_at_far_over_all_its_pairs(grid, shared_data, tmp_path):
    """Adding a labelled image set to the spec evaluates the cached cells again (nothing trains); its TAR values
    are those ``python -m pipeline.eval tarfar`` gives for the cell's checkpoint (decoding and embedding the
    files its own way), and the table reports the set's own metric."""
    devtest = shared_data / "lfw_view1_112" / "devtest_112"
    faces = tmp_path / "faces"  # 60 identities of the dev-test images: ~100 images, ~5,000 pairs
    for person in sorted(p for p in devtest.iterdir() if p.is_dir())[:60]:
        shutil.copytree(person, faces / person.name)
    out = tmp_path / "out"
    shutil.copytree(grid.out, out)
    before = train_logs(out)

    def add_images_set(raw):
        raw["eval"].append({"name": "lfw_all", "images": str(faces), "metric": "tar@far=1e-2"})

    spec = write_spec(tmp_path / "images.yaml", shared_data, add_images_set)
    proc = ablate(spec, f"data.train={grid.shards}", "--output", out)
    assert proc.returncode == 0, describe(proc)
    assert len(re.findall(r"\(#\d\): trained; evaluates again", proc.stdout)) == 4, proc.stdout
    assert train_logs(out) == before  # nothing trained
    records = cell_records(out)
    cell = records[("scan", 1)]
    got = cell["metrics"]["lfw_all"]
    assert set(got) == {"tar@far=1e-02", "tar@far=1e-03", "tar@far=1e-04", "genuine_pairs", "impostor_pairs"}
    assert got["impostor_pairs"] < 10_000 and got["tar@far=1e-04"] is None  # 1e-4 needs ≥ 10,000 impostors
    assert cell["metrics"]["lfw"] == load_json(grid.out / "cells/scan/seed_1/cell.json")["metrics"]["lfw"]

    ref_json = tmp_path / "ref.json"
    run_dir = out / "cells" / "scan" / "seed_1" / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.eval", "tarfar", "--checkpoint", str(run_dir), "--images", str(faces),
         "--fars", "1e-2", "1e-3", "--json", str(ref_json), "--device", "cpu", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    ref = json.loads(ref_json.read_text())
    assert (ref["genuine_pairs"], ref["impostor_pairs"]) == (got["genuine_pairs"], got["impostor_pairs"])
    for point in ref["results"][0]["points"]:
        # the same embeddings up to float32 round-off in another batching: the same accepted pairs
        assert got[f"tar@far={point['far']:.0e}"] == pytest.approx(point["tar"], abs=0.5 / got["genuine_pairs"])

    md = (out / "results.md").read_text()
    head, rows = markdown_table(md, "## Cells")
    assert "lfw_all" in head
    row = dict(zip(head, next(r for r in rows if r[1] == "scan" and r[2] == "1")))
    assert row["lfw_all"] == f"{100 * got['tar@far=1e-02']:.2f}"
    head = markdown_table(md, "## accuracy (%)")[0]
    assert "lfw_all (tar@far=1e-02)" in head and "`lfw_all`: tar@far=1e-02 in % over all pairs of its images" in md


# --------------------------------------------------------------------------- 4. identical data order per seed


def _first_batch_keys(cfg) -> list[str]:
    from pipeline.data.loader import build_train_loader

    loader = build_train_loader(cfg.data, 0, 1, cfg.seed, cfg.model.input_size, with_keys=True)
    loader.set_epoch(0)  # what the trainer does before its first epoch
    return list(next(iter(loader))["key"])


def test_same_seed_same_batches_in_every_arm(grid):
    """The cells' resolved configs differ only in the arm's keys (and the output folder), share seed and budget;
    the trainer's own loader built from them yields the same first batch for a seed, another for another seed."""
    cfg = {
        (arm, seed): load_config([grid.out / "cells" / arm / f"seed_{seed}" / "config.yaml"])
        for arm in ("plain", "scan")
        for seed in (0, 1)
    }
    for seed in (0, 1):
        plain, scan = (_flat(to_dict(cfg[(arm, seed)])) for arm in ("plain", "scan"))
        differ = {k for k in plain.keys() | scan.keys() if plain.get(k) != scan.get(k)}
        assert differ and all(k.startswith("model.conv.") or k == "output.dir" for k in differ), differ
        assert plain["seed"] == scan["seed"] == seed and plain["schedule.max_steps"] == scan["schedule.max_steps"] == 4
    first = {key: _first_batch_keys(c) for key, c in cfg.items()}
    assert first[("plain", 0)] == first[("scan", 0)] and first[("plain", 1)] == first[("scan", 1)]
    assert first[("plain", 0)] != first[("plain", 1)]


def test_two_arms_with_the_same_config_and_seed_give_identical_numbers(lfw_shards, shared_data, tmp_path):
    """Determinism: an arm that restates a default (rmo_weight 1.0) trains to the same numbers, bit for bit."""

    def edit(raw):
        raw["arms"] = ["scan", {"name": "scan_again", "overrides": ["model.conv.rmo_weight=1.0"]}]
        raw["seeds"] = [0]
        raw["eval"] = raw["eval"][:1]
        raw["reference"] = "scan"

    spec = write_spec(tmp_path / "same.yaml", shared_data, edit)
    out = tmp_path / "out"
    proc = ablate(spec, f"data.train={lfw_shards}", "--output", out, "--jobs", "2")
    assert proc.returncode == 0, describe(proc)
    cells = cell_records(out)
    a, b = cells[("scan", 0)], cells[("scan_again", 0)]
    assert a["metrics"] == b["metrics"] and a["diagnostics"] == b["diagnostics"], (a, b)


# --------------------------------------------------------------------------- 5. bad specs


def test_bad_specs_are_one_line_errors_naming_the_key_or_file(bad_spec, tmp_path):
    _one_line_error(load_spec, bad_spec(foo=1), match=r"unknown key 'foo' \(known: arms, budget, config")
    msg = _one_line_error(
        load_spec, bad_spec(eval=["/nowhere/lfw_blur2.bin"]), match="'/nowhere/lfw_blur2.bin' does not exist"
    )
    assert "eval[0]" in msg
    _one_line_error(
        load_spec,
        bad_spec(arms=["a", {"name": "b", "overrides": ["schedule.max_steps=100"]}]),
        match=r"arm 'b': override 'schedule.max_steps' sets the budget key schedule.max_steps",
    )
    _one_line_error(
        load_spec,
        bad_spec(arms=["a", {"name": "b", "overides": ["x=1"]}]),
        match=r"arms\[1\] 'b': unknown key 'overides'",
    )
    # the arms' merged configs are validated up front, before anything trains
    spec = load_spec(bad_spec(arms=["a", {"name": "b", "overrides": ["model.conv.sac=true"]}]))
    _one_line_error(build_grid, spec, match=r"arm 'b': overrides: unknown key 'model.conv.sac'")
    layer = tmp_path / "longer.yaml"
    layer.write_text("schedule: {max_steps: 500}\n")
    spec = load_spec(bad_spec(arms=["a", {"name": "b", "config": [str(layer)]}]))
    _one_line_error(build_grid, spec, match=r"arm 'b': its config layers set schedule.max_steps to 500")
    spec = load_spec(bad_spec(arms=["a", {"name": "b", "overrides": ["data.batch_size=8"]}]))
    _one_line_error(build_grid, spec, match=r"arm 'b': data.batch_size is 8 but the reference arm 'a' has 16")

    # an images set: one source per set, a FAR metric in (0, 1); a pair set takes the pair metrics only
    folder = tmp_path / "faces"
    folder.mkdir()
    _one_line_error(
        load_spec, bad_spec(eval=[{"images": str(folder), "bin": str(tmp_path / "set.bin")}]), match="give one of"
    )
    _one_line_error(
        load_spec, bad_spec(eval=[{"images": str(tmp_path / "gone")}]), match=r"eval\[0\].*'.*gone' does not exist"
    )
    _one_line_error(
        load_spec,
        bad_spec(eval=[{"images": str(folder), "metric": "tar@far=2"}]),
        match=r"key 'metric': 'tar@far=2' is not tar@far=F with 0 < F < 1",
    )
    _one_line_error(
        load_spec,
        bad_spec(eval=[{"bin": str(tmp_path / "set.bin"), "metric": "tar@far=1e-3"}]),
        match=r"key 'metric': 'tar@far=1e-3' is not one of accuracy",
    )
    spec = load_spec(bad_spec(eval=[{"images": str(folder), "metric": "tar@far=0.005"}]))
    assert spec.eval[0].metric == "tar@far=5e-03" and spec.eval[0].fars() == (1e-2, 5e-3, 1e-3, 1e-4)
    assert spec.eval[0].name == "faces"

    # the command line: exit 2, one line on stderr naming the key
    proc = ablate(bad_spec(arms=["a", {"name": "b", "overrides": ["model.conv.sac=true"]}]), "--list")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "model.conv.sac" in lines[0], describe(proc)


def test_one_cell_then_report_only_marks_the_missing(lfw_shards, shared_data, tmp_path):
    spec = write_spec(tmp_path / "smoke_scan.yaml", shared_data)
    out = tmp_path / "out"
    proc = ablate(spec, f"data.train={lfw_shards}", "--output", out, "--list")
    assert proc.returncode == 0 and "sbatch --array=0-3" in proc.stdout, describe(proc)
    proc = ablate(spec, "--cell", 2, f"data.train={lfw_shards}", "--output", out)  # Slurm array task 2
    assert proc.returncode == 0, describe(proc)
    assert [p.parent.relative_to(out).as_posix() for p in out.glob("cells/*/*/cell.json")] == ["cells/scan/seed_0"]
    assert not (out / "results.md").exists()  # array tasks write no table

    proc = ablate(spec, "--report-only", f"data.train={lfw_shards}", "--output", out)
    assert proc.returncode == 1, describe(proc)  # incomplete
    report = load_json(out / "results.json")
    assert report["counts"] == {"missing": 3, "ok": 1} and not report["complete"]
    rows = {row[0]: row for row in markdown_rows((out / "results.md").read_text(), "## Cells")}
    assert [rows[i][3] for i in "0123"] == ["**missing**", "**missing**", "ok", "**missing**"]
    acc = load_json(out / "cells/scan/seed_0/cell.json")["metrics"]["lfw"]["accuracy"]
    assert rows["2"][4] == f"{100 * acc:.2f}"


def test_a_failing_cell_is_recorded_and_the_others_go_on(grid, shared_data, tmp_path):
    """An arm whose training exits non-zero (here at start-up: model.init_from names no checkpoint) is recorded as
    failed with its exit code and log; the other cells are there (cached), the table marks it, the exit is 1."""
    out = tmp_path / "out"
    shutil.copytree(grid.out, out)

    def add_broken_arm(raw):
        raw["arms"].append({"name": "broken", "overrides": [f"model.init_from={tmp_path / 'no_such_run'}"]})

    spec = write_spec(tmp_path / "broken.yaml", shared_data, add_broken_arm)
    proc = ablate(spec, f"data.train={grid.shards}", "--output", out, "--jobs", "2")
    assert proc.returncode == 1, describe(proc)
    assert "6/6 cells done" in proc.stdout and "FAILED" in proc.stdout
    for seed in (0, 1):
        record = load_json(out / "cells" / "broken" / f"seed_{seed}" / "cell.json")
        assert record["status"] == "failed" and record["exit_code"] == 2, record
        assert Path(record["log"]).is_file() and "model.init_from" in record["error"]
    report = load_json(out / "results.json")
    assert report["counts"] == {"failed": 2, "ok": 4}
    assert (
        report["summary"]["per_arm"]["scan"]["lfw"]
        == load_json(grid.out / "results.json")["summary"]["per_arm"]["scan"]["lfw"]
    )
    rows = {row[1] + row[2]: row[3] for row in markdown_rows((out / "results.md").read_text(), "## Cells")}
    assert rows["broken0"].startswith("**failed** (exit 2;") and rows["plain0"] == "ok"


def test_a_plugin_module_registers_a_diagnostic(bad_spec, tmp_path):
    """A module named in the config's plugins: registers through @register_diagnostic; `python -m pipeline.ablate`
    must see it (the __main__ module is a second copy of pipeline.ablate)."""
    (tmp_path / "lab_diagnostics.py").write_text(
        "from pipeline.ablate import register_diagnostic\n\n"
        "@register_diagnostic('param_count')\n"
        "def param_count(net, cfg, ctx):\n"
        "    return {'params': float(sum(p.numel() for p in net.parameters()))}\n"
    )
    spec = bad_spec(overrides=["plugins=[lab_diagnostics]", f"data.train={tmp_path}"], diagnostics=["param_count"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    cmd = [sys.executable, "-m", "pipeline.ablate", str(spec), "--list"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    # the diagnostic is known; the next check (data.train holds no shards) is what stops it
    assert proc.returncode == 2 and "manifest" in proc.stderr and "param_count" not in proc.stderr, describe(proc)


def _one_cell_spec(tmp_path: Path, shared_data: Path, steps: int) -> Path:
    def one_cell(raw):
        raw["arms"] = [{"name": "plain", "overrides": ["model.conv=plain"]}]
        raw["seeds"] = [0]
        raw["budget"] = {"schedule.max_steps": steps}
        raw["overrides"] = [*raw["overrides"], "output.log_every=1", "output.checkpoint_every=5"]
        raw["eval"] = raw["eval"][:1]

    return write_spec(tmp_path / "one.yaml", shared_data, one_cell)


def _pids_with(marker: str) -> list[int]:
    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if marker in line and "ps -eo" not in line]


def _wait_for_file_text(path: Path, needle: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{needle!r} never appeared in {path}")


@pytest.mark.slow
def test_a_killed_runner_takes_its_cells_with_it_and_a_rerun_resumes(lfw_shards, shared_data, tmp_path):
    spec = _one_cell_spec(tmp_path, shared_data, steps=20000)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline.ablate", str(spec), f"data.train={lfw_shards}", "--output", str(out)]
    runner = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "cells" / "plain" / "seed_0" / "train.log"
    try:
        _wait_for_file_text(log, "[train] step 6/")
        assert _pids_with(str(out / "cells"))  # the cell process and its trainer
    finally:
        runner.kill()  # kill -9: no handler runs in the runner
        runner.wait()
    deadline = time.time() + 60
    while _pids_with(str(out / "cells")) and time.time() < deadline:
        time.sleep(0.5)
    assert not _pids_with(str(out / "cells")), "a cell outlived its runner"
    assert "SIGTERM" in log.read_text() or "checkpoint" in log.read_text()  # it stopped as on scancel
    # a rerun with a short budget: the cell is not running anywhere, it trains and ends with one status
    short = _one_cell_spec(tmp_path, shared_data, steps=8)
    proc = ablate(short, f"data.train={lfw_shards}", "--output", out)
    assert proc.returncode == 0, describe(proc)
    record = load_json(out / "cells" / "plain" / "seed_0" / "cell.json")
    state = load_json(out / "cells" / "plain" / "seed_0" / "train_state.json")
    assert record["status"] == "ok" and state["status"] == "done"


@pytest.mark.slow
def test_a_rerun_does_not_start_a_cell_another_process_runs(lfw_shards, shared_data, tmp_path):
    spec = _one_cell_spec(tmp_path, shared_data, steps=20000)
    out = tmp_path / "out"
    base = [sys.executable, "-m", "pipeline.ablate", str(spec), f"data.train={lfw_shards}", "--output", str(out)]
    cell = subprocess.Popen(
        [*base, "--cell", "plain@0"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_file_text(out / "cells" / "plain" / "seed_0" / "train.log", "[train] step 2/")
        proc = ablate(spec, f"data.train={lfw_shards}", "--output", out)
        assert proc.returncode == 1, describe(proc)  # incomplete: the cell is not done
        assert "plain seed 0 (#0): running in another process" in proc.stdout, proc.stdout
        assert "**running** (in another process)" in (out / "results.md").read_text()
        assert cell.poll() is None  # untouched
        second = ablate(spec, f"data.train={lfw_shards}", "--output", out, "--cell", "plain@0")
        assert second.returncode == 75 and "another ablation cell is using this folder" in second.stderr
        assert f"pid {cell.pid}" in second.stderr
    finally:
        cell.kill()
        cell.wait()
