"""Identification (rank-k / CMC, TinyFace and SCface layouts) and TAR@FAR over all pairs.

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_eval_identify.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep.manifest import DataError
from pipeline.eval import identify as I
from pipeline.eval import sets as ES
from pipeline.eval import tarfar as T
from pipeline.eval.cli import main as eval_main
from tests.support.eval_identify import (
    SIZE,
    brute_force_cmc,
    first_image_gallery,
    make_scface,
    sklearn_tar_at_far,
    write_list,
)

# --------------------------------------------------------------------------- fixtures


# --------------------------------------------------------------------------- rank-k / CMC


def test_cmc_hand_made_known_ranks():
    """One-hot gallery features: probe i's score for gallery entry j is exactly its j-th feature,
    so placing the true match's score at the r-th highest level puts it at rank r."""
    n_gallery, max_rank = 25, 20
    gallery = np.eye(n_gallery)
    gallery_labels = np.arange(n_gallery)
    wanted = np.array([1, 1, 2, 3, 5, 5, 10, 20, 21, 25])
    rng = np.random.default_rng(0)
    probes, probe_labels = [], []
    levels = np.arange(n_gallery, 0, -1.0)  # distinct scores, highest first
    for r in wanted:
        true = rng.integers(n_gallery)
        others = rng.permutation([j for j in range(n_gallery) if j != true])
        v = np.empty(n_gallery)
        v[true] = levels[r - 1]
        v[others] = np.delete(levels, r - 1)
        probes.append(v)
        probe_labels.append(true)
    expected = np.array([(wanted <= k).mean() for k in range(1, max_rank + 1)])
    for chunk in (1, 3, n_gallery, 1000):
        cmc = I.rank_k_cmc(np.array(probes), np.array(probe_labels), gallery, gallery_labels, max_rank, chunk)
        np.testing.assert_array_equal(cmc, expected)
    assert expected[0] == 0.2 and expected[4] == 0.6 and expected[-1] == 0.8  # ranks 21 and 25: never found


@pytest.mark.parametrize("chunk", [1, 4, 30, 100])
def test_cmc_random_features_gallery_smaller_than_max_rank(chunk):
    rng = np.random.default_rng(chunk)
    gallery = rng.standard_normal((30, 16))
    gallery_labels = np.concatenate([np.arange(20), np.full(10, I.DISTRACTOR)])
    probes = rng.standard_normal((50, 16))
    probe_labels = rng.integers(0, 20, 50)
    cmc = I.rank_k_cmc(probes, probe_labels, gallery, gallery_labels, max_rank=40, chunk=chunk)
    np.testing.assert_allclose(cmc, brute_force_cmc(probes, probe_labels, gallery, gallery_labels, 40))
    assert cmc[-1] == 1.0 and len(cmc) == 40  # closed set: everyone found within the 30 entries


def test_list_and_folder_readers(tmp_path, lfw, devtest):
    assert len(devtest) == 1549 and len(set(devtest.labels)) == 963
    assert devtest.paths[0].parent.name == devtest.labels[0] == "AJ_Lamas"
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in devtest.paths[:3]:
        shutil.copyfile(p, imgs / p.name)
    lst = write_list(tmp_path / "list.txt", [f"imgs/{p.name}" for p in devtest.paths[:3]], devtest.labels[:3])
    got = ES.read_image_set(lst)  # paths relative to the list's folder
    assert got.paths == [imgs / p.name for p in devtest.paths[:3]] and got.labels == devtest.labels[:3]
    dis = ES.read_image_set(write_list(tmp_path / "dis.txt", [f"imgs/{p.name}" for p in devtest.paths[:2]]), False)
    assert len(dis) == 2 and dis.labels == ["", ""]


