"""Identification (rank-k / CMC, TinyFace and SCface layouts) and TAR@FAR over all pairs.

References are computed independently here: the CMC by sorting the full similarity matrix
(numpy argsort), pair scores from the full matrix's upper triangle, TAR@FAR from scikit-learn's
``roc_curve``; the faces are the real LFW View-1 dev-test images.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_eval_identify.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.eval import embed as EM
from pipeline.eval import identify as I
from pipeline.eval import sets as ES
from pipeline.eval import tarfar as T
from pipeline.eval.checkpoint import load_model
from pipeline.eval.cli import main as eval_main
from tests.helpers import run, train_command
from tests.support.eval_identify import (
    SIZE,
    brute_force_cmc,
    first_image_gallery,
    make_scface,
    sklearn_tar_at_far,
    write_list,
)

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained_run(lfw_shards, tmp_path_factory):
    """A run directory trained for 2 steps on the LFW shards by the real trainer."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run(
        train_command(
            "model.backbone=iresnet18",
            f"model.input_size={SIZE}",
            "schedule.max_steps=2",
            f"data.train={lfw_shards}",
            f"output.dir={out}",
        )
    )
    return out


# --------------------------------------------------------------------------- rank-k / CMC


def test_cmc_on_lfw_devtest_against_brute_force(devtest, devtest_feats, tiny_net, train_distractors):
    """Gallery: one image per dev-test identity + 101 training images as distractors; probes: the
    other dev-test images; embeddings of a random-init tiny network."""
    gallery_rows, probe_rows = first_image_gallery(devtest)
    labels = np.unique(devtest.labels, return_inverse=True)[1]
    distractor_feats = EM.embed_paths(tiny_net, train_distractors.paths, SIZE, batch_size=256)
    gallery = np.concatenate([devtest_feats[gallery_rows], distractor_feats]).astype(np.float64)
    gallery_labels = np.concatenate([labels[gallery_rows], np.full(len(distractor_feats), I.DISTRACTOR)])
    probes = devtest_feats[probe_rows].astype(np.float64)
    assert (len(gallery_rows), len(probe_rows), len(gallery)) == (963, 586, 1064)
    reference = brute_force_cmc(probes, labels[probe_rows], gallery, gallery_labels, 20)
    for chunk in (1, 7, 256, 5000):
        cmc = I.rank_k_cmc(probes, labels[probe_rows], gallery, gallery_labels, max_rank=20, chunk=chunk)
        np.testing.assert_allclose(cmc, reference, err_msg=f"chunk {chunk}")
    assert 0 < reference[0] < reference[-1] < 1  # a random network: neither nothing nor everything found
    # the float32 features the CLI uses give the same table
    f32 = I.rank_k_cmc(probes.astype(np.float32), labels[probe_rows], gallery.astype(np.float32), gallery_labels)
    np.testing.assert_allclose(f32, reference, atol=2 / len(probes))


# --------------------------------------------------------------------------- readers


