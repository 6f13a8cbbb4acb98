"""Verification: the insightface 10-fold protocol by hand, against scikit-learn, and on real LFW pairs.

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_verify.py.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import mannwhitneyu
from sklearn.metrics import accuracy_score, confusion_matrix

from data_prep.manifest import DataError
from pipeline import registry
from pipeline.config import ConfigError, dump_config, load_config
from pipeline.eval import run as ER
from pipeline.eval import sets as ES
from pipeline.eval import verify as V
from pipeline.eval.checkpoint import load_model
from pipeline.eval.cli import main as eval_main
from pipeline.faces.io import read_bin, write_bin

# --------------------------------------------------------------------------- protocol by hand


def hand_distances():
    """20 pairs, fold k = pairs (2k, 2k+1) = (same, different).

    Same pairs sit at distance 0.505 and different ones at 1.505, except a hard different pair
    at 0.305 in fold 0 and a hard same pair at 2.005 in fold 9 (no distance on the 0.01 grid).
    Worked out by hand: in every fold the 9 training folds are best separated (17/18 or 16/18
    correct) by any t in (0.505, 1.505]; the first such grid value is 0.51. Applied to the test
    fold: fold 0 → the hard different pair (0.305 < 0.51) is called "same" → 1/2; folds 1-8 → 2/2;
    fold 9 → the hard same pair (2.005 ≥ 0.51) is called "different" → 1/2.
    Mean = (0.5 + 8·1 + 0.5)/10 = 0.9; std = sqrt((2·0.4² + 8·0.1²)/10) = 0.2.
    """
    dist = np.tile([0.505, 1.505], 10)
    issame = np.tile([True, False], 10)
    dist[1] = 0.305
    dist[18] = 2.005
    return dist, issame


def test_hand_computed_folds():
    dist, issame = hand_distances()
    r = V.kfold_accuracy(dist, issame)
    assert r["fold_accuracies"] == [0.5] + [1.0] * 8 + [0.5]
    assert r["fold_thresholds"] == pytest.approx([0.51] * 10)
    assert r["accuracy"] == pytest.approx(0.9)
    assert r["std"] == pytest.approx(0.2)
    assert r["threshold"] == pytest.approx(0.51)


def test_hand_computed_embeddings_flip_and_normalise():
    # 2-D embeddings: image a = (1, 0); image b at angle θ from it; flip copies chosen so that
    # normalise(f(x) + f(flip x)) differs from normalise(f(x)).
    # pair "same": b = (1, 1)  with flip (1, -1) → sum (2, 0) → unit (1, 0) → distance 0
    # pair "diff": b = (0, 1)  with flip (0, 1)  → unit (0, 1) → distance |(1,0)-(0,1)|² = 2
    emb = np.array([[1, 0], [1, 1], [1, 0], [0, 1]] * 10, dtype=np.float32)
    flip = np.array([[1, 0], [1, -1], [1, 0], [0, 1]] * 10, dtype=np.float32)
    issame = np.array([True, False] * 10)
    r = V.verification_metrics(emb, flip, issame)
    np.testing.assert_allclose(r["distances"], np.tile([0.0, 2.0], 10), atol=1e-6)
    assert r["accuracy"] == 1.0 and r["std"] == 0.0
    assert r["fold_thresholds"] == pytest.approx([0.01] * 10)  # first t with 0 < t ≤ 2
    # without flip the "same" pair is at angle 45°: 2 - 2 cos 45° = 0.5858
    r0 = V.verification_metrics(emb, None, issame)
    np.testing.assert_allclose(r0["distances"], np.tile([2 - np.sqrt(2), 2.0], 10), atol=1e-6)
    # xnorm: mean norm of the un-flipped embeddings = (1 + √2 + 1 + 1)/4
    assert r["xnorm"] == pytest.approx((3 + np.sqrt(2)) / 4, rel=1e-6)


# --------------------------------------------------------------------------- against scikit-learn


def sklearn_reference(dist, issame, thresholds):
    """Independent 10-fold computation: fold split by hand, accuracies by sklearn.accuracy_score."""
    n = len(dist)
    sizes = np.full(10, n // 10)
    sizes[: n % 10] += 1  # the KFold contract: first n % k folds one larger
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    accs, ths = [], []
    for k in range(10):
        test = np.arange(bounds[k], bounds[k + 1])
        train = np.setdiff1d(np.arange(n), test)
        train_acc = [accuracy_score(issame[train], dist[train] < t) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accs.append(accuracy_score(issame[test], dist[test] < best))
        ths.append(best)
    return np.array(accs), np.array(ths)


@pytest.mark.parametrize("n,seed", [(613, 1)])  # 613: uneven folds (KFold gives 62×3, 61×7)
def test_matches_independent_sklearn_computation(n, seed):
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    dist = np.where(issame, rng.normal(1.0, 0.35, n), rng.normal(1.6, 0.35, n)).clip(0, 4)
    r = V.kfold_accuracy(dist, issame)
    accs, ths = sklearn_reference(dist, issame, V.THRESHOLDS)
    np.testing.assert_allclose(r["fold_accuracies"], accs, atol=1e-12)
    np.testing.assert_allclose(r["fold_thresholds"], ths, atol=1e-12)
    assert r["accuracy"] == pytest.approx(accs.mean())
    assert r["std"] == pytest.approx(accs.std())
    assert 0.7 < r["accuracy"] < 0.95
    # ROC table: tpr/fpr at t per fold from sklearn's confusion matrix, averaged over folds
    t_idx = 130
    tprs, fprs = [], []
    for k in range(10):
        sizes = np.full(10, n // 10)
        sizes[: n % 10] += 1
        b = np.concatenate([[0], np.cumsum(sizes)])
        sl = slice(b[k], b[k + 1])
        tn, fp, fn, tp = confusion_matrix(issame[sl], dist[sl] < V.THRESHOLDS[t_idx], labels=[False, True]).ravel()
        tprs.append(tp / (tp + fn))
        fprs.append(fp / (fp + tn))
    assert r["roc_tpr"][t_idx] == pytest.approx(np.mean(tprs))
    assert r["roc_fpr"][t_idx] == pytest.approx(np.mean(fprs))


def test_auc_and_tar_at_far_independent():
    rng = np.random.default_rng(3)
    n = 4000
    issame = rng.random(n) < 0.5
    dist = np.where(issame, rng.normal(1.0, 0.3, n), rng.normal(1.7, 0.3, n))
    # AUC = Mann-Whitney U / (n_pos n_neg) with score = -distance
    u = mannwhitneyu(-dist[issame], -dist[~issame]).statistic
    auc_ref = u / (issame.sum() * (~issame).sum())
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(issame, -dist) == pytest.approx(auc_ref)
    tars = V.tar_at_far(dist, issame, fars=(1e-3, 1e-2, 1e-1))
    # brute force: accept when dist <= c for every candidate c; keep those with FAR <= far
    neg, pos = np.sort(dist[~issame]), np.sort(dist[issame])
    for far, key in ((1e-3, "1e-03"), (1e-2, "1e-02"), (1e-1, "1e-01")):
        best = 0.0
        for c in np.concatenate([[-1.0], np.sort(dist)]):
            fa = np.searchsorted(neg, c, side="right") / len(neg)
            if fa <= far:
                best = max(best, np.searchsorted(pos, c, side="right") / len(pos))
        assert tars[key] == pytest.approx(best), far
    assert V.tar_at_far(dist[:100], issame[:100], fars=(1e-3,))["1e-03"] is None  # < 1000 negatives


def test_embedding_path_matches_direct_torch():
    """evaluate_images == a direct computation: [-1,1] scaling, flip along width, sum, normalise."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 16, 16, 3), dtype=torch.uint8, generator=g)
    issame = np.array([True, False] * 10)
    w = torch.randn(3 * 16 * 16, 8, generator=g)

    def embed(x):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16)
        assert x.min() >= -1 and x.max() <= 1
        return x.flatten(1) @ w

    r = V.evaluate_images(embed, images, issame, "toy", batch_size=7, keep_distances=True)
    x = images.permute(0, 3, 1, 2).double() / 127.5 - 1.0
    e = F.normalize(x.flatten(1) @ w.double() + x.flip(3).flatten(1) @ w.double(), dim=1)
    d = ((e[0::2] - e[1::2]) ** 2).sum(1).numpy()
    np.testing.assert_allclose(r["distances"], d, atol=1e-5)
    assert r["name"] == "toy" and r["num_pairs"] == 20
    json.dumps(r)  # JSON-serialisable (the trainer writes it)


