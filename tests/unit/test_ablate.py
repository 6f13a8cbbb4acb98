"""pipeline.ablate: the example spec (configs/ablations/smoke_scan.yaml: plain vs SCAN, 2 seeds, 4 steps) run end to
end with the real trainer on the real LFW View-1 faces, then cached, resumed, changed, run cell by cell, reported
from disk; the table arithmetic against a hand computation; one-line errors for bad specs.

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_ablate.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from scipy.stats import t as student_t

from pipeline.config import load_config
from pipeline.experiments import grid as grid_module
from pipeline.experiments import runner, stats
from pipeline.experiments.cli import find_cell
from pipeline.experiments.grid import build_grid
from pipeline.experiments.render import render_markdown
from pipeline.experiments.spec import SpecError, load_spec
from pipeline.experiments.stats import build_report, summarize
from pipeline.models.network import build_network
from tests.helpers import REPO
from tests.support.ablate import _one_line_error, markdown_rows


def report_spec(tmp_path: Path, arms: list[str]):
    """A 3-seed spec over base.yaml with one eval set, for report tests that make up the cells' records."""
    dummy_bin = tmp_path / "set.bin"
    dummy_bin.write_bytes(b"")  # the spec checks that eval files exist; nothing reads it here
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "config": [str(REPO / "configs" / "base.yaml")],
                "arms": arms,
                "seeds": [0, 1, 2],
                "budget": {"schedule.max_steps": 3},
                "eval": [{"name": "lfw", "bin": str(dummy_bin)}],
            }
        )
    )
    return load_spec(spec_path)


# --------------------------------------------------------------------------- 1. end to end


def test_aggregation_against_a_hand_computation(tmp_path):
    acc = {"ref": [0.90, 0.92, 0.91], "new": [0.93, 0.96, 0.92]}
    values = {arm: {seed: {"lfw": v} for seed, v in enumerate(vs)} for arm, vs in acc.items()}
    values["one"] = {0: {"lfw": 0.5}}  # a single seed: mean only, no sd, no interval
    out = summarize(values, ["ref", "new", "one"], "ref")

    for arm, vs in acc.items():
        got = out["per_arm"][arm]["lfw"]
        assert got["n"] == 3
        assert got["mean"] == pytest.approx(sum(vs) / 3, abs=1e-12)
        assert got["sd"] == pytest.approx(math.sqrt(sum((v - sum(vs) / 3) ** 2 for v in vs) / 2), abs=1e-12)
    diffs = [0.03, 0.04, 0.01]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = student_t.ppf(0.975, 2) * sd / math.sqrt(3)  # 4.303 × sd / √3
    paired = out["paired"]["new"]["lfw"]
    assert paired["n"] == 3 and paired["mean"] == pytest.approx(mean, abs=1e-12)
    assert paired["sd"] == pytest.approx(sd, abs=1e-12)
    assert paired["ci95"] == pytest.approx([mean - half, mean + half], abs=1e-12)
    assert out["per_arm"]["one"]["lfw"]["sd"] is None and out["paired"]["one"]["lfw"]["ci95"] is None
    assert "ref" not in out["paired"]

    # the same through the report and its Markdown, with a failed and a missing cell beside them
    spec = report_spec(tmp_path, ["ref", "new", "one"])
    records = [
        {"index": 3 * a + s, "arm": arm, "seed": s, "status": "ok", "metrics": {"lfw": {"accuracy": v}}}
        for a, (arm, vs) in enumerate(acc.items())
        for s, v in enumerate(vs)
    ]
    records += [
        {"index": 6, "arm": "one", "seed": 0, "status": "ok", "metrics": {"lfw": {"accuracy": 0.5}}},
        {"index": 7, "arm": "one", "seed": 1, "status": "failed", "exit_code": 3, "log": "x/train.log"},
        {"index": 8, "arm": "one", "seed": 2, "status": "missing"},
    ]
    report = build_report(spec, records)
    assert report["summary"]["paired"]["new"]["lfw"]["ci95"] == pytest.approx([mean - half, mean + half])
    assert not report["complete"] and report["counts"] == {"failed": 1, "missing": 1, "ok": 7}
    md = render_markdown(spec, report)
    paired = {row[0]: row[1] for row in markdown_rows(md, "## Paired difference")}
    assert paired["new"] == f"{100 * mean:+.2f} [{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}] (n=3)"
    assert paired["one"] == "-40.00 [n/a] (n=1)"
    states = {row[0]: row[3] for row in markdown_rows(md, "## Cells")}
    assert states["7"] == "**failed** (exit 3; x/train.log)" and states["8"] == "**missing**"
    assert "**Incomplete: 1 failed, 1 missing** of 9 cells" in md


