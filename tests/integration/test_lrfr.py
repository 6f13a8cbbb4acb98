"""The lrfr recipe: forward contract, eq. 7 assembled as the trainer does, configs, buckets.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_lrfr.py.
"""

from __future__ import annotations

import pytest
import torch

from pipeline import registry
from pipeline.config import load_config


@pytest.fixture(scope="module")
def lfw100_bin(lfw_bin, tmp_path_factory):
    """The first fold (100 pairs: 50 matched, 50 mismatched) of the real LFW dev-test .bin."""
    from pipeline.faces.io import read_bin, write_bin

    bins, issame = read_bin(lfw_bin)
    out = tmp_path_factory.mktemp("lowres") / "lfw100.bin"
    write_bin(out, bins[:200], issame[:100])
    assert 0 < sum(issame[:100]) < 100
    return out


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint directory as the trainer writes it: config.yaml + model.pt (random init)."""
    from pipeline.config import dump_config

    torch.manual_seed(0)
    cfg = load_config(
        [],
        [
            "recipe=lrfr",
            "model.backbone=iresnet18",
            "model.width=0.0625",
            "model.head.embedding_size=32",
            "data.augment.paired=true",
        ],
    )
    model = registry.build_recipe(cfg)
    d = tmp_path_factory.mktemp("ckpt") / "step_00000001"
    d.mkdir()
    dump_config(cfg, d / "config.yaml")
    torch.save(model.net.state_dict(), d / "model.pt")
    return d


def test_lowres_verify_and_copies_agree_on_a_set_stored_at_another_size(lfw100_bin, tiny_checkpoint, tmp_path):
    """One degradation implementation (issue 20 item 4): on a set stored at 160 px (not the model's 112), the lowres
    table, ``verify --degrade lr:7 cross:7`` and verification of data_prep's degraded copies give the same numbers
    (all three degrade at the stored size, then resize; the copies are written losslessly)."""
    import io

    from PIL import Image

    from data_prep.bin import degrade_bin
    from pipeline.eval.checkpoint import load_model
    from pipeline.eval.degradations import parse_degradations
    from pipeline.eval.lowres import evaluate_lowres_bin
    from pipeline.eval.run import evaluate, evaluate_bin
    from pipeline.eval.sets import EvalSet
    from pipeline.faces.io import read_bin, write_bin

    bins, issame = read_bin(lfw100_bin)
    big = []
    for b in bins[:80]:
        out = io.BytesIO()
        Image.open(io.BytesIO(b)).convert("RGB").resize((160, 160), Image.BICUBIC).save(out, "PNG")
        big.append(out.getvalue())
    stored = tmp_path / "lfw40_160.bin"
    write_bin(stored, big, issame[:40])
    net, _ = load_model(tiny_checkpoint)
    rows = {(r["mode"], r["size"]): r for r in evaluate_lowres_bin(net, stored, sizes=(7,), batch_size=80)}
    verify = evaluate(net, [EvalSet.from_bin(stored)], parse_degradations(["lr:7", "cross:7"]), 112, 80)
    by_label = {r["degradation"]: r for r in verify["results"]}
    for copy in degrade_bin(stored, tmp_path / "copies", lowres=(7,), cross=True, progress=False):
        mode, label = ("cross", "cross:7") if copy.stem.endswith("_cross") else ("lr", "lr:7")
        ref = evaluate_bin(net, copy, batch_size=80)
        assert rows[(mode, 7)]["accuracy"] == by_label[label]["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-9)
        assert rows[(mode, 7)]["auc"] == pytest.approx(ref["auc"], abs=1e-9), copy.name


def test_lowres_rows_equal_verification_of_degraded_bins(lfw100_bin, tiny_checkpoint, tmp_path):
    """lowres on X == the plain verifier on data_prep's degraded copies of X (full and cross)."""
    from data_prep.bin import degrade_bin
    from pipeline.eval.checkpoint import load_model
    from pipeline.eval.lowres import evaluate_lowres_bin, markdown_table
    from pipeline.eval.run import evaluate_bin

    net, _ = load_model(tiny_checkpoint)
    rows = evaluate_lowres_bin(net, lfw100_bin, sizes=(7,), batch_size=100)
    by = {(r["mode"], r["size"]): r for r in rows}
    assert set(by) == {("clean", None), ("lr", 7), ("cross", 7)}
    assert by[("clean", None)]["accuracy"] == pytest.approx(evaluate_bin(net, lfw100_bin, batch_size=100)["accuracy"])
    written = degrade_bin(lfw100_bin, tmp_path, lowres=(7,), cross=True, progress=False)
    assert len(written) == 2
    for path in written:
        ref = evaluate_bin(net, path, batch_size=100)
        mode = "cross" if path.stem.endswith("_cross") else "lr"
        assert by[(mode, 7)]["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-9), path.name  # one implementation
        assert by[(mode, 7)]["auc"] == pytest.approx(ref["auc"], abs=1e-9), path.name
    table = markdown_table(rows)
    assert "| lfw100 | 100 | LR (both) |" in table and "| lfw100 | 100 | cross (one HR) | — |" in table
    assert "7 px" in table


def test_lowres_cli_prints_table_and_json(lfw100_bin, tiny_checkpoint, tmp_path, capsys):
    import json

    from pipeline.eval.lowres import main

    out = tmp_path / "lowres.json"
    assert (
        main(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--bin",
                str(lfw100_bin),
                "--sizes",
                "7",
                "--json",
                str(out),
                "--no-progress",
                "--batch-size",
                "100",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| set | pairs | setting | HR (clean) | 7 px |" in printed
    data = json.loads(out.read_text())
    assert [(r["mode"], r["size"]) for r in data["results"]] == [("clean", None), ("lr", 7), ("cross", 7)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in data["results"])
    # bad input: one-line error, exit 2
    assert main(["--checkpoint", str(tmp_path / "nope"), "--bin", str(lfw100_bin)]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["--checkpoint", str(tiny_checkpoint), "--bin", str(tmp_path / "missing.bin")]) == 2
    assert main(["--checkpoint", str(tiny_checkpoint), "--bin", str(lfw100_bin), "--sizes", "0"]) == 2


def test_lowres_is_a_subcommand_of_pipeline_eval(lfw100_bin, tiny_checkpoint, tmp_path, capsys):
    from pipeline.eval.cli import main

    out = tmp_path / "sub.json"
    assert (
        main(
            [
                "lowres",
                "--checkpoint",
                str(tiny_checkpoint),
                "--bin",
                str(lfw100_bin),
                "--sizes",
                "14",
                "--json",
                str(out),
                "--no-progress",
                "--batch-size",
                "100",
            ]
        )
        == 0
    )
    assert "14 px" in capsys.readouterr().out and out.is_file()
