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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.manifest import DataError, sha256_file
from pipeline.config import ConfigError
from pipeline.eval.tarfar import format_table, plot_roc, tar_at_far
from pipeline.faces.io import decode_image

ALIGNED_SIZE = 112
# ArcFace's reference landmarks in a 112×112 crop (left eye, right eye, nose tip, left and right mouth
# corner; x, y in pixels): insightface's 96×112 reference shifted right by 8 px
ARCFACE_REFERENCE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TARGETS = ("IJBB", "IJBC")
PAIR_BATCH = 16384  # template pairs scored at a time: 2 × 16384 × 512 float64 = 134 MB
DEFAULT_CACHE_EVERY = 8192
CACHE_VERSION = 1


# --------------------------------------------------------------------------- alignment


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2×3 matrix M of the similarity transform (s·R, t; R a proper rotation) minimising
    Σ‖s·R·src_i + t − dst_i‖² (Umeyama 1991, the estimate of skimage's SimilarityTransform)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_src, mu_dst = src.mean(0), dst.mean(0)
    src_c, dst_c = src - mu_src, dst - mu_dst
    var_src = float((src_c**2).sum() / len(src))
    if not var_src > 0:
        raise ValueError("the source points coincide")
    u, sv, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal map is a reflection: flip the weakest axis
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    scale = float(sv @ d) / var_src
    translation = mu_dst - scale * rotation @ mu_src
    return np.hstack([scale * rotation, translation[:, None]])


def warp_affine(image: np.ndarray, m: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """uint8 (H, W, C) → uint8 (size, size, C): output pixel (x, y) = the source bilinearly sampled at
    M⁻¹(x, y) (pixel centres at integer coordinates), 0 outside the source (cv2.warpAffine's
    INTER_LINEAR + BORDER_CONSTANT 0), rounded to the nearest integer."""
    inverse = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.mgrid[0:size, 0:size]
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = sx - x0, sy - y0
    h, w = image.shape[:2]
    out = np.zeros((size, size, image.shape[2]), dtype=np.float64)
    for dy, dx, weight in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        out[inside] += weight[inside, None] * image[yi[inside], xi[inside]]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def align_face(image: np.ndarray, landmarks: np.ndarray, where: str = "image") -> np.ndarray:
    """The 112×112 ArcFace crop of ``image`` from its 5 landmarks ((5, 2) x, y)."""
    try:
        m = similarity_transform(landmarks, ARCFACE_REFERENCE)
    except ValueError as exc:
        raise DataError(f"{where}: cannot align from its 5 landmarks ({exc})") from None
    if not np.isfinite(m).all() or abs(np.linalg.det(m[:, :2])) < 1e-12:
        raise DataError(f"{where}: cannot align from its 5 landmarks (degenerate transform)")
    return warp_affine(image, m)


# --------------------------------------------------------------------------- meta files


@dataclass
class IJBProtocol:
    target: str
    images: list[Path]  # distinct face images, in first-listed order (the order features are extracted in)
    landmarks: np.ndarray | None  # (n_images, 5, 2), None with --aligned
    face_scores: np.ndarray | None  # (n_images,) detector scores, None when not read
    image_of_row: np.ndarray  # per tid_mid row: its image's index
    templates: np.ndarray  # per tid_mid row
    medias: np.ndarray  # per tid_mid row
    pairs: np.ndarray  # (P, 2) template ids
    labels: np.ndarray  # (P,) 1 genuine, 0 impostor
    files: dict[str, str]  # which file each part came from, for messages and the JSON


def meta_paths(root: str | Path, target: str | None = None) -> tuple[str, dict[str, Path]]:
    """(target, {"tid_mid", "pairs", "5pts": path}); ``target=None`` picks the one present."""
    meta = Path(root) / "meta"

    def files(t: str) -> dict[str, Path]:
        low = t.lower()
        return {
            "tid_mid": meta / f"{low}_face_tid_mid.txt",
            "pairs": meta / f"{low}_template_pair_label.txt",
            "5pts": meta / f"{low}_name_5pts_score.txt",
        }

    if target is None:
        present = [t for t in TARGETS if files(t)["tid_mid"].is_file()]
        if len(present) > 1:
            raise ConfigError(f"{meta}: holds both IJB-B and IJB-C meta files; pick one with --target")
        target = present[0] if present else "IJBC"
    return target, files(target)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: meta file does not exist") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text file (byte {exc.start} is not UTF-8)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None


def _lines(path: Path):
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            yield lineno, fields


def _safe_name(name: str, where: str) -> str:
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise DataError(f"{where}: image name {name!r} leaves the image folder")
    return name


def read_tid_mid(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image names, template ids, media ids), one entry per line."""
    names, templates, medias = [], [], []
    for lineno, fields in _lines(path):
        if len(fields) != 3 or not all(f.lstrip("-").isdigit() for f in fields[1:]):
            raise DataError(f"{path}:{lineno}: expected '<image name> <template id> <media id>', got {fields[:4]}")
        names.append(_safe_name(fields[0], f"{path}:{lineno}"))
        templates.append(int(fields[1]))
        medias.append(int(fields[2]))
    if not names:
        raise DataError(f"{path}: lists no images")
    return names, np.array(templates, dtype=np.int64), np.array(medias, dtype=np.int64)


def read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """((P, 2) template ids, (P,) labels) — numpy's C parser (IJB-C lists 15.7 M pairs)."""
    if not path.is_file():
        raise DataError(f"{path}: meta file does not exist")
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments="#")
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: expected '<template 1> <template 2> <label>' lines ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    if table.shape[0] == 0:
        raise DataError(f"{path}: lists no template pairs")
    if table.shape[1] != 3:
        raise DataError(f"{path}: expected 3 columns '<template 1> <template 2> <label>', got {table.shape[1]}")
    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
    if len(bad):
        raise DataError(f"{path}: pair {bad[0] + 1} has label {table[bad[0], 2]} (expected 1 genuine or 0 impostor)")
    return table[:, :2].copy(), table[:, 2].copy()


def read_5pts(path: Path) -> dict[str, tuple[int, np.ndarray, float]]:
    """{image name: (line, (5, 2) landmarks, detector score)}."""
    out: dict[str, tuple[int, np.ndarray, float]] = {}
    for lineno, fields in _lines(path):
        if len(fields) != 12:
            raise DataError(f"{path}:{lineno}: expected '<image name> <10 landmark coordinates> <score>'")
        try:
            values = np.array([float(v) for v in fields[1:]])
        except ValueError:
            raise DataError(f"{path}:{lineno}: landmark or score is not a number: {fields[1:]}") from None
        if not np.isfinite(values).all():
            raise DataError(f"{path}:{lineno}: landmark or score is not finite")
        if fields[0] in out:
            raise DataError(f"{path}:{lineno}: image {fields[0]} listed again (first on line {out[fields[0]][0]})")
        out[fields[0]] = (lineno, values[:10].reshape(5, 2), float(values[10]))
    return out


def read_ijb(
    root: str | Path,
    target: str | None = None,
    images_dir: str | Path | None = None,
    aligned: bool = False,
    face_scores: bool = False,
) -> IJBProtocol:
    """Read and cross-check the meta files (every problem a one-line DataError naming the file):
    each pair's templates have images, every listed image exists, and (unless ``aligned`` without
    ``face_scores``) every image has landmarks and a score."""
    target, files = meta_paths(root, target)
    images_dir = Path(images_dir) if images_dir else Path(root) / "loose_crop"
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: image folder does not exist")
    names, templates, medias = read_tid_mid(files["tid_mid"])
    pairs, labels = read_pairs(files["pairs"])
    n_genuine = int(labels.sum())
    if not 0 < n_genuine < len(labels):
        raise DataError(
            f"{files['pairs']}: {n_genuine} genuine and {len(labels) - n_genuine} impostor pairs; TAR@FAR needs both"
        )
    known = np.unique(templates)
    for column in (0, 1):
        missing = np.flatnonzero(~np.isin(pairs[:, column], known))
        if len(missing):
            i = missing[0]
            raise DataError(
                f"{files['pairs']}: pair {i + 1} ({pairs[i, 0]} {pairs[i, 1]}): template {pairs[i, column]} "
                f"has no images in {files['tid_mid']}"
            )
    distinct = list(dict.fromkeys(names))
    index = {name: i for i, name in enumerate(distinct)}
    paths = [images_dir / name for name in distinct]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: image listed in {files['tid_mid']} does not exist")
    landmarks = scores = None
    if not aligned or face_scores:
        table = read_5pts(files["5pts"])
        for name in distinct:
            if name not in table:
                raise DataError(f"{files['5pts']}: no landmarks and score for image {name} (in {files['tid_mid']})")
        if not aligned:
            landmarks = np.stack([table[name][1] for name in distinct])
        if face_scores:
            scores = np.array([table[name][2] for name in distinct])
    return IJBProtocol(
        target=target,
        images=paths,
        landmarks=landmarks,
        face_scores=scores,
        image_of_row=np.array([index[n] for n in names], dtype=np.int64),
        templates=templates,
        medias=medias,
        pairs=pairs,
        labels=labels,
        files={k: str(v) for k, v in files.items()} | {"images": str(images_dir)},
    )


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
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    image = decode_image(data, str(path))
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
    from pipeline.eval.embed import check_finite, embed_images, stack_images

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


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def _load_npy(path: Path, rows: int) -> np.ndarray | None:
    """A cached float32 (rows, D) array, or None when absent or unreadable (then embedded again)."""
    if not path.is_file():
        return None
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        print(f"[ijb] {path}: unreadable cache ({type(exc).__name__}); embedding again", flush=True)
        return None
    if a.dtype != np.float32 or a.ndim != 2 or a.shape[0] != rows:
        print(f"[ijb] {path}: cache holds {a.dtype} {a.shape}, expected {rows} rows; embedding again", flush=True)
        return None
    return a


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
    try:
        same = json.loads(meta.read_text())["key"] == key
    except (OSError, ValueError, KeyError, TypeError):
        same = False
    if same and (cached := _load_npy(final, hi - lo)) is not None:
        print(f"[ijb] rank {rank}: images {lo}-{hi} from {final}", flush=True)
        return cached
    starts = list(range(lo, hi, cache_every))
    parts = [cache_dir / f"feat_rank{rank}.part{j:05d}.npy" for j in range(len(starts))]
    if not same:  # stale files of another model / image list / slicing go first, then the new key
        for p in [final, *cache_dir.glob(f"feat_rank{rank}.part*.npy")]:
            p.unlink(missing_ok=True)
        meta_tmp = meta.with_name(f".{meta.name}.tmp{os.getpid()}")
        meta_tmp.write_text(json.dumps({"key": key, "lo": lo, "hi": hi, "world": world}) + "\n")
        os.replace(meta_tmp, meta)
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
                _save_npy(part, chunk)
            else:
                reused += stop - start
            feats.append(chunk)
    finally:
        if pool:
            pool.shutdown()
    out = np.concatenate(feats) if feats else np.empty((0, 0), np.float32)
    _save_npy(final, out)
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
        try:
            ok = json.loads(meta.read_text())["key"] == keys[rank]
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        a = _load_npy(final, hi - lo) if ok else None
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
        kind = "cpu" if args.device == "cpu" else ("cuda" if torch.cuda.is_available() else "cpu")
        device = distributed.init(kind, timeout_s=12 * 3600).device  # a slow rank may embed for hours
    else:
        device = resolve_device(args.device)
    try:
        return _run(args, protocol, out, cache_dir, rank, world, device)
    finally:
        distributed.cleanup()


def _run(args, protocol: IJBProtocol, out: Path, cache_dir: Path, rank: int, world: int, device) -> dict | None:
    from pipeline import collectives
    from pipeline.eval.checkpoint import embedder_from_args

    n = len(protocol.images)
    bounds = [slice_bounds(n, r, world) for r in range(world)]
    failure: Exception | None = None
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
    if rank != 0:
        return None
    feats = merge_slices(cache_dir, keys, bounds, own)
    if protocol.face_scores is not None:  # float32 × float32, as insightface
        feats = feats * protocol.face_scores.astype(np.float32)[:, None]
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
    _save_npy(out / "scores.npy", scores)
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
