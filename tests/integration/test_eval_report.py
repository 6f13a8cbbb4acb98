"""Degraded benchmarks in one call (``verify --degrade``), reports (``pipeline.report``) and the
embedding-norm analysis (issue 12, items 4–6).

Independent references: ``verify`` on the copies that ``data_prep.bin degrade`` writes to disk, a
counting embedder, and norms computed here straight from the network on the written copies.
The faces are the first 200 pairs (two folds' worth, 100 same / 100 different) of the real LFW
View-1 dev-test ``.bin``.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_eval_report.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import report as R
from pipeline.eval import embed as EM
from pipeline.eval import run as ER
from pipeline.eval import sets as ES
from pipeline.eval.checkpoint import load_model
from pipeline.eval.cli import main as eval_main
from pipeline.faces.io import read_bin
from tests.support.eval_report import SIZE

SPECS = ["clean", "blur:1", "lr:7", "cross:7", "blur-cross:1"]


def verify_json(tmp: Path, *args) -> dict:
    out = tmp / f"v{len(list(tmp.glob('v*.json')))}.json"
    assert eval_main(["verify", *args, "--json", str(out), "--roc", str(out.with_suffix(".png")), "--no-progress"]) == 0
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- item 4


def test_degrade_table_equals_verify_on_written_copies(runs, lfw200_bin, copies, tmp_path, capsys):
    got = verify_json(tmp_path, "--checkpoint", str(runs[0]), "--bin", str(lfw200_bin), "--degrade", *SPECS)
    table = capsys.readouterr().out
    rows = {r["degradation"]: r for r in got["results"]}
    assert list(rows) == SPECS
    for label, path in copies.items():
        ref = verify_json(tmp_path, "--checkpoint", str(runs[0]), "--bin", str(path))["results"][0]
        assert rows[label]["accuracy"] == ref["accuracy"], label
        assert rows[label]["std"] == ref["std"], label
        assert rows[label]["threshold"] == pytest.approx(ref["threshold"]), label
        assert rows[label]["auc"] == pytest.approx(ref["auc"], abs=1e-9), label
        assert f"{ref['accuracy']:.4f} ± {ref['std']:.4f}" in table  # printed as verify prints
    assert "| set | clean | blur:1 | lr:7 | cross:7 | blur-cross:1 |" in table


def test_report_table_cache_bold_and_norms(runs, lfw200_bin, copies, tmp_path, capsys, monkeypatch):
    out = tmp_path / "rep"
    args = [str(r) for r in runs] + ["--bin", str(lfw200_bin), "--degrade", *SPECS, "--norms", "--out", str(out)]
    assert R.main(args + ["--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "evaluated" in printed.err
    for f in ("report.md", "report.json", "report_accuracy.png", "report_norms.png"):
        assert (out / f).stat().st_size > 0, f
    assert sorted(p.name for p in (out / "report_cache").iterdir()) == ["run_a.json", "run_b.json"]
    rep = json.loads((out / "report.json").read_text())

    # accuracies = verify on the written copies, per checkpoint
    acc = {}
    for run, ck in zip(runs, rep["checkpoints"]):
        net, _ = load_model(run)
        by = {r["degradation"]: r for r in ck["results"]}
        for label, path in copies.items():
            ref = ER.evaluate_bin(net, path, image_size=SIZE)
            assert by[label]["accuracy"] == ref["accuracy"], (run.name, label)
            assert by[label]["std"] == ref["std"], (run.name, label)
            acc[(ck["run"], label)] = ref["accuracy"]

    # bold marks the column maximum (every tied maximum), nothing else
    md = (out / "report.md").read_text()
    assert md in printed.out + "\n"
    acc_md = md.split("## Embedding")[0]  # the accuracy table (the norms table follows)
    lines = [ln for ln in acc_md.splitlines() if ln.startswith("| run_")]
    assert len(lines) == 2
    header = next(ln for ln in md.splitlines() if ln.startswith("| checkpoint | clean"))
    cols = [c.strip() for c in header.strip("|").split("|")][1:]
    assert cols == SPECS
    for j, label in enumerate(cols):
        best = max(acc[(r, label)] for r in ("run_a", "run_b"))
        for ln in lines:
            cells = [c.strip() for c in ln.strip("|").split("|")]
            bold = cells[1 + j].startswith("**")
            assert bold == (acc[(cells[0], label)] == best), (cells[0], label)
            assert float(cells[1 + j].strip("*")) == pytest.approx(100 * acc[(cells[0], label)], abs=0.005)

    # norms = un-normalised embedding L2 norm of each distinct image of the written copies, computed directly
    for run, ck in zip(runs, rep["checkpoints"]):
        net, _ = load_model(run)
        norms = {r["degradation"]: r for r in ck["norms"]}
        assert sorted(norms) == sorted(["clean", "blur:1", "lr:7"])  # cross settings: their degradation
        for label in ("clean", "blur:1", "lr:7"):
            images, _ = ES.load_bin(copies[label], SIZE)
            with torch.inference_mode():
                e = net(EM.to_model_input(images)).numpy()
            bins, _ = read_bin(copies[label])
            first = list({b: i for i, b in reversed(list(enumerate(bins)))}.values())  # one row per distinct image
            n = np.linalg.norm(e[sorted(first)], axis=1)
            assert norms[label]["images"] == len(first)
            assert norms[label]["mean"] == pytest.approx(float(n.mean()), rel=1e-5)
            assert norms[label]["sd"] == pytest.approx(float(n.std()), rel=1e-4)
    # norms in scientific notation (1.5e7 and 22.6 read alike), then what to expect
    assert re.search(r"\| run_a \| lfw200 \| [0-9.]+e[+-][0-9]+ ± [0-9.]+e[+-][0-9]+", md)
    assert "expected: about √D for a trained fc head" in md

    # a rerun reads the cache: nothing is embedded
    def no_embedding(*a, **k):
        raise AssertionError("re-embedded although the cache matches")

    monkeypatch.setattr(ER, "embed_images", no_embedding)
    assert R.main(args + ["--no-progress"]) == 0
    again = capsys.readouterr()
    assert again.err.count("cached") == 2
    assert json.loads((out / "report.json").read_text()) == rep
    # other settings: the cache does not match, so it evaluates (and would embed)
    with pytest.raises(AssertionError, match="re-embedded"):
        R.main([str(runs[0]), "--bin", str(lfw200_bin), "--degrade", "clean", "--out", str(out), "--no-progress"])
