"""IJB-B / IJB-C 1:1 verification (template to template), as insightface's IJB evaluation.

Layout (insightface's IJB release, ``IJB_release/IJBC``; ``ijbb_*`` files for IJB-B)::

    ROOT/meta/ijbc_face_tid_mid.txt         <image name> <template id> <media id>    one line per face image
    ROOT/meta/ijbc_template_pair_label.txt  <template 1> <template 2> <label>        1 genuine, 0 impostor
    ROOT/meta/ijbc_name_5pts_score.txt      <image name> <x1 y1 … x5 y5> <face detector score>
    ROOT/loose_crop/<image name>

``--target IJBB | IJBC`` picks the file prefix (default: the one the meta folder holds). Images are
matched between the two image lists by name (insightface pairs their rows by position; the released
files list the same images in the same order, so both readings agree there).

Protocol (insightface ``recognition/_evaluation_/ijb/ijb_11.py`` with its defaults ``use_flip_test``
and ``use_norm_score``; ``use_detector_score`` is ``--use-face-score``):

1. **Alignment**: the similarity transform (rotation, uniform scale, translation; least squares,
   Umeyama 1991, no reflection — what ``skimage.transform.SimilarityTransform.estimate`` computes)
   from the image's 5 landmarks to the ArcFace reference landmarks of a 112×112 crop
   (:data:`ARCFACE_REFERENCE`), and the image warped by it into 112×112 with bilinear interpolation
   and a black border (``cv2.warpAffine(img, M, (112, 112), borderValue=0)``; here in numpy, sampling
   the source at M⁻¹(x, y) with pixel centres at integer coordinates, as OpenCV does). ``--aligned``
   skips this for images that are aligned crops already. A network with another input size gets
   the 112×112 crop resized (bilinear), as every other benchmark here.
2. **Image feature** = f(x) + f(flip(x)), *not* normalised; with ``--use-face-score`` multiplied by
   the image's detector score.
3. **Template feature**: the image features of one media (a video's frames, or one still) are
   averaged, the media features of a template summed, and the sum L2-normalised. Because image
   features are not normalised first, each image weighs in by its feature norm (and detector score):
   this is insightface's ``image2template_feature`` exactly (its normalisation lines are commented
   out), the "norm-weighted" template of the papers.
4. **Score** of a template pair = cosine of the two template features (inner product), in batches
   of pairs.
5. **TAR at FAR** 1e-6 … 1e-1 by :func:`pipeline.eval.tarfar.tar_at_far`: the largest TAR of a
   threshold whose FAR is ≤ f (n/a where f · impostor pairs < 1). insightface's table instead takes
   the ROC point whose FPR is *nearest* to f, which may lie above f, so its numbers can be slightly
   higher. A ROC PNG is written too.

Feature extraction runs on every rank of a ``torchrun`` / ``srun`` launch: rank k of W embeds the
contiguous slice [k·N/W, (k+1)·N/W) of the N distinct images into ``OUT/features/feat_rank<k>.npy``
(flip-summed features, float32) described by ``feat_rank<k>.json`` (a key over the slice's images,
landmarks, model file hashes, input size and alignment mode); rank 0 waits for every rank, checks
each slice's key, merges them and computes everything else. On one process it just runs (rank 0
of 1). A rerun reuses every slice whose key matches (nothing is embedded again); inside a slice,
every ``--cache-every`` images are saved as ``feat_rank<k>.part<j>.npy`` until the slice is done,
so an interrupted slice resumes from its last saved part. ``OUT`` must be visible to every rank
(a shared file system across nodes); another world size slices differently and embeds again.

Outputs in ``--out``: ``scores.npy`` (float64, one score per pair in the pair file's order),
``ijb.json`` (counts and TAR / threshold / achieved FAR per FAR), ``roc.png``, ``features/``.

Example::

    torchrun --nproc_per_node 8 -m pipeline.eval ijb --checkpoint runs/r100 --root IJB_release/IJBC \\
        --out results/ijbc_r100 --use-face-score
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from data_prep.manifest import DataError, sha256_file
from pipeline.config import ConfigError
from pipeline.core.cache import load_array, read_record, save_array, write_record
from pipeline.eval.embed import check_finite, embed_images, read_image, stack_images
from pipeline.eval.ijb_protocol import TARGETS, IJBProtocol, align_face, read_ijb
from pipeline.eval.tarfar import format_table, plot_roc, tar_at_far

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
PAIR_BATCH = 16384  # template pairs scored at a time: 2 × 16384 × 512 float64 = 134 MB
DEFAULT_CACHE_EVERY = 8192
CACHE_VERSION = 1


# --------------------------------------------------------------------------- templates and scores


def template_features(
    image_feats: np.ndarray, image_of_row: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct template ids, their L2-normalised features (float64)) from image features and
    the (image, template, media) rows of the tid_mid file: the rows of one media averaged, the media
    features of a template summed, normalised (a zero sum stays zero, as sklearn's ``normalize``).
    Both steps are sparse matrices applied to the image features (no per-row copy of them)."""
    from scipy import sparse
    from sklearn.preprocessing import normalize

    unique_templates, template_of_row = np.unique(templates, return_inverse=True)
    media_keys, media_of_row = np.unique(np.stack([template_of_row.ravel(), medias], 1), axis=0, return_inverse=True)
    media_of_row = media_of_row.ravel()
    counts = np.bincount(media_of_row, minlength=len(media_keys))
    average = sparse.csr_matrix(  # duplicate (media, image) entries add up: a twice-listed image counts twice
        (1.0 / counts[media_of_row], (media_of_row, image_of_row)), (len(media_keys), len(image_feats))
    )
    total = sparse.csr_matrix(
        (np.ones(len(media_keys)), (media_keys[:, 0], np.arange(len(media_keys)))),
        (len(unique_templates), len(media_keys)),
    )
    return unique_templates, normalize(total @ (average @ image_feats))


