"""The one evaluation front-end: :func:`evaluate` (an embedder, sets, degradations → one row per set × degradation).
The trainer's in-training evaluation, the ablation runner's cells, ``pipeline.report`` and the ``verify`` /
``lowres`` commands all call it; the metrics are the protocol modules' (:mod:`pipeline.eval.verify` for pair sets,
:mod:`pipeline.eval.tarfar` for labelled sets).

Images are degraded at their stored size with :func:`pipeline.faces.degrade.degrade_image` (what ``data_prep.bin
degrade`` writes, losslessly, into its copies), then resized to the network's input as :func:`sets.load_bin` resizes,
so a row equals ``verify`` on the written copy. Images are keyed by the sha1 of their bytes: one that recurs (in a set
or across sets) is embedded once per degradation; a cross setting (clean image 1, degraded image 2 of each pair)
reuses the clean and degraded embeddings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.eval.degradations import CLEAN, Degradation
from pipeline.eval.embed import EmbedFn, check_finite, embed_images, stack_images
from pipeline.eval.sets import Decoded, EvalSet
from pipeline.eval.tarfar import all_pairs_metrics
from pipeline.eval.verify import verification_metrics

ROW_KEYS = ("set", "degradation", "kind", "level", "cross")  # what names a row (the rest are its metrics)
Embeddings = dict[tuple, tuple[np.ndarray, np.ndarray]]  # (kind, level, sha1) → (plain, flipped)


def evaluate(
    embed_fn: EmbedFn,
    sets: list[EvalSet],
    degradations=(CLEAN,),
    image_size: int = 112,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool | str = False,
    norms: bool = False,
    keep_distances: bool = False,
    keep_embeddings: bool = False,
) -> dict:
    """Every set under every degradation. ``embed_fn``: float (N, 3, S, S) in [-1, 1] → (N, D), in eval mode.

    Returns ``{"results": [row per (set, degradation)], "norms": [row per (set, image degradation)]}``. A row holds
    ``set``, ``degradation`` (its label), ``kind``, ``level``, ``cross`` and the metrics: a pair set's 10-fold
    verification (:func:`verify.verification_metrics`, without the ROC arrays; ``distances`` with
    ``keep_distances``), a labelled set's TAR at its FARs over all pairs (:func:`tarfar.all_pairs_metrics`). A norm
    row (``norms=True``) holds the mean and (population) sd of the un-normalised embedding's L2 norm over the set's
    distinct images (no flip). ``keep_embeddings``: also ``"embeddings"``: set name → the clean un-flipped
    embeddings in set order (N, D). ``progress``: a bar on a terminal, lines in a log; a string names the work."""
    degradations = list(degradations)
    for s in sets:
        if not s.is_pairs and any(d.cross for d in degradations):
            raise ConfigError(f"{s.name}: a cross degradation needs pairs; '{s.path}' is a labelled image set")
    decoded = [s.decoded() for s in sets]
    wanted = _wanted(decoded, degradations, norms, keep_embeddings)
    tagged = degradations != [CLEAN]  # an error names the degradation when there was a choice
    emb = _embed_wanted(embed_fn, wanted, image_size, batch_size, device, progress)
    results, norm_rows, embeddings = [], [], {}
    for s, d in zip(sets, decoded):
        results += [_row(s, d, deg, emb, device, keep_distances, tagged) for deg in degradations]
        if norms:
            norm_rows += _norm_rows(s, d, degradations, emb)
        if keep_embeddings:
            embeddings[s.name] = np.stack([emb[CLEAN.image_key + (k,)][0] for k in d.keys])
    out = {"results": results, "norms": norm_rows}
    if keep_embeddings:
        out["embeddings"] = embeddings
    return out


def evaluate_bin(
    embed_fn: EmbedFn,
    bin_path: str | Path,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool | str = False,
    image_size: int = 112,
) -> dict:
    """One clean ``.bin`` through :func:`evaluate`: its row, with ``name`` (the file stem)."""
    row = evaluate(embed_fn, [EvalSet.from_bin(bin_path)], [CLEAN], image_size, batch_size, device, progress)
    row = row["results"][0]
    return {"name": row["set"], **metrics_of(row)}


def metrics_of(row: dict) -> dict:
    """A row's metrics without what names it."""
    return {k: v for k, v in row.items() if k not in ROW_KEYS}


