"""TAR at FAR — the one definition every table uses (verification's ``val/*/tar@far``, the ``tarfar`` and ``ijb``
commands, the ablation runner's image sets) — pair scores over all pairs of a labelled set, and ROC plots.

Every unordered pair of distinct images is scored (cosine similarity of the L2-normalised
flip-summed embeddings of :mod:`pipeline.eval.verify`): a pair of one identity is genuine, a pair
of two identities an impostor. The LFW View-1 dev-test images (1,549 images of 963 people) give
983 genuine and 1,197,943 impostor pairs.

TAR at FAR f, exactly: with N impostor pairs, at most k = the largest integer with k / N ≤ f
impostors may be accepted, so the threshold t is the (k+1)-th highest impostor score and a pair is
accepted when its score is > t (every impostor tied with t is rejected with it); TAR = the
fraction of genuine scores > t. This is the highest TAR of any threshold whose FAR is ≤ f (the
ROC point ``max(tpr[fpr <= f])`` of scikit-learn's ``roc_curve``). A FAR needs f · N ≥ 1
(at least ~1/f impostor pairs); below that the table says ``n/a (only N impostor pairs)``.

The score matrix is walked in blocks of rows over its upper triangle only, so memory is
block × images scores plus the impostor scores themselves (4 bytes each: 4.8 MB for LFW dev-test).

The command (``python -m pipeline.eval tarfar``) lives in :mod:`pipeline.eval.tarfar_cli`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.manifest import DataError
from pipeline.config import ConfigError

FARS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
ALL_PAIRS_FARS = (1e-2, 1e-3, 1e-4)  # what a labelled eval set reports by default (TAR over all its pairs)
DEFAULT_BLOCK = 1024
ROC_POINTS = 200


@dataclass
class TarAtFar:
    far: float  # the FAR asked for
    tar: float | None  # None: fewer than 1/far impostor pairs
    threshold: float | None  # a pair is accepted when its score > threshold
    achieved_far: float | None  # impostors accepted at that threshold / impostor pairs (≤ far)


def count_pairs(labels: np.ndarray) -> tuple[int, int]:
    """(genuine, impostor) unordered pairs of distinct images with these labels."""
    _, per_identity = np.unique(np.asarray(labels), return_counts=True)
    n = int(per_identity.sum())
    genuine = int((per_identity * (per_identity - 1) // 2).sum())
    return genuine, n * (n - 1) // 2 - genuine


def pair_scores(
    feats: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    block: int = DEFAULT_BLOCK,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """(genuine scores, impostor scores) of every pair i < j: inner products of the rows of
    ``feats`` (normalise them for cosine), ``block`` rows against the rows after them at a time."""
    if block < 1:
        raise ConfigError(f"block must be ≥ 1, got {block}")
    x = torch.as_tensor(feats).to(device)
    y = torch.as_tensor(np.unique(np.asarray(labels), return_inverse=True)[1]).to(x.device)
    genuine, impostor = [], []
    for start in range(0, len(x), block):
        rows = slice(start, start + block)
        scores = x[rows] @ x[start:].T  # the columns before `start` were rows of earlier blocks
        upper = torch.ones_like(scores, dtype=torch.bool).triu(1)
        same = y[rows, None] == y[None, start:]
        genuine.append(scores[upper & same].cpu().numpy())
        impostor.append(scores[upper & ~same].cpu().numpy())
    empty = np.empty(0, dtype=np.float32)
    genuine, impostor = np.concatenate([empty, *genuine]), np.concatenate([empty, *impostor])
    return genuine, impostor


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, fars=FARS) -> list[TarAtFar]:
    """TAR at each FAR (definition in the module docstring), thresholds from the impostor scores."""
    n = len(impostor)
    fars = np.asarray(fars, dtype=np.float64)
    if not len(genuine) or not n:
        raise DataError(f"need genuine and impostor pairs, got {len(genuine)} and {n}")
    impostor_up = np.sort(impostor)
    genuine_up = np.sort(genuine)
    # k = the most impostors allowed: largest k with k / n ≤ far, the same division as the ROC's fpr
    allowed = np.searchsorted(np.arange(n + 1) / n, fars, side="right") - 1
    out = []
    for far, k in zip(fars.tolist(), allowed.tolist()):
        if far * n < 1:
            out.append(TarAtFar(far, None, None, None))
            continue
        threshold = float(impostor_up[n - 1 - k]) if k < n else -np.inf  # the (k+1)-th highest
        accepted_genuine = len(genuine_up) - np.searchsorted(genuine_up, threshold, side="right")
        accepted_impostor = n - np.searchsorted(impostor_up, threshold, side="right")
        out.append(TarAtFar(far, accepted_genuine / len(genuine_up), threshold, accepted_impostor / n))
    return out


def far_key(far: float) -> str:
    """``tar@far=1e-03``: the name a TAR at this FAR goes by in tables, JSON and TensorBoard tags."""
    return f"tar@far={far:.0e}"


def parse_far_key(text: str) -> float | None:
    """The FAR of ``tar@far=<f>`` with 0 < f < 1 (any float spelling: 1e-3, 0.001), else None."""
    head, _, value = text.partition("=")
    if head != "tar@far":
        return None
    try:
        far = float(value)
    except ValueError:
        return None
    return far if 0 < far < 1 else None


def all_pairs_metrics(
    feats: np.ndarray | torch.Tensor, labels: np.ndarray, fars=ALL_PAIRS_FARS, device: str | torch.device = "cpu"
) -> dict:
    """TAR at each FAR over every pair of the rows of ``feats`` (L2-normalised embeddings), as
    ``{far_key(far): tar or None}`` (None: too few impostor pairs), plus the pair counts."""
    genuine, impostor = pair_scores(feats, labels, device=device)
    points = tar_at_far(genuine, impostor, fars)
    return {
        **{far_key(p.far): p.tar for p in points},
        "genuine_pairs": int(len(genuine)),
        "impostor_pairs": int(len(impostor)),
    }


def roc_points(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FAR grid, TAR): TAR at ``ROC_POINTS`` FARs spaced on a log scale from 1/impostors to 1."""
    grid = np.logspace(-np.log10(len(impostor)), 0, ROC_POINTS)
    tar = [np.nan if p.tar is None else p.tar for p in tar_at_far(genuine, impostor, grid)]  # nan: far · n < 1
    return grid, np.array(tar)


