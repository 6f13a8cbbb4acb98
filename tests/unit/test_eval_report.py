"""Degraded benchmarks in one call (``verify --degrade``), reports (``pipeline.report``) and the
embedding-norm analysis (issue 12, items 4–6).

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_eval_report.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import report as R
from pipeline.eval import degradations as DG
from pipeline.eval import run as ER
from pipeline.eval import sets as ES
from pipeline.eval.checkpoint import load_model
from pipeline.eval.cli import main as eval_main
from tests.support.eval_report import SIZE

# --------------------------------------------------------------------------- item 4


class CountingEmbedder:
    def __init__(self, net):
        self.net, self.images = net, 0

    def __call__(self, x):
        self.images += len(x)
        return self.net(x)


def test_each_distinct_image_embedded_once_per_degradation(runs, lfw200_bin, tmp_path):
    from pipeline.faces.io import read_bin, write_bin

    net, _ = load_model(runs[0])
    bins, issame = read_bin(lfw200_bin)
    bins = bins[:80] + bins[:20]  # 50 pairs, the first 10 pairs repeated: 80 distinct images
    issame = np.concatenate([issame[:40], issame[:10]])
    write_bin(tmp_path / "repeats.bin", bins, [bool(x) for x in issame])
    one = ES.EvalSet.from_bin(tmp_path / "repeats.bin")
    distinct = len(set(bins))
    distinct_second = len(set(bins[1::2]))
    counter = CountingEmbedder(net)
    degs = DG.parse_degradations(["clean", "lr:7", "cross:7", "blur-cross:1"])
    # the same set twice (two names): its images are embedded once
    out = ER.evaluate(counter, [one, ES.EvalSet.from_bin(one.path, name="again")], degs, SIZE)
    # embed_images runs each image and its mirror: 2 passes per distinct image and degradation;
    # cross:7 reuses clean (image 1) and lr:7 (image 2); blur-cross:1 needs only the second images blurred
    assert counter.images == 2 * (distinct + distinct + distinct_second)
    assert len(out["results"]) == 8
    # a cross setting alone: clean first images, degraded second images, nothing else
    counter.images = 0
    ER.evaluate(counter, [one], DG.parse_degradations(["cross:14"]), SIZE)
    assert counter.images == 2 * (len(set(bins[0::2])) + distinct_second)


def test_degrade_bad_input_is_one_line_exit_2(runs, lfw200_bin, tmp_path, capsys):
    for args, needle in (
        (["--degrade", "occlude:3"], "--degrade 'occlude:3'"),
        (["--degrade", "lr:7.5"], "--degrade 'lr:7.5'"),
        (["--degrade", "blur:x"], "--degrade 'blur:x'"),
        (["--norms"], "--norms"),
    ):
        assert eval_main(["verify", "--checkpoint", str(runs[0]), "--bin", str(lfw200_bin), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err
    missing = tmp_path / "missing.bin"
    assert eval_main(["verify", "--checkpoint", str(runs[0]), "--bin", str(missing), "--degrade", "clean"]) == 2
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(SystemExit):  # real LR pair sets (XQLFW) through --pairs: documented in verify's help
        eval_main(["verify", "--help"])
    assert "XQLFW" in capsys.readouterr().out


# --------------------------------------------------------------------------- items 5 and 6


def test_report_bad_input_is_one_line_exit_2(runs, lfw200_bin, tmp_path, capsys):
    cases = (
        ([str(tmp_path / "nope"), "--bin", str(lfw200_bin)], str(tmp_path / "nope")),
        ([str(runs[0]), "--bin", str(tmp_path / "x.bin")], str(tmp_path / "x.bin")),
        ([str(runs[0]), "--bin", str(lfw200_bin), "--degrade", "occlude:2"], "--degrade 'occlude:2'"),
        ([str(tmp_path), "--bin", str(lfw200_bin)], "not a checkpoint"),
    )
    for args, needle in cases:
        assert R.main(args + ["--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err, err
