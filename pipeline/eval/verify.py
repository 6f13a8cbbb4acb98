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

Library entry points: :func:`evaluate_bin` (what the trainer calls), :func:`evaluate_images`,
:func:`load_bin` (decoded and cached), :func:`load_pairs`, :func:`verification_metrics`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from data_prep.manifest import DataError
from pipeline.config import ConfigError
from pipeline.eval import tarfar
from pipeline.faces.io import decode_image, read_bin, read_pairs

THRESHOLDS = np.arange(0, 4, 0.01)  # insightface: np.arange(0, 4, 0.01)
NUM_FOLDS = 10
FARS = (1e-4, 1e-3, 1e-2, 1e-1)

EmbedFn = Callable[[torch.Tensor], torch.Tensor]

_CACHE: dict[tuple, tuple[torch.Tensor, np.ndarray]] = {}
_CACHE_MAX = 8


# --------------------------------------------------------------------------- loading


def stack_images(images: list[np.ndarray], where: str, image_size: int | None) -> torch.Tensor:
    from PIL import Image

    size = image_size or images[0].shape[0]
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        if im.shape[:2] != (size, size):  # insightface resizes mismatching images too
            im = np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
        out[i] = im
    return torch.from_numpy(out)


def load_bin(path: str | Path, image_size: int | None = 112) -> tuple[torch.Tensor, np.ndarray]:
    """Decoded ``.bin``: (uint8 tensor (2P, H, W, 3) RGB, bool array (P,)), cached by path+mtime.

    ``image_size`` resizes images of another size (None keeps the first image's size).
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError:
        raise DataError(f"{path}: .bin file does not exist") from None
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, image_size)
    if key not in _CACHE:
        bins, issame = read_bin(path)
        decoded = [decode_image(b, f"{path} image {i}") for i, b in enumerate(bins)]
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = (stack_images(decoded, str(path), image_size), np.asarray(issame, dtype=bool))
    return _CACHE[key]


def load_pairs(
    pairs_path: str | Path, root: str | Path, image_size: int | None = 112, ext: str = "jpg"
) -> tuple[torch.Tensor, np.ndarray]:
    """LFW pairs.txt + image folder → the same structure as :func:`load_bin` (fold order)."""
    pairs, issame = read_pairs(pairs_path, root, ext)
    decoded = []
    for a, b in pairs:
        decoded += [decode_image(a.read_bytes(), str(a)), decode_image(b.read_bytes(), str(b))]
    return stack_images(decoded, str(pairs_path), image_size), np.asarray(issame, dtype=bool)


# --------------------------------------------------------------------------- embedding


def to_model_input(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB → float (N, 3, H, W) in [-1, 1] (insightface: (x/255 - 0.5)/0.5)."""
    return images_u8.permute(0, 3, 1, 2).float().div(255.0).sub(0.5).div(0.5)