# --------------------------------------------------------------------------- 3. resume


def test_runner_names_cells_by_arm_and_seed_so_spec_edits_cannot_swap_them(bad_spec, lfw_shards, tmp_path):
    """The runner's subprocesses re-read the spec: an arm or seed added meanwhile shifts every index after it.
    Addressed as ARM@SEED, each subprocess still trains the cell it was started for."""
    data = {"overrides": [f"data.train={lfw_shards}"]}
    out = str(tmp_path / "out")
    before = build_grid(load_spec(bad_spec(**data), output=out))
    commands = {c.key: runner.cell_command(load_spec(bad_spec(**data), output=out), c) for c in before}
    arms = ["a", "z", {"name": "b", "overrides": ["optim.lr=0.05"]}]
    after = build_grid(load_spec(bad_spec(arms=arms, seeds=[0, 1, 2], **data), output=out))
    assert [c.key for c in before] == ["a@0", "a@1", "b@0", "b@1"]
    for cell in before:
        which = commands[cell.key][commands[cell.key].index("--cell") + 1]
        found = find_cell(after, which)
        assert (found.arm, found.seed, found.train_hash) == (cell.arm, cell.seed, cell.train_hash)
    assert [after[c.index].key for c in before] == ["a@0", "a@1", "a@2", "z@0"]  # what the indices would have run
    assert find_cell(after, "3").key == "z@0"  # Slurm array tasks still address by index
    _one_line_error(find_cell, after, "c@0", match=r"--cell c@0: no arm 'c' with seed 0")
    _one_line_error(find_cell, after, "b@7", match=r"no arm 'b' with seed 7")
    _one_line_error(find_cell, after, "9", match=r"the grid has 9 cells \(0-8\)")
    _one_line_error(find_cell, after, "b", match=r"give a cell index or ARM@SEED")
    # a cell finished under the old grid is reported at its place in the new one (the report's "#" column)
    b0 = next(c for c in before if c.key == "b@0")
    b0.dir.mkdir(parents=True)
    record = {"index": b0.index, "arm": "b", "seed": 0, "status": "ok", "metrics": {}}
    (b0.dir / "cell.json").write_text(json.dumps({**record, "train_hash": b0.train_hash, "eval_hash": b0.eval_hash}))
    got = [r for r in stats.collect_records(after) if r["status"] == "ok"]
    assert [(r["arm"], r["seed"], r["index"]) for r in got] == [("b", 0, 6)] and b0.index == 2
    # a subprocess that ran an edited config: the runner says so and keeps that cell.json (valid for the new spec)
    stale = {**record, "train_hash": "0" * 16, "eval_hash": b0.eval_hash}
    (b0.dir / "cell.json").write_text(json.dumps(stale))
    grid_runner = runner.GridRunner(load_spec(bad_spec(**data), output=out), before, runner.Plan(1, 1))
    said = grid_runner._record_of(b0, 0, b0.dir / "cell.log")
    assert said["status"] == "failed" and "changed while the cell ran" in said["error"]
    assert json.loads((b0.dir / "cell.json").read_text()) == stale


# --------------------------------------------------------------------------- 6. --cell, --report-only, failures