def plot_roc(curves: list[tuple[str, np.ndarray, np.ndarray]], path: str | Path, title: str = "") -> None:
    """ROC (TAR vs FAR, log x) of each (name, genuine, impostor) into one PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for name, genuine, impostor in curves:
        far, tar = roc_points(genuine, impostor)
        ax.step(far, tar, where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlim(min(1.0 / len(imp) for _, _, imp in curves), 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("FAR")
    ax.set_ylabel("TAR")
    if title:
        ax.set_title(title, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def format_table(names: list[str], results: list[list[TarAtFar]], n_impostor: int) -> str:
    """Rows = FARs, columns = checkpoints ([1], [2], … named below the table)."""
    w = 8
    lines = [f"{'FAR':<7}" + "".join(f"  {f'[{i + 1}]':>{w}}" for i in range(len(names)))]
    for row, far in enumerate(p.far for p in results[0]):
        if results[0][row].tar is None:  # the same image set for every checkpoint: n/a for all
            lines.append(f"{far:<7.0e}  n/a (only {n_impostor} impostor pairs)")
        else:
            lines.append(f"{far:<7.0e}" + "".join(f"  {r[row].tar:>{w}.4f}" for r in results))
    lines += [f"[{i + 1}] {name}" for i, name in enumerate(names)]
    return "\n".join(lines)