@torch.inference_mode()
def embed_images(
    embed_fn: EmbedFn,
    images_u8: torch.Tensor,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool | str = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, embeddings of the horizontally flipped images), float32 numpy (N, D) each. ``progress``: a bar on
    a terminal, a periodic line with an ETA in a log (:mod:`pipeline.progress`); a string names the work."""
    from pipeline.progress import progress as report

    plain, flipped = [], []
    starts = range(0, len(images_u8), batch_size)
    desc = progress if isinstance(progress, str) else "embed"
    for s in report(starts, len(starts), desc, enabled=bool(progress)):
        x = to_model_input(images_u8[s : s + batch_size]).to(device)
        plain.append(embed_fn(x).float().cpu())
        flipped.append(embed_fn(torch.flip(x, dims=[3])).float().cpu())
    return torch.cat(plain).numpy(), torch.cat(flipped).numpy()


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


def check_finite(emb: np.ndarray, emb_flip: np.ndarray | None, name: str = "set") -> None:
    """One-line DataError naming the set when any embedding (or its flipped twin) holds NaN/inf."""
    bad = ~np.isfinite(emb).all(axis=1)
    if emb_flip is not None:
        bad |= ~np.isfinite(emb_flip).all(axis=1)
    if bad.any():
        raise DataError(
            f"{name}: {int(bad.sum())} of {len(bad)} embeddings are not finite (NaN/inf: a diverged model?)"
        )


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


def evaluate_bin(
    embed_fn: EmbedFn,
    bin_path: str | Path,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool | str = False,
    image_size: int = 112,
    **kw,
) -> dict:
    """Verify on one insightface ``.bin``. ``embed_fn``: float (N,3,112,112) in [-1,1] → (N, D).

    The caller puts its model in eval mode; images of another size are resized to ``image_size``. Returns a JSON-serialisable dict with ``name`` (file
    stem), ``accuracy``, ``std``, ``threshold`` and the extras described in the module docstring.
    """
    images, issame = load_bin(bin_path, image_size)
    return evaluate_images(embed_fn, images, issame, Path(bin_path).stem, batch_size, device, progress=progress, **kw)


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


# --------------------------------------------------------------------------- degraded benchmarks in one call

#: ``--degrade`` grammar: exactly the degradations ``data_prep.bin degrade`` writes as copies
#: (:func:`pipeline.faces.degrade.degrade_image`: Gaussian blur σ, bicubic down-up to S px; ``*_cross``: only
#: the second image of each pair degraded).
DEGRADE_HELP = (
    "clean | blur:SIGMA | lr:PX | cross:PX (first image clean, second at PX) | blur-cross:SIGMA "
    "(first image clean, second blurred) | occ-eyes | occ-mask (sunglasses / face-mask proxy bands, default "
    "geometry) | occ-eyes-cross | occ-mask-cross; the degradations of 'python -m data_prep.bin degrade'"
)
#: occlusions that depend on the image alone (``data_prep.bin`` default geometry), so ``--degrade`` can
#: apply them on the fly; the random ones depend on the image's index and set (written copies only)
OCCLUSION_BANDS = ("occ-eyes", "occ-mask")
RANDOM_OCCLUSIONS = ("occ-black", "occ-noise", "occ-face")


class Degradation(tuple):
    """``(kind, level, cross)``: kind ``clean`` | ``blur`` | ``lr`` | ``occ-eyes`` | ``occ-mask`` (level None);
    ``cross``: only image 2 of a pair."""

    __slots__ = ()

    def __new__(cls, kind: str, level: float | None = None, cross: bool = False):
        return super().__new__(cls, (kind, level, cross))

    kind = property(lambda self: self[0])
    level = property(lambda self: self[1])
    cross = property(lambda self: self[2])

    @property
    def image_key(self) -> tuple:
        """What is done to a degraded image (the same for the full and the cross setting)."""
        return (self.kind, self.level)

    @property
    def label(self) -> str:
        if self.kind == "clean":
            return "clean"
        if self.level is None:  # an occlusion band: no level
            return f"{self.kind}-cross" if self.cross else self.kind
        lvl = f"{self.level:g}"
        if self.cross:
            return f"cross:{lvl}" if self.kind == "lr" else f"{self.kind}-cross:{lvl}"
        return f"{self.kind}:{lvl}"


def parse_degradation(spec: str) -> Degradation:
    """``clean``, ``blur:σ``, ``lr:S``, ``cross:S`` (= ``lr-cross:S``), ``blur-cross:σ``, ``occ-eyes``,
    ``occ-mask`` (``-cross``: second image only); ConfigError otherwise."""
    s = spec.strip().lower()
    if s == "clean":
        return Degradation("clean")
    band = s.removesuffix("-cross")
    if band in OCCLUSION_BANDS:
        return Degradation(band, None, s != band)
    if band.partition(":")[0] in RANDOM_OCCLUSIONS:
        raise ConfigError(
            f"--degrade {spec!r}: random occlusions depend on the image's index and set; write copies with "
            f"'python -m data_prep.bin degrade --occlude {band.partition(':')[0][4:]}' and pass them with --bin"
        )
    head, sep, value = s.partition(":")
    kinds = {
        "blur": ("blur", False),
        "lr": ("lr", False),
        "cross": ("lr", True),
        "lr-cross": ("lr", True),
        "blur-cross": ("blur", True),
    }
    if not sep or head not in kinds:
        raise ConfigError(f"--degrade {spec!r}: expected {DEGRADE_HELP}")
    kind, cross = kinds[head]
    try:
        level = float(value)
    except ValueError:
        raise ConfigError(f"--degrade {spec!r}: level {value!r} is not a number") from None
    if kind == "blur" and not (level > 0 and np.isfinite(level)):
        raise ConfigError(f"--degrade {spec!r}: blur σ must be > 0")
    if kind == "lr" and (level != int(level) or level < 1):
        raise ConfigError(f"--degrade {spec!r}: resolution must be a positive whole number of px")
    return Degradation(kind, int(level) if kind == "lr" else level, cross)


def parse_degradations(specs: list[str]) -> list[Degradation]:
    out = list(dict.fromkeys(parse_degradation(s) for s in specs))  # duplicates once, order kept
    if not out:
        raise ConfigError("--degrade: give at least one degradation")
    return out


def bin_source(path: str | Path) -> tuple[str, list[bytes], np.ndarray]:
    """(name = file stem, encoded images, issame) of a ``.bin``, for :func:`evaluate_degraded`."""
    bins, issame = read_bin(path)
    return Path(path).stem, bins, np.asarray(issame, dtype=bool)


def pairs_source(pairs_path, root, ext: str = "jpg") -> tuple[str, list[bytes], np.ndarray]:
    """The same from an LFW pairs file + image folder (the files' bytes, fold order)."""
    pairs, issame = read_pairs(pairs_path, root, ext)
    return Path(pairs_path).stem, [p.read_bytes() for ab in pairs for p in ab], np.asarray(issame, dtype=bool)


def evaluate_degraded(
    embed_fn: EmbedFn,
    sources: list[tuple[str, list[bytes], np.ndarray]],
    degradations: list[Degradation],
    image_size: int = 112,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
    norms: bool = False,
    keep_distances: bool = False,
) -> dict:
    """10-fold verification of every set under every degradation, each distinct image embedded once
    per degradation.

    ``sources``: ``(name, encoded images, issame)`` (:func:`bin_source`, :func:`pairs_source`).
    Images are degraded at their stored size with :func:`pipeline.faces.degrade.degrade_image` (what
    ``data_prep.bin degrade`` writes, losslessly, into its copies), then resized to ``image_size``
    as :func:`load_bin` resizes, so a row equals ``verify`` on the written copy. Images are keyed by
    the sha1 of their bytes: one that recurs (in a set or across sets) is embedded once; a cross set
    (clean image 1, degraded image 2) reuses the clean and degraded embeddings.

    Returns ``{"results": [row per (set, degradation)], "norms": [row per (set, image degradation)]}``;
    a row holds ``set``, ``degradation`` (its label), the verify metrics; a norm row holds the mean and
    (population) sd of the un-normalised embedding's L2 norm over the set's distinct images (no flip),
    cross settings counted under their degradation (``norms=True`` only).
    """
    import hashlib

    from tqdm import tqdm

    from pipeline.faces.degrade import degrade_image

    keep = ("accuracy", "std", "accuracy_noflip", "std_noflip", "threshold", "auc", "tar_at_far", "xnorm")
    decoded: dict[str, np.ndarray] = {}  # sha1 → decoded image at its stored size
    sets = []
    for name, bins, issame in sources:
        issame = np.asarray(issame, dtype=bool)
        if len(bins) != 2 * len(issame):
            raise DataError(f"{name}: {len(bins)} images for {len(issame)} pairs")
        keys = []
        for i, b in enumerate(bins):
            h = hashlib.sha1(b).hexdigest()
            if h not in decoded:
                decoded[h] = decode_image(b, f"{name} image {i}")
            keys.append(h)
        sets.append((name, keys, issame))

    # which (image, degradation) embeddings are needed
    needed: dict[tuple, dict[str, None]] = {}
    for _, keys, _ in sets:
        for d in degradations:
            needed.setdefault(("clean", None), {})
            if d.cross:
                needed[("clean", None)].update(dict.fromkeys(keys[0::2]))
                needed.setdefault(d.image_key, {}).update(dict.fromkeys(keys[1::2]))
            else:
                needed.setdefault(d.image_key, {}).update(dict.fromkeys(keys))
            if norms:
                needed.setdefault(d.image_key, {}).update(dict.fromkeys(keys))
    emb: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # (kind, level, sha1) → (plain, flipped)
    threads = torch.get_num_threads()
    for (kind, level), shas in tqdm(
        [(k, list(v)) for k, v in needed.items() if v], desc="degradations", disable=not progress, leave=False
    ):
        if kind == "clean":
            imgs = [decoded[h] for h in shas]
        else:
            torch.set_num_threads(1)  # one small image at a time, as data_prep.bin degrade runs
            try:
                imgs = [degrade_image(decoded[h], kind, level) for h in shas]
            finally:
                torch.set_num_threads(threads)
        plain, flipped = embed_images(
            embed_fn, stack_images(imgs, f"{kind}:{level}", image_size), batch_size, device, progress
        )
        for j, h in enumerate(shas):
            emb[(kind, level, h)] = (plain[j], flipped[j])

    results, norm_rows = [], []
    for name, keys, issame in sets:
        for d in degradations:
            per_image = [
                (("clean", None) if d.cross and i % 2 == 0 else d.image_key) + (h,) for i, h in enumerate(keys)
            ]
            e = np.stack([emb[k][0] for k in per_image])
            ef = np.stack([emb[k][1] for k in per_image])
            res = verification_metrics(e, ef, issame, f"{name} [{d.label}]")
            row = {"set": name, "degradation": d.label, "kind": d.kind, "level": d.level, "cross": d.cross}
            row.update({k: res[k] for k in keep if k in res})
            row["num_pairs"] = res["num_pairs"]
            if keep_distances:
                row["distances"] = res["distances"].tolist()
            results.append(row)
        if norms:
            for key in dict.fromkeys(d.image_key for d in degradations):
                n = np.linalg.norm(np.stack([emb[key + (h,)][0] for h in dict.fromkeys(keys)]), axis=1)
                label = Degradation(*key).label
                norm_rows.append(
                    {
                        "set": name,
                        "degradation": label,
                        "kind": key[0],
                        "level": key[1],
                        "mean": float(n.mean()),
                        "sd": float(n.std()),
                        "images": int(n.size),
                    }
                )
    return {"results": results, "norms": norm_rows}


def degraded_table(rows: list[dict], key: str = "set") -> str:
    """Markdown: one line per ``key`` value (set), one column per degradation; accuracy mean ± std."""
    cols = list(dict.fromkeys(r["degradation"] for r in rows))
    by = {(r[key], r["degradation"]): r for r in rows}
    lines = ["| " + " | ".join([key, *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    for name in dict.fromkeys(r[key] for r in rows):
        cells = [
            f"{by[(name, c)]['accuracy']:.4f} ± {by[(name, c)]['std']:.4f}" if (name, c) in by else "—" for c in cols
        ]
        lines.append("| " + " | ".join([str(name), *cells]) + " |")
    return "\n".join(lines)


NORMS_EXPECTED = (
    "expected: about √D for a trained fc head (its BatchNorm1d output; 22.6 at D = 512), lower on degraded faces "
    "(the norm tracks quality, AdaFace); orders of magnitude away = an untrained or broken network"
)


def format_norm(mean: float, sd: float) -> str:
    """``2.260e+01 ± 3.10e+00``: scientific, so 22.6 and 1.5e7 read alike and neither hides in fixed decimals."""
    return f"{mean:.3e} ± {sd:.2e}"


def norms_table(rows: list[dict], key: str = "set") -> str:
    """Markdown: embedding L2 norm (mean ± sd over the distinct images) per degradation level, then what to
    expect (:data:`NORMS_EXPECTED`)."""
    cols = list(dict.fromkeys(r["degradation"] for r in rows))
    by = {(r[key], r["degradation"]): r for r in rows}
    lines = ["| " + " | ".join([key, *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    for name in dict.fromkeys(r[key] for r in rows):
        cells = [format_norm(by[(name, c)]["mean"], by[(name, c)]["sd"]) if (name, c) in by else "—" for c in cols]
        lines.append("| " + " | ".join([str(name), *cells]) + " |")
    return "\n".join(lines + ["", NORMS_EXPECTED])