def make_tinyface(root, devtest: ES.ImageSet, train: ES.ImageSet, testing_set: bool = True):
    """TinyFace's layout from LFW images: identity k's first image in Gallery_Match as
    ``<k>_1.jpg``, its others in Probe as ``<k>_<n>.jpg``; distractors named like matches of the
    same ids (their names must not count). Returns (gallery labels, probe labels)."""
    base = root / "Testing_Set" if testing_set else root
    for name in I.TINYFACE_FOLDERS:
        (base / name).mkdir(parents=True)
    people = [lab for lab in dict.fromkeys(devtest.labels) if devtest.labels.count(lab) >= 2][:4]
    gallery, probes = [], []
    for k, person in enumerate(people, 1):
        paths = [p for p, lab in zip(devtest.paths, devtest.labels) if lab == person]
        shutil.copyfile(paths[0], base / "Gallery_Match" / f"{k}_1.jpg")
        gallery.append(str(k))
        for n, p in enumerate(paths[1:], 2):
            shutil.copyfile(p, base / "Probe" / f"{k}_{n}.jpg")
            probes.append(str(k))
    for n, p in enumerate(train.paths[:6]):
        shutil.copyfile(p, base / "Gallery_Distractor" / f"{1 + n % 4}_{10 + n}.jpg")
    return gallery, probes


def test_tinyface_layout(tmp_path, devtest, train_distractors):
    gallery, probes = make_tinyface(tmp_path / "tinyface", devtest, train_distractors)
    ts = I.read_tinyface(tmp_path / "tinyface")
    assert ts.gallery.labels == gallery and list(ts.probes) == ["tinyface"]
    assert sorted(ts.probes["tinyface"].labels) == sorted(probes) and len(ts.distractors) == 6
    assert all(p.parent.name == "Probe" for p in ts.probes["tinyface"].paths)
    g, d, p = I.integer_labels(ts)
    assert (d == I.DISTRACTOR).all() and set(p["tinyface"]) <= set(g)
    # an aligned copy holding the three folders directly
    make_tinyface(tmp_path / "aligned", devtest, train_distractors, testing_set=False)
    assert I.read_tinyface(tmp_path / "aligned").gallery.labels == gallery
    shutil.copyfile(devtest.paths[0], tmp_path / "aligned" / "Probe" / "face.jpg")
    with pytest.raises(DataError, match=r"Probe/face.jpg: TinyFace file names are '<id>_<n>"):
        I.read_tinyface(tmp_path / "aligned")
    shutil.rmtree(tmp_path / "tinyface" / "Testing_Set" / "Gallery_Distractor")
    with pytest.raises(DataError, match=r"Gallery_Distractor: TinyFace folder does not exist"):
        I.read_tinyface(tmp_path / "tinyface")


def test_scface_layout(tmp_path, devtest):
    make_scface(tmp_path / "sc", devtest)
    sc = I.read_scface(tmp_path / "sc")
    assert sc.gallery.labels == ["1", "2", "3", "4"] and sc.distractors is None
    assert list(sc.probes) == ["d1", "d2", "d3"]
    for d, ps in sc.probes.items():
        assert len(ps) == 4 * 5  # 4 subjects × visible cameras 1-5
        assert all(p.parent.parent.name == f"surveillance_cameras_distance_{d[1]}" for p in ps.paths)
        assert all(p.stem.split("_")[0] == f"{int(lab):03d}" for p, lab in zip(ps.paths, ps.labels))
        assert not any("_cam6_" in p.name for p in ps.paths)
    held = I.read_scface(tmp_path / "sc", finetune_subjects=2)
    assert held.gallery.labels == ["3", "4"] and all(set(ps.labels) == {"3", "4"} for ps in held.probes.values())
    assert len(I.read_scface(tmp_path / "sc", cameras=(6,)).probes["d2"]) == 4
    misfiled = tmp_path / "sc" / "surveillance_cameras_distance_2" / "cam_1" / "001_cam1_3.jpg"
    shutil.copyfile(devtest.paths[0], misfiled)
    with pytest.raises(DataError, match=r"001_cam1_3.jpg: distance index 3 in the name, but the folder is distance 2"):
        I.read_scface(tmp_path / "sc")


# --------------------------------------------------------------------------- TAR@FAR


