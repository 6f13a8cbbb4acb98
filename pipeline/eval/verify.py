"""Face verification with the insightface 10-fold protocol (LFW-style pairs).

Protocol (insightface ``eval/verification.py``; stated in ../shared/FACTS.md):

1. embedding of an image = L2-normalise( f(x) + f(flip(x)) ), images scaled to [-1, 1];
2. distance of a pair = squared L2 distance ||e1 - e2||², in [0, 4];
3. candidate thresholds 0, 0.01, …, 3.99; a pair is "same" when distance < threshold;
4. ``KFold(n_splits=10, shuffle=False)`` over the pairs in file order; in each fold the threshold
   with the best accuracy on the 9 training folds (first one on ties, ``np.argmax``) is applied
   to the held-out fold;
5. report the mean and (population) standard deviation of the 10 held-out accuracies.

Also reported: the same protocol without flipping, the per-fold thresholds, the mean embedding
norm ("XNorm"), AUC and TAR at FAR (whole set, no folds: the largest true-accept rate whose
false-accept rate is ≤ FAR), and the ROC for plotting.

Metric code only: :func:`verification_metrics` (embeddings → everything reported), :func:`kfold_accuracy`,
:func:`tar_at_far`, :func:`plot_roc`; :func:`evaluate_images` for images already in memory. Sets, embedding and
degradations are :mod:`pipeline.eval.run`'s (the one front-end every caller uses).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from data_prep.manifest import DataError
from pipeline.eval import tarfar
from pipeline.eval.embed import EmbedFn, check_finite, embed_images

THRESHOLDS = np.arange(0, 4, 0.01)  # insightface: np.arange(0, 4, 0.01)
NUM_FOLDS = 10
FARS = (1e-4, 1e-3, 1e-2, 1e-1)

# --------------------------------------------------------------------------- protocol


def _accuracy_table(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray):
    """Per threshold: (tpr, fpr, accuracy) with prediction 'same' ⇔ dist < threshold."""
    pred = dist[None, :] < thresholds[:, None]  # (T, n)
    tp = (pred & issame).sum(1)
    fp = (pred & ~issame).sum(1)
    tn = (~pred & ~issame).sum(1)
    fn = (~pred & issame).sum(1)
    tpr = np.where(tp + fn == 0, 0.0, tp / np.maximum(tp + fn, 1))
    fpr = np.where(fp + tn == 0, 0.0, fp / np.maximum(fp + tn, 1))
    return tpr, fpr, (tp + tn) / dist.size


def kfold_accuracy(
    dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray = THRESHOLDS, nfolds: int = NUM_FOLDS
) -> dict:
    """The 10-fold protocol on pair distances: best threshold on 9 folds, accuracy on the 10th."""
    dist = np.asarray(dist)
    issame = np.asarray(issame, dtype=bool)
    if len(dist) < nfolds:
        raise DataError(f"{len(dist)} pairs: need at least {nfolds} for {nfolds}-fold verification")
    accs, best, tprs, fprs = [], [], [], []
    for train, test in KFold(n_splits=nfolds, shuffle=False).split(np.arange(len(dist))):
        _, _, acc_train = _accuracy_table(dist[train], issame[train], thresholds)
        b = int(np.argmax(acc_train))
        tpr, fpr, acc_test = _accuracy_table(dist[test], issame[test], thresholds)
        tprs.append(tpr)
        fprs.append(fpr)
        accs.append(float(acc_test[b]))
        best.append(round(float(thresholds[b]), 6))
    return {
        "accuracy": float(np.mean(accs)),
        "std": float(np.std(accs)),
        "fold_accuracies": accs,
        "fold_thresholds": best,
        "threshold": float(np.mean(best)),
        "roc_tpr": np.mean(tprs, 0).tolist(),
        "roc_fpr": np.mean(fprs, 0).tolist(),
    }


def tar_at_far(dist: np.ndarray, issame: np.ndarray, fars=FARS) -> dict[str, float | None]:
    """TAR at each FAR of a pair set (score = -distance), by the one definition, :func:`pipeline.eval.tarfar.tar_at_far`
    (the highest TAR of any threshold whose FAR is ≤ far); None when the set has too few negative pairs to measure
    that FAR (far · negatives < 1). Keys: ``1e-03`` … (TensorBoard: ``val/<set>/tar@far=1e-03``)."""
    issame = np.asarray(issame, dtype=bool)
    score = -np.asarray(dist, dtype=np.float64)
    return {f"{p.far:.0e}": p.tar for p in tarfar.tar_at_far(score[issame], score[~issame], fars)}


def verification_metrics(emb: np.ndarray, emb_flip: np.ndarray | None, issame: np.ndarray, name: str = "set") -> dict:
    """Everything reported for one set, from raw embeddings (N = 2P rows, pair k = rows 2k, 2k+1).

    Non-finite embeddings are a one-line DataError naming ``name`` (:func:`check_finite`)."""
    issame = np.asarray(issame, dtype=bool)
    if emb.shape[0] != 2 * len(issame):
        raise DataError(f"{name}: {emb.shape[0]} embeddings for {len(issame)} pairs")
    check_finite(emb, emb_flip, name)
    both = emb + emb_flip if emb_flip is not None else emb
    e = normalize(both)
    dist = np.sum(np.square(e[0::2] - e[1::2]), axis=1)
    out = kfold_accuracy(dist, issame)
    if emb_flip is not None:
        e0 = normalize(emb)
        d0 = np.sum(np.square(e0[0::2] - e0[1::2]), axis=1)
        r0 = kfold_accuracy(d0, issame)
        out["accuracy_noflip"], out["std_noflip"] = r0["accuracy"], r0["std"]
    out["xnorm"] = float(np.linalg.norm(emb, axis=1).mean())
    out["auc"] = float(roc_auc_score(issame.astype(int), -dist)) if 0 < issame.sum() < len(issame) else None
    out["tar_at_far"] = tar_at_far(dist, issame) if 0 < issame.sum() < len(issame) else {}
    out["num_pairs"] = int(len(issame))
    out["distances"] = dist
    return out


def evaluate_images(
    embed_fn: EmbedFn,
    images_u8: torch.Tensor,
    issame: np.ndarray,
    name: str = "set",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    flip: bool = True,
    progress: bool | str = False,
    keep_distances: bool = False,
) -> dict:
    emb, emb_flip = embed_images(embed_fn, images_u8, batch_size, device, progress)
    res = verification_metrics(emb, emb_flip if flip else None, issame, name)
    dist = res.pop("distances")
    if keep_distances:
        res["distances"] = dist.tolist()
    return {"name": name, **res}


def plot_roc(results: list[dict], issames: list[np.ndarray], dists: list[np.ndarray], path: str | Path) -> None:
    """ROC (TAR vs FAR, log x) of each set into one PNG, drawn by :func:`pipeline.eval.tarfar.plot_roc` (a set with
    one kind of pair only has no ROC and is left out)."""
    curves = []
    for res, same, dist in zip(results, issames, dists):
        same = np.asarray(same, dtype=bool)
        if 0 < same.sum() < len(same):
            score = -np.asarray(dist, dtype=np.float64)
            curves.append((f"{res['name']} (acc {res['accuracy']:.4f})", score[same], score[~same]))
    if curves:
        tarfar.plot_roc(curves, path)