# --------------------------------------------------------------------------- real LFW pairs


def test_bad_bin_files(tmp_path, lfw_bin):
    bad = tmp_path / "junk.bin"
    bad.write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match="junk.bin: not a pickle of \\(bins, issame\\)"):
        ES.load_bin(bad)
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(DataError, match="wrong.bin: not a pickle"):
        ES.load_bin(wrong)
    bins, issame = read_bin(lfw_bin)
    short = tmp_path / "short.bin"
    short.write_bytes(pickle.dumps((bins[:5], issame[:3])))
    with pytest.raises(DataError, match="short.bin: 5 images for 3 pairs"):
        ES.load_bin(short)
    broken = tmp_path / "broken.bin"
    write_bin(broken, [bins[0], b"\xff\xd8garbage"] + bins[2:20], issame[:10])
    with pytest.raises(DataError, match="broken.bin image 1: cannot decode") as ei:
        ES.load_bin(broken)
    assert "\n" not in str(ei.value)
    with pytest.raises(DataError, match="does not exist"):
        ES.load_bin(tmp_path / "missing.bin")


# --------------------------------------------------------------------------- checkpoints and CLI


def _tiny_checkpoint(tmp_path, backbone="iresnet18"):
    cfg = load_config([], [f"model.backbone={backbone}", "model.width=0.0625", "model.head.embedding_size=32"])
    net = registry.build_recipe(cfg).net
    ck = tmp_path / "ckpt"
    ck.mkdir()
    dump_config(cfg, ck / "config.yaml")
    torch.save(net.state_dict(), ck / "model.pt")
    return ck, net