def template_pair_scores(
    unique_templates: np.ndarray, feats: np.ndarray, pairs: np.ndarray, batch: int = PAIR_BATCH
) -> np.ndarray:
    """Cosine score of each template pair (features already normalised), ``batch`` pairs at a time."""
    rows = np.searchsorted(unique_templates, pairs)
    scores = np.empty(len(pairs), dtype=np.float64)
    for s in range(0, len(pairs), batch):
        a, b = rows[s : s + batch, 0], rows[s : s + batch, 1]
        scores[s : s + batch] = np.einsum("ij,ij->i", feats[a], feats[b])
    return scores


# --------------------------------------------------------------------------- feature extraction


def _load_face(path: Path, landmarks: np.ndarray | None) -> np.ndarray:
    image = read_image(path)
    return image if landmarks is None else align_face(image, landmarks, str(path))


def embed_faces(
    embed_fn,
    paths: list[Path],
    landmarks: np.ndarray | None,
    image_size: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    pool: ThreadPoolExecutor | None = None,
) -> np.ndarray:
    """Flip-summed, unnormalised features (float32 (N, D)) of face images: decoded, aligned from
    their landmarks (None: taken as aligned), resized to ``image_size``, a batch at a time."""
    out = []
    for s in range(0, len(paths), batch_size):
        batch = paths[s : s + batch_size]
        marks = [None] * len(batch) if landmarks is None else list(landmarks[s : s + batch_size])
        faces = list(pool.map(_load_face, batch, marks)) if pool else [_load_face(*a) for a in zip(batch, marks)]
        plain, flipped = embed_images(embed_fn, stack_images(faces, str(batch[0]), image_size), batch_size, device)
        check_finite(plain, flipped, f"{batch[0]} (batch of {len(batch)})")
        out.append((plain + flipped).astype(np.float32))
    return np.concatenate(out)