def test_tar_at_far_synthetic_scores_with_ties():
    rng = np.random.default_rng(0)
    genuine = np.round(rng.normal(1.5, 1.0, 300), 1)  # rounding makes many ties, across both kinds
    impostor = np.round(rng.normal(0.0, 1.0, 20_000), 1)
    fars = (1e-1, 0.0123, 1e-2, 1e-3, 3 / 20_000, 1e-4, 1e-5, 1e-6)
    points = T.tar_at_far(genuine, impostor, fars)
    for p in points:
        if p.far * len(impostor) < 1:
            assert p.tar is None and p.threshold is None  # 1e-5, 1e-6: fewer than 1/far impostors
        else:
            assert p.tar == sklearn_tar_at_far(genuine, impostor, p.far), p.far
            assert (impostor > p.threshold).mean() == p.achieved_far <= p.far
    assert [p.far for p in points if p.tar is None] == [1e-5, 1e-6]
    # a tiny case by hand: 10 impostors, FAR 0.1 allows one; the 2nd highest impostor (0.8, tied
    # with a genuine score) is the threshold, so only genuine scores above 0.8 are accepted
    g, imp = np.array([0.95, 0.9, 0.8, 0.5]), np.array([0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    (p,) = T.tar_at_far(g, imp, [0.1])
    assert (p.threshold, p.tar, p.achieved_far) == (0.8, 0.5, 0.1) and p.tar == sklearn_tar_at_far(g, imp, 0.1)


# --------------------------------------------------------------------------- CLI


def one_line_error(capsys, argv: list[str]) -> str:
    assert eval_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys, devtest, random_checkpoint):
    ck = ["--checkpoint", str(random_checkpoint), "--no-progress"]
    good = write_list(tmp_path / "good.txt", devtest.paths[:3], devtest.labels[:3])
    missing = tmp_path / "nope.txt"
    assert f"{missing}: does not exist" in one_line_error(
        capsys, ["identify", *ck, "--gallery", str(missing), "--probe", str(good)]
    )
    bad = write_list(tmp_path / "bad.txt", [devtest.paths[0], tmp_path / "gone.jpg"], ["a", "b"])
    assert f"{bad}:4: image {tmp_path / 'gone.jpg'} does not exist" in one_line_error(
        capsys, ["identify", *ck, "--gallery", str(good), "--probe", str(bad)]
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert f"{empty}: lists no images" in one_line_error(
        capsys, ["identify", *ck, "--gallery", str(empty), "--probe", str(good)]
    )
    (tmp_path / "empty_dir" / "someone").mkdir(parents=True)
    assert "empty_dir: holds no <identity>/<image> files" in one_line_error(
        capsys, ["identify", *ck, "--gallery", str(tmp_path / "empty_dir"), "--probe", str(good)]
    )
    stranger = write_list(tmp_path / "stranger.txt", devtest.paths[3:4], ["Nobody"])
    err = one_line_error(capsys, ["identify", *ck, "--gallery", str(good), "--probe", str(stranger)])
    assert f"{stranger}: 1 of 1 probes have an identity that is not in the gallery" in err
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a jpeg")
    junk_list = write_list(tmp_path / "junk.txt", [junk], [devtest.labels[0]])
    assert f"{junk}: cannot decode image" in one_line_error(
        capsys, ["identify", *ck, "--gallery", str(good), "--probe", str(junk_list)]
    )
    assert f"{tmp_path / 'Gallery_Match'}: TinyFace folder does not exist" in one_line_error(
        capsys, ["identify", *ck, "--tinyface", str(tmp_path)]
    )
    assert f"{missing}: does not exist" in one_line_error(capsys, ["tarfar", *ck, "--images", str(missing)])
    one_person = write_list(tmp_path / "one.txt", devtest.paths[:2], ["x", "x"])
    assert f"{one_person}: 1 genuine and 0 impostor pairs" in one_line_error(
        capsys, ["tarfar", *ck, "--images", str(one_person)]
    )


# --------------------------------------------------------------------------- honest ranks (issue 22 item 6)


def test_trivial_rank_by_hand():
    # 6 identities, one image each: a probe's identity is at worst 6th → rank-6 and beyond find everyone
    assert I.trivial_rank(np.array([0, 3]), np.arange(6)) == 6
    # identity 0 has 3 images among 8 entries: its probes are found by rank 6; identity 1 (1 image) by rank 8
    gallery = np.array([0, 0, 0, 1, 2, 3, 4, 5])
    assert I.trivial_rank(np.array([0]), gallery) == 6 and I.trivial_rank(np.array([0, 1]), gallery) == 8
    assert I.trivial_rank(np.array([9]), gallery) == 9  # an absent identity: no rank is trivial


def test_small_gallery_ranks_are_na_and_a_probe_that_is_the_gallery_is_excluded(devtest, tiny_net):
    people = [lab for lab in dict.fromkeys(devtest.labels) if devtest.labels.count(lab) >= 2][:6]
    rows = [i for i, lab in enumerate(devtest.labels) if lab in people]
    sub = ES.ImageSet([devtest.paths[i] for i in rows], [devtest.labels[i] for i in rows], "six")
    g_rows, p_rows = first_image_gallery(sub)
    gallery = ES.ImageSet([sub.paths[i] for i in g_rows], [sub.labels[i] for i in g_rows], "gallery")
    probes = ES.ImageSet([sub.paths[i] for i in p_rows], [sub.labels[i] for i in p_rows], "probe")
    protocol = I.IdentificationSet(gallery, {"probe": probes, "itself": gallery})
    result = {r["set"]: r for r in I.evaluate_identification(tiny_net, protocol, SIZE)}
    probe, itself = result["probe"], result["itself"]
    assert probe["trivial_from_rank"] == 6
    assert probe["rank"][1] is not None and probe["rank"][5] is not None
    assert probe["rank"][10] is None and probe["rank"][20] is None  # not "100 %"
    assert probe["duplicates"] == 0 and probe["probes"] == len(p_rows)
    assert itself["duplicates"] == 6 and itself["duplicates_excluded"] == 6 and itself["probes"] == 0
    table = I.format_table(list(result.values()))
    assert "n/a" in table and "n/a from rank-6" in table
    assert "itself: 6 probe image(s) byte-identical to gallery images: excluded (--keep-duplicates keeps them)" in table
    kept = {r["set"]: r for r in I.evaluate_identification(tiny_net, protocol, SIZE, keep_duplicates=True)}
    assert kept["itself"]["probes"] == 6 and kept["itself"]["rank"][1] == 1.0  # what the old report printed


def test_tarfar_counts_and_excludes_byte_identical_images(tmp_path, capsys, devtest, random_checkpoint):
    people = list(dict.fromkeys(devtest.labels))[:12]
    rows = [i for i, lab in enumerate(devtest.labels) if lab in people]
    paths, labels = [devtest.paths[i] for i in rows], [devtest.labels[i] for i in rows]
    copies = tmp_path / "copies"
    copies.mkdir()
    for k in range(3):  # three copies of images already in the set, under new names, same identities
        (copies / f"copy{k}.jpg").write_bytes(Path(paths[k]).read_bytes())
    images = write_list(tmp_path / "images.txt", paths + sorted(copies.iterdir()), labels + labels[:3])
    out = tmp_path / "t.json"
    argv = ["tarfar", "--checkpoint", str(random_checkpoint), "--images", str(images), "--no-progress"]
    assert eval_main([*argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 image(s) byte-identical to an earlier image of the set: excluded (--keep-duplicates keeps them)" in text
    genuine, impostor = T.count_pairs(np.asarray(labels))
    data = json.loads(out.read_text())
    assert (data["genuine_pairs"], data["impostor_pairs"], data["duplicates_excluded"]) == (genuine, impostor, 3)
    assert eval_main([*argv, "--keep-duplicates", "--json", str(out)]) == 0
    assert "kept (--keep-duplicates)" in capsys.readouterr().out
    assert json.loads(out.read_text())["genuine_pairs"] == T.count_pairs(np.asarray(labels + labels[:3]))[0]