def test_cli_verify_checkpoint_dir(tmp_path, lfw_bin, capsys):
    ck, net = _tiny_checkpoint(tmp_path)
    bins, issame = read_bin(lfw_bin)
    small = tmp_path / "small.bin"
    idx = list(range(20)) + list(range(50, 70))  # 20 same + 20 different pairs
    write_bin(small, [bins[j] for i in idx for j in (2 * i, 2 * i + 1)], [issame[i] for i in idx])
    only_same = tmp_path / "only_same.bin"  # one kind of pair: AUC undefined, still reported
    write_bin(only_same, bins[:40], issame[:20])
    out = tmp_path / "res" / "verify.json"
    rc = eval_main(
        ["verify", "--checkpoint", str(ck), "--bin", str(small), str(only_same), "--json", str(out), "--no-progress"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "small: accuracy " in text and " ± " in text and "only_same: accuracy " in text
    data = json.loads(out.read_text())
    assert data["results"][1]["auc"] is None
    assert data["backbone"] == "iresnet18" and data["results"][0]["num_pairs"] == 40
    assert (tmp_path / "res" / "verify_roc.png").stat().st_size > 1000
    # same numbers as the library call on the loaded network
    loaded, _ = load_model(ck)
    net.eval()
    r = ER.evaluate_bin(loaded, small)
    assert r["accuracy"] == data["results"][0]["accuracy"]
    with torch.no_grad():
        x = torch.rand(2, 3, 112, 112) * 2 - 1
        torch.testing.assert_close(loaded(x), net.embed(x))


def test_cli_state_dict_file_and_mismatch(tmp_path, lfw_bin, capsys):
    ck, net = _tiny_checkpoint(tmp_path)
    pth = tmp_path / "backbone.pth"  # arcface_torch's published format: flat names
    names = net.published_names()
    torch.save({names[k]: v for k, v in net.state_dict().items()}, pth)
    m, info = load_model(pth, "iresnet18", width=0.0625, embedding_size=32)
    assert info["backbone"] == "iresnet18"
    with pytest.raises(
        ConfigError,
        match=r"backbone.pth: not a checkpoint of iresnet50 .*first mismatching key "
        r"'layer1.2.bn1.weight' \(missing\)",
    ):
        load_model(pth, "iresnet50", width=0.0625, embedding_size=32)
    with pytest.raises(ConfigError, match=r"first mismatching key 'fc.weight' \(shape"):
        load_model(pth, "iresnet18", width=0.0625, embedding_size=64)
    rc = eval_main(
        [
            "verify",
            "--checkpoint",
            str(pth),
            "--backbone",
            "iresnet34",
            "--width",
            "0.0625",
            "--embedding-size",
            "32",
            "--bin",
            str(lfw_bin),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "backbone.pth" in err and err.count("\n") == 1
    rc = eval_main(["verify", "--checkpoint", str(pth), "--bin", str(lfw_bin)])
    assert rc == 2 and "needs --backbone" in capsys.readouterr().err
    # a checkpoint directory of another architecture
    (ck / "model.pt").unlink()
    torch.save({"conv1.weight": torch.zeros(1)}, ck / "model.pt")
    with pytest.raises(ConfigError, match=r"ckpt/model.pt: not a checkpoint of iresnet18 \(conv plain.*'conv1.weight'"):
        load_model(ck)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"nope")
    rc = eval_main(
        [
            "verify",
            "--checkpoint",
            str(pth),
            "--backbone",
            "iresnet18",
            "--width",
            "0.0625",
            "--embedding-size",
            "32",
            "--bin",
            str(junk),
        ]
    )
    assert rc == 2 and "junk.bin: not a pickle" in capsys.readouterr().err