def _wanted(
    decoded: list[Decoded], degradations: list[Degradation], norms: bool, keep_embeddings: bool
) -> dict[tuple, dict[str, np.ndarray]]:
    """Image degradation (kind, level) → the distinct images (sha1 → decoded) to embed under it."""
    wanted: dict[tuple, dict[str, np.ndarray]] = {CLEAN.image_key: {}}
    for d in decoded:
        for deg in degradations:
            if deg.cross:  # clean first images, degraded second images
                wanted[CLEAN.image_key].update({k: d.images[k] for k in d.keys[0::2]})
                wanted.setdefault(deg.image_key, {}).update({k: d.images[k] for k in d.keys[1::2]})
            else:
                wanted.setdefault(deg.image_key, {}).update({k: d.images[k] for k in d.keys})
            if norms:
                wanted.setdefault(deg.image_key, {}).update({k: d.images[k] for k in d.keys})
        if keep_embeddings:
            wanted[CLEAN.image_key].update({k: d.images[k] for k in d.keys})
    return {key: images for key, images in wanted.items() if images}


def _embed_wanted(embed_fn, wanted: dict, image_size, batch_size, device, progress) -> Embeddings:
    from tqdm import tqdm

    from pipeline.faces.degrade import degrade_image

    emb: Embeddings = {}
    threads = torch.get_num_threads()
    several = progress is True and len(wanted) > 1  # a bar over the degradations on a terminal (the CLI)
    for (kind, level), images in tqdm(list(wanted.items()), desc="degradations", disable=not several, leave=False):
        if kind == "clean":
            faces = list(images.values())
        else:
            torch.set_num_threads(1)  # one small image at a time, as data_prep.bin degrade runs
            try:
                faces = [degrade_image(im, kind, level) for im in images.values()]
            finally:
                torch.set_num_threads(threads)
        where = Degradation(kind, level).label
        plain, flipped = embed_images(embed_fn, stack_images(faces, where, image_size), batch_size, device, progress)
        for j, sha in enumerate(images):
            emb[(kind, level, sha)] = (plain[j], flipped[j])
    return emb


def _row(s: EvalSet, d: Decoded, deg: Degradation, emb: Embeddings, device, keep_distances: bool, tagged: bool) -> dict:
    """One set under one degradation: its protocol's metrics."""
    keys = [(CLEAN.image_key if deg.cross and i % 2 == 0 else deg.image_key) + (k,) for i, k in enumerate(d.keys)]
    plain = np.stack([emb[k][0] for k in keys])
    flipped = np.stack([emb[k][1] for k in keys])
    name = f"{s.name} [{deg.label}]" if tagged else s.name  # what an error names
    row = {"set": s.name, "degradation": deg.label, "kind": deg.kind, "level": deg.level, "cross": deg.cross}
    if s.is_pairs:
        res = verification_metrics(plain, flipped, d.target, name)
        distances = res.pop("distances")
        row.update({k: v for k, v in res.items() if not k.startswith("roc_")})
        if keep_distances:
            row["distances"] = distances.tolist()
    else:
        check_finite(plain, flipped, name)
        feats = torch.nn.functional.normalize(torch.from_numpy(plain + flipped), dim=1)
        row.update(all_pairs_metrics(feats, d.target, s.fars, device))
    return row


def _norm_rows(s: EvalSet, d: Decoded, degradations: list[Degradation], emb: Embeddings) -> list[dict]:
    rows = []
    for key in dict.fromkeys(deg.image_key for deg in degradations):
        n = np.linalg.norm(np.stack([emb[key + (k,)][0] for k in dict.fromkeys(d.keys)]), axis=1)
        row = {"set": s.name, "degradation": Degradation(*key).label, "kind": key[0], "level": key[1]}
        rows.append({**row, "mean": float(n.mean()), "sd": float(n.std()), "images": int(n.size)})
    return rows