def test_cells_share_the_cores_and_each_gets_its_own_gpus(bad_spec, monkeypatch):
    """No GPU here: the visible GPUs are faked; what is checked is the split of cores and devices among cells."""

    spec = load_spec(bad_spec(processes=8, nproc=2))
    cells = [SimpleNamespace(config=SimpleNamespace(device="auto"))] * 6
    monkeypatch.setattr(runner, "_visible_gpus", lambda: [])
    plan = runner.plan_resources(spec, cells, None, cells_to_run=6)
    assert (plan.jobs, plan.threads, plan.gpu_sets) == (4, 1, ())  # 8 cores / 2 processes per cell
    assert runner.plan_resources(spec, cells, 2, cells_to_run=6).threads == 2
    monkeypatch.setattr(runner, "_visible_gpus", lambda: ["0", "1", "2", "3"])
    plan = runner.plan_resources(spec, cells, None, cells_to_run=6)
    assert (plan.jobs, plan.gpu_sets) == (2, ("0,1", "2,3"))  # 4 GPUs / 2 per cell
    assert runner.plan_resources(spec, cells, None, cells_to_run=1).jobs == 1  # never more than to run
    cpu_only = [SimpleNamespace(config=SimpleNamespace(device="cpu"))] * 6
    assert runner.plan_resources(spec, cpu_only, None, cells_to_run=6).gpu_sets == ()


def test_kernel_dc_share_against_hand_computation():
    """dc_share: box kernels 1, zero-sum kernels 0, a random weight equal to an explicit loop over filters."""
    import torch

    from pipeline.experiments.diagnostics import dc_share

    assert dc_share(torch.ones(4, 3, 3, 3) * 0.7) == pytest.approx(1.0, abs=1e-12)
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).expand(4, 3, 3, 3)
    assert dc_share(lap) == pytest.approx(0.0, abs=1e-12)
    w = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(0)).double().numpy()
    dc = sum(w[o, i].sum() ** 2 / 9 for o in range(5) for i in range(4))
    assert dc_share(torch.from_numpy(w)) == pytest.approx(dc / (w**2).sum(), rel=1e-12)
    assert 0.02 < dc_share(torch.from_numpy(w)) < 0.3  # i.i.d. taps: 1/9 on average


def test_scan_diagnostics_on_a_network():
    """conv_monitors reports SCAN's t statistics (t = 1 at init); kernel_dc_share reads the folded k_u."""
    from pipeline.config import load_config
    from pipeline.experiments.diagnostics import conv_monitors, kernel_dc_share

    cfg = load_config([REPO / "configs/scan_r18_casia.yaml"], ["model.width=0.0625", "model.conv.t_init=0.5"])
    net = build_network(cfg.model).eval()
    mon = conv_monitors(net, cfg, None)
    assert mon["t_mean"] == pytest.approx(0.5, rel=1e-5) and mon["t_std"] == pytest.approx(0.0, abs=1e-5)
    share = kernel_dc_share(net, cfg, None)["dc_share"]
    assert 0.0 < share < 1.0
    plain = build_network(load_config([], ["model.backbone=iresnet18", "model.width=0.0625"]).model)
    assert conv_monitors(plain, cfg, None) == {}


def test_train_hash_ignores_options_at_their_defaults():
    """A release that adds an option (default = the old behaviour) keeps every cached cell valid; a changed value
    of any option, old or new, retrains."""
    import copy
    from dataclasses import asdict

    from pipeline.config import AugmentConfig
    from pipeline.experiments.grid import train_hash

    cfg = load_config([REPO / "configs" / "arcface_r50.yaml", REPO / "configs" / "smoke.yaml"], ["data.train=x"])
    base = train_hash(cfg, 1)

    @dataclass
    class AugmentWithANewOption(AugmentConfig):
        new_option_p: float = 0.0

    extended = copy.deepcopy(cfg)
    extended.data.augment = AugmentWithANewOption(**asdict(cfg.data.augment))
    assert train_hash(extended, 1) == base
    extended.data.augment.new_option_p = 0.5
    assert train_hash(extended, 1) != base
    changed = copy.deepcopy(cfg)
    changed.optim.lr = 0.05
    assert train_hash(changed, 1) != base and train_hash(cfg, 2) != base