def _embed_chunk(embed_fn, paths, landmarks, image_size, batch_size, device, pool) -> np.ndarray:
    """One cache part (a module-level seam: tests count the calls)."""
    return embed_faces(embed_fn, paths, landmarks, image_size, batch_size, device, pool)


def model_fingerprint(info: dict, args) -> dict:
    """What identifies the weights: sha256 of the model's files, and the options of a state-dict file."""
    path = Path(info["checkpoint"])
    files = [path] if path.is_file() else [path / f for f in ("config.yaml", "model.pt") if (path / f).is_file()]
    out = {"files": {str(f.resolve()): sha256_file(f) for f in files}, "input_size": info["input_size"]}
    if info.get("format") != "onnx" and path.is_file():  # a bare state dict: the options define the network
        out.update(backbone=args.backbone, width=args.width, embedding_size=args.embedding_size)
    return out


def slice_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    return rank * n // world, (rank + 1) * n // world


def slice_key(protocol: IJBProtocol, lo: int, hi: int, fingerprint: dict, cache_every: int) -> str:
    h = hashlib.sha256()
    head = {"version": CACHE_VERSION, "lo": lo, "hi": hi, "cache_every": cache_every, "model": fingerprint}
    h.update(json.dumps(head, sort_keys=True).encode())
    h.update(b"aligned" if protocol.landmarks is None else protocol.landmarks[lo:hi].astype("<f8").tobytes())
    for p in protocol.images[lo:hi]:
        h.update(str(p.resolve()).encode() + b"\0")
    return h.hexdigest()


def _load_npy(path: Path, rows: int) -> np.ndarray | None:
    """A cached float32 (rows, D) array (:func:`pipeline.core.cache.load_array`), or None (then embedded again)."""
    array, why = load_array(path, rows)
    if array is None and why != "absent":
        print(f"[ijb] {path}: {why}; embedding again", flush=True)
    return array


def extract_slice(
    embed_fn,
    protocol: IJBProtocol,
    cache_dir: Path,
    rank: int,
    world: int,
    key: str,
    image_size: int,
    batch_size: int,
    device,
    cache_every: int,
    workers: int,
    progress: bool,
) -> np.ndarray:
    """This rank's slice of the image features, from ``feat_rank<rank>.npy`` when its key matches,
    else embedded part by part (parts of an interrupted run with the same key are reused)."""
    from tqdm import tqdm

    lo, hi = slice_bounds(len(protocol.images), rank, world)
    final, meta = cache_dir / f"feat_rank{rank}.npy", cache_dir / f"feat_rank{rank}.json"
    same = read_record(meta, key) is not None
    if same and (cached := _load_npy(final, hi - lo)) is not None:
        print(f"[ijb] rank {rank}: images {lo}-{hi} from {final}", flush=True)
        return cached
    starts = list(range(lo, hi, cache_every))
    parts = [cache_dir / f"feat_rank{rank}.part{j:05d}.npy" for j in range(len(starts))]
    if not same:  # stale files of another model / image list / slicing go first, then the new key
        for p in [final, *cache_dir.glob(f"feat_rank{rank}.part*.npy")]:
            p.unlink(missing_ok=True)
        write_record(meta, key, {"lo": lo, "hi": hi, "world": world})
    feats, reused = [], 0
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    try:
        for start, part in tqdm(
            list(zip(starts, parts)), desc=f"rank {rank} embed", unit="part", disable=not progress, leave=False
        ):
            stop = min(start + cache_every, hi)
            chunk = _load_npy(part, stop - start)
            if chunk is None:
                marks = None if protocol.landmarks is None else protocol.landmarks[start:stop]
                chunk = _embed_chunk(embed_fn, protocol.images[start:stop], marks, image_size, batch_size, device, pool)
                save_array(part, chunk)
            else:
                reused += stop - start
            feats.append(chunk)
    finally:
        if pool:
            pool.shutdown()
    out = np.concatenate(feats) if feats else np.empty((0, 0), np.float32)
    save_array(final, out)
    for p in parts:
        p.unlink(missing_ok=True)
    note = f" ({reused} from saved parts)" if reused else ""
    print(f"[ijb] rank {rank}: embedded images {lo}-{hi}{note} → {final}", flush=True)
    return out


