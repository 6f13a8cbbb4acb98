"""The IJB-B / IJB-C release read and aligned (layout and alignment in :mod:`pipeline.eval.ijb`): the meta files
(template/media ids, template pairs, 5-point landmarks and detector scores) as one :class:`IJBProtocol`, and the
ArcFace similarity-transform alignment of a face to 112×112."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.manifest import DataError
from pipeline.config import ConfigError

ALIGNED_SIZE = 112
# ArcFace's reference landmarks in a 112×112 crop (left eye, right eye, nose tip, left and right mouth
# corner; x, y in pixels): insightface's 96×112 reference shifted right by 8 px
ARCFACE_REFERENCE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
TARGETS = ("IJBB", "IJBC")


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