# --------------------------------------------------------------------------- overrides, params, what is resolved


def test_a_dropped_override_stops_the_grid(tmp_path):
    """check_overrides_applied: every key=value of the spec and arm must be in the resolved config."""
    spec = SimpleNamespace(path=Path("spec.yaml"))
    cfg = load_config([REPO / "configs/arcface_r50.yaml"], ["model.head.embedding_size=128", "model.head.kind=lgaf"])
    grid_module.check_overrides_applied(
        spec, "LGAF", cfg, ["model.head.embedding_size=128", "optim.weight_decay=5e-4", "model.head.kind=lgaf"]
    )
    with pytest.raises(SpecError, match=r"spec.yaml: arm 'LGAF': override model.head.embedding_size=128 .* holds 512"):
        grid_module.check_overrides_applied(
            spec, "LGAF", load_config([REPO / "configs/lgaf_r100.yaml"]), ["model.head.embedding_size=128"]
        )
    # a whole block written after its keys replaces them; a part block given by its kind name
    scan = load_config([REPO / "configs/scan_r18_casia.yaml"], ["model.conv=plain"])
    grid_module.check_overrides_applied(spec, "plain", scan, ["model.conv.rmo_weight=0.5", "model.conv=plain"])
    lcd = load_config([REPO / "configs/lcd_r50.yaml"], ["model.inserts=[{kind: lcd, at: layer3, sam: false}]"])
    grid_module.check_overrides_applied(spec, "lcd", lcd, ["model.inserts=[{kind: lcd, at: layer3, sam: false}]"])
    with pytest.raises(SpecError, match="model.inserts"):
        grid_module.check_overrides_applied(spec, "lcd", lcd, ["model.inserts=[{kind: lcd, at: layer3, sam: true}]"])


def test_parameter_count_is_the_built_networks():

    for overrides in ([], ["model.head.kind=lgaf"], ["model.head.kind=cqa"], ["model.inserts=[{kind: lcd}]"]):
        cfg = load_config(
            [REPO / "configs/arcface_r50.yaml"],
            ["model.backbone=iresnet18", "model.width=0.125", "model.head.embedding_size=128", *overrides],
        )
        net = build_network(cfg.model)
        assert grid_module.parameter_count(cfg) == sum(p.numel() for p in net.parameters())


def test_resolved_list_under_each_table(tmp_path):
    spec = report_spec(tmp_path, ["ref", "up", "flat"])
    acc = {"ref": [0.90, 0.92, 0.91], "up": [0.95, 0.96, 0.955], "flat": [0.93, 0.90, 0.91]}
    records = [
        {"index": 3 * a + s, "arm": arm, "seed": s, "status": "ok", "metrics": {"lfw": {"accuracy": v}}}
        for a, (arm, vs) in enumerate(acc.items())
        for s, v in enumerate(vs)
    ]
    report = build_report(spec, records, {"ref": 10, "up": 1234567, "flat": 10})
    md = render_markdown(spec, report)
    resolved = md.split("Resolved (the 95 % interval excludes 0):", 1)[1].split("\n\n", 1)[0]
    assert "`up` on `lfw`" in resolved and "`flat`" not in resolved  # up: +4.5 every seed; flat: +0, -2, 0
    assert {row[0]: row[1] for row in markdown_rows(md, "## accuracy (%)")}["up"] == "1,234,567"
    none = render_markdown(spec, build_report(spec, [r for r in records if r["arm"] != "up"]))
    assert "Resolved (the 95 % interval excludes 0): none." in none


# --------------------------------------------------------------------------- runner and cells live and die together