def merge_slices(cache_dir: Path, keys: list[str], bounds: list[tuple[int, int]], own: np.ndarray) -> np.ndarray:
    """Rank 0: every rank's slice (its own in memory), each checked against the key it expects."""
    feats = [own]
    for rank in range(1, len(keys)):
        meta, final = cache_dir / f"feat_rank{rank}.json", cache_dir / f"feat_rank{rank}.npy"
        lo, hi = bounds[rank]
        a = _load_npy(final, hi - lo) if read_record(meta, keys[rank]) is not None else None
        if a is None:
            raise DataError(f"{final}: rank {rank}'s features are missing or do not match this run ({meta})")
        feats.append(a)
    nonempty = [f for f in feats if f.size]
    dims = {f.shape[1] for f in nonempty}
    if len(dims) != 1:
        raise DataError(f"{cache_dir}: the ranks' feature slices have different widths {sorted(dims)}")
    return np.concatenate(nonempty)


# --------------------------------------------------------------------------- command line


def add_ijb_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``ijb`` on the ``python -m pipeline.eval`` sub-parsers; returns the parser."""
    from pipeline.eval.arguments import add_model_arguments

    p = subparsers.add_parser(
        "ijb",
        help="IJB-B / IJB-C 1:1 template verification: TAR at FAR 1e-6…1e-1, ROC (distributed under torchrun)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--root", required=True, help="the IJB folder holding meta/ and loose_crop/ (e.g. IJB_release/IJBC)")
    p.add_argument("--target", choices=TARGETS, help="meta file prefix ijbb_ / ijbc_ (default: the one present)")
    p.add_argument("--images", help="image folder (default ROOT/loose_crop)")
    p.add_argument("--out", required=True, help="output folder: scores.npy, ijb.json, roc.png, features/ (caches)")
    p.add_argument("--aligned", action="store_true", help="images are aligned crops already: no 5-point alignment")
    p.add_argument(
        "--use-face-score",
        action="store_true",
        help="weight each image feature by its detector score (insightface's use_detector_score)",
    )
    p.add_argument("--fars", type=float, nargs="+", default=list(FARS), help="default: 1e-6 … 1e-1")
    p.add_argument(
        "--cache-every",
        type=int,
        default=DEFAULT_CACHE_EVERY,
        help=f"save a rank's features every N images (resume point; default {DEFAULT_CACHE_EVERY})",
    )
    p.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="threads decoding and aligning images"
    )
    return p


def _mkdir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"--out: cannot create {exc.filename or path} ({exc.strerror or type(exc).__name__})"
        ) from None
    return path


def run_ijb(args) -> dict | None:
    """Run the ``ijb`` subcommand; rank 0 prints the table and returns the summary (other ranks: None)."""
    from pipeline import distributed
    from pipeline.core.device import resolve_device

    if any(not 0 < f < 1 for f in args.fars):
        raise ConfigError(f"--fars must lie in (0, 1), got {args.fars}")
    if args.cache_every < 1 or args.workers < 0 or args.batch_size < 1:
        raise ConfigError("--cache-every and --batch-size must be ≥ 1, --workers ≥ 0")
    protocol = read_ijb(args.root, args.target, args.images, args.aligned, args.use_face_score)
    out = _mkdir(Path(args.out))
    cache_dir = _mkdir(out / "features")
    rank, world, _ = distributed.detect()
    if world > 1:
        kind = "cuda" if resolve_device(args.device).startswith("cuda") else "cpu"
        device = distributed.init(kind, timeout_s=12 * 3600).device  # a slow rank may embed for hours
    else:
        device = resolve_device(args.device)
    try:
        return _run(args, protocol, out, cache_dir, rank, world, device)
    finally:
        distributed.cleanup()


def _run(args, protocol: IJBProtocol, out: Path, cache_dir: Path, rank: int, world: int, device) -> dict | None:
    n = len(protocol.images)
    bounds = [slice_bounds(n, r, world) for r in range(world)]
    own, keys, info = _extract_on_every_rank(args, protocol, cache_dir, rank, world, device, bounds)
    if rank != 0:
        return None
    feats = merge_slices(cache_dir, keys, bounds, own)
    if protocol.face_scores is not None:  # float32 × float32, as insightface
        feats = feats * protocol.face_scores.astype(np.float32)[:, None]
    return _score_and_report(args, protocol, feats, info, out, world)


def _extract_on_every_rank(args, protocol: IJBProtocol, cache_dir: Path, rank: int, world: int, device, bounds):
    """(this rank's features, every rank's slice key, the model's info); a failure on any rank ends every rank with
    a one-line error (none waits for a dead one)."""
    from pipeline import collectives
    from pipeline.eval.checkpoint import embedder_from_args

    failure: Exception | None = None
    own, keys, info = None, [], {}
    try:
        net, info = embedder_from_args(args, device)
        fingerprint = model_fingerprint(info, args)
        keys = [slice_key(protocol, lo, hi, fingerprint, args.cache_every) for lo, hi in bounds]
        own = extract_slice(
            net,
            protocol,
            cache_dir,
            rank,
            world,
            keys[rank],
            info["input_size"],
            args.batch_size,
            device,
            args.cache_every,
            args.workers,
            progress=not args.no_progress and rank == 0,
        )
    except (ConfigError, DataError) as exc:
        failure = exc
    if world > 1:  # every rank learns whether any failed, so none waits for a dead one
        failed = collectives.all_reduce(torch.tensor([int(failure is not None)]), "max")
        if failure is None and int(failed.item()):
            raise DataError("feature extraction failed on another rank (its error line says why)")
    if failure is not None:
        raise failure
    return own, keys, info


def _score_and_report(args, protocol: IJBProtocol, feats: np.ndarray, info: dict, out: Path, world: int) -> dict:
    """Rank 0: template features, pair scores, TAR@FAR; the table, ``scores.npy``, ``roc.png``, ``ijb.json``."""
    n = len(protocol.images)
    unique_templates, template_feats = template_features(
        feats, protocol.image_of_row, protocol.templates, protocol.medias
    )
    scores = template_pair_scores(unique_templates, template_feats, protocol.pairs)
    genuine, impostor = scores[protocol.labels == 1], scores[protocol.labels == 0]
    points = tar_at_far(genuine, impostor, args.fars)
    print(
        f"{protocol.target} {args.root}: {n} images, {len(unique_templates)} templates, "
        f"{len(genuine)} genuine and {len(impostor)} impostor template pairs"
        f"{', face scores used' if protocol.face_scores is not None else ''}",
        flush=True,
    )
    print(format_table([info["checkpoint"]], [points], len(impostor)), flush=True)
    save_array(out / "scores.npy", scores)
    plot_roc([(info["checkpoint"], genuine, impostor)], out / "roc.png", f"{protocol.target} 1:1")
    summary = {
        **info,
        "target": protocol.target,
        "files": protocol.files,
        "aligned": protocol.landmarks is None,
        "use_face_score": protocol.face_scores is not None,
        "images": n,
        "templates": len(unique_templates),
        "genuine_pairs": len(genuine),
        "impostor_pairs": len(impostor),
        "world_size": world,
        "points": [asdict(p) for p in points],
    }
    (out / "ijb.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"ROC: {out / 'roc.png'}\nJSON: {out / 'ijb.json'}\nscores: {out / 'scores.npy'}", flush=True)
    return summary