def test_cli_identify_lists_and_scface(tmp_path, capsys, devtest, train_distractors, trained_run, random_checkpoint):
    people = [lab for lab in dict.fromkeys(devtest.labels) if devtest.labels.count(lab) >= 2][:30]
    subset = [(p, lab) for p, lab in zip(devtest.paths, devtest.labels) if lab in people]
    sub = ES.ImageSet([p for p, _ in subset], [lab for _, lab in subset], "subset")
    g_rows, p_rows = first_image_gallery(sub)
    g = write_list(tmp_path / "gallery.txt", [sub.paths[i] for i in g_rows], [sub.labels[i] for i in g_rows])
    p = write_list(tmp_path / "probe.txt", [sub.paths[i] for i in p_rows], [sub.labels[i] for i in p_rows])
    d = write_list(tmp_path / "distractors.txt", train_distractors.paths[:20])  # no labels
    out = tmp_path / "res" / "identify.json"
    args = ["identify", "--checkpoint", str(trained_run), "--gallery", str(g), "--probe", str(p)]
    rc = eval_main(args + ["--distractors", str(d), "--json", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split() == ["set", "probes", "gallery", "rank-1", "rank-5", "rank-10", "rank-20", "(%)"]
    row = text[1].split()
    assert row[:3] == ["probe", str(len(p_rows)), str(len(g_rows) + 20)]
    assert (tmp_path / "res" / "identify_cmc.png").stat().st_size > 1000
    result = json.loads(out.read_text())["results"][0]
    assert [f"{100 * v:.2f}" for v in result["rank"].values()] == row[3:]
    # the same CMC from the loaded network and the brute-force reference
    net, info = load_model(trained_run)
    assert info["input_size"] == SIZE
    feats = EM.embed_paths(net, sub.paths + train_distractors.paths[:20], SIZE).astype(np.float64)
    labels = np.unique(sub.labels, return_inverse=True)[1]
    gallery = np.concatenate([feats[g_rows], feats[len(sub) :]])
    gallery_labels = np.concatenate([labels[g_rows], np.full(20, -1)])
    reference = brute_force_cmc(feats[p_rows], labels[p_rows], gallery, gallery_labels, 20)
    np.testing.assert_allclose(result["cmc"], reference, atol=1.5 / len(p_rows))  # float32 vs float64 near-ties

    make_scface(tmp_path / "sc", devtest, subjects=3)
    png = tmp_path / "sc_cmc.png"
    rc = eval_main(
        ["identify", "--checkpoint", str(random_checkpoint), "--scface", str(tmp_path / "sc")]
        + ["--cmc", str(png), "--no-progress"]
    )
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[:3] for ln in lines[1:4]] == [["d1", "15", "3"], ["d2", "15", "3"], ["d3", "15", "3"]]
    assert png.stat().st_size > 1000


def test_cli_tarfar_two_checkpoints(tmp_path, capsys, devtest, trained_run, random_checkpoint):
    people = list(dict.fromkeys(devtest.labels))[:40]
    rows = [i for i, lab in enumerate(devtest.labels) if lab in people]
    images = write_list(tmp_path / "images.txt", [devtest.paths[i] for i in rows], [devtest.labels[i] for i in rows])
    genuine, impostor = T.count_pairs(np.asarray(devtest.labels)[rows])
    out = tmp_path / "tarfar.json"
    rc = eval_main(
        ["tarfar", "--checkpoint", str(trained_run), "--checkpoint", str(random_checkpoint)]
        + ["--images", str(images), "--json", str(out), "--no-progress"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert f"{len(rows)} images, 40 identities: {genuine} genuine, {impostor} impostor pairs" in text
    assert 1_000 <= impostor < 10_000  # FAR 1e-1 … 1e-3 measurable, 1e-4 … 1e-6 not
    lines = text.splitlines()
    assert lines[1].split() == ["FAR", "[1]", "[2]"]
    for far, line in zip(["1e-01", "1e-02", "1e-03"], lines[2:5]):
        assert line.split()[0] == far and len(line.split()) == 3
    for far, line in zip(["1e-04", "1e-05", "1e-06"], lines[5:8]):
        assert line.split(None, 1) == [far, f"n/a (only {impostor} impostor pairs)"]
    assert lines[8].startswith("[1] ") and "step_0000002" in lines[8] and lines[9].endswith("ckpt")
    assert (tmp_path / "tarfar_roc.png").stat().st_size > 1000
    data = json.loads(out.read_text())
    assert (data["genuine_pairs"], data["impostor_pairs"]) == (genuine, impostor)
    assert [f"{r['points'][0]['tar']:.4f}" for r in data["results"]] == lines[2].split()[1:]


# --------------------------------------------------------------------------- bad input


def test_pair_counts_and_scores_on_lfw_devtest(devtest, devtest_feats):
    labels = np.asarray(devtest.labels)
    same = labels[:, None] == labels[None, :]
    upper = np.triu_indices(len(labels), 1)
    direct_genuine = int(same[upper].sum())
    direct = (direct_genuine, len(upper[0]) - direct_genuine)
    assert T.count_pairs(labels) == direct == (983, 1_197_943)  # issue 12: 983 and ≈ 1.2 M
    feats = devtest_feats.astype(np.float64)
    scores = (feats @ feats.T)[upper]
    ref_genuine, ref_impostor = np.sort(scores[same[upper]]), np.sort(scores[~same[upper]])
    for block in (3, 100, 5000):  # 1,549 rows: 3 leaves a last block of 1
        genuine, impostor = T.pair_scores(feats, labels, block)
        np.testing.assert_allclose(np.sort(genuine), ref_genuine, atol=1e-12, err_msg=f"block {block}")
        np.testing.assert_allclose(np.sort(impostor), ref_impostor, atol=1e-12, err_msg=f"block {block}")
    points = T.tar_at_far(ref_genuine, ref_impostor, T.FARS)
    for p in points:  # 1.2 M impostors: every FAR down to 1e-6 is measurable
        assert p.tar == sklearn_tar_at_far(ref_genuine, ref_impostor, p.far), p.far
        assert p.achieved_far <= p.far and p.achieved_far == (ref_impostor > p.threshold).mean()
    assert 0 < points[0].tar < 1
