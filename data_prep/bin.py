"""Verification sets in insightface's ``.bin`` format: read, write, build from pairs.txt, degrade.

Format (../shared/FACTS.md): ``pickle.dump((bins, issame_list))``; ``bins`` holds two encoded
images per pair, consecutive (pair k = ``bins[2k]``, ``bins[2k+1]``); ``issame_list`` one bool per
pair. Files written by Python 2 insightface load with ``pickle.load(f, encoding="bytes")``.

A ``.bin`` is read by :func:`read_bin` alone, with a restricted unpickler (:class:`BinUnpickler`):
a pickle may name only the globals that bytes, bools and numpy arrays/scalars need (numpy's array
and scalar reconstructors, ``numpy.dtype``/``ndarray``, ``bytes``/``bytearray``, and ``_codecs.encode``
with latin-1, which Python 3 protocol-2 pickles use for bytes); any other global (``os.system``,
``builtins.eval``, …) is refused before it is called: a one-line DataError naming the file and the global.

LFW ``pairs.txt`` layouts read by :func:`read_pairs`:

- View 1 (``pairsDevTrain.txt`` / ``pairsDevTest.txt``): first line ``N``, then ``N`` matched lines
  ``name n1 n2`` and ``N`` mismatched lines ``name1 n1 name2 n2``;
- View 2 (``pairs.txt``): first line ``F N``, then F folds, each ``N`` matched then ``N`` mismatched.

Images live at ``ROOT/name/name_%04d.jpg``. Pairs come back in *fold order*, the order the
insightface 10-fold protocol (KFold without shuffle) expects: View 2 as written; View 1 split into
10 folds, fold k = matched pairs k·N/10 … (k+1)·N/10-1 then mismatched pairs of the same range
(the order of ``lfw_devtest_112.bin``).

Degraded copies (``degrade`` subcommand) are re-encoded as **PNG**: lossless, so a degraded
image is exactly the degradation of the decoded original rounded to uint8, and the benchmark
measures blur / low resolution alone, without JPEG artefacts added on top. In the cross-resolution
variants the first image of every pair keeps its original bytes.

Occluded copies (``degrade --occlude KIND ...``; ``<stem>_occ-KIND.bin``) are a *synthetic proxy*
for occlusion: the LCD paper evaluates on real occlusion (face masks, sunglasses), which a flat
band or rectangle only imitates. Kinds, for insightface-aligned faces (ArcFace 5-point template
at 112 px: eyes y≈51.6, nose tip y≈71.7, mouth corners y≈92.3, x 38–74; every geometry option
is in template px at 112 and scaled to the image's size):

- ``black`` / ``noise`` / ``face``: one random rectangle per image, filled with zeros, uniform
  random pixels, or the same rectangle of *another* image of the set (a donor whose bytes differ,
  drawn by the RNG). Area fraction ~ U(``--occ-area``), width/height ratio log-uniform in
  ``--occ-aspect``, position uniform inside the image. The three kinds use the same rectangle for
  the same image, so they differ only in the fill;
- ``eyes`` (sunglasses proxy): a black band over both eyes, rows eye-y ± ``--eye-half-height``,
  columns ``--eye-x``;
- ``mask`` (face-mask proxy): a flat ``--mask-color`` band from ``--mask-top`` (just below the
  nose tip) to the bottom of the image (the chin), full width.

Randomness is a function of (``--seed``, image index in the set) only (numpy
``default_rng([seed, index, stream])``), so an image's occlusion does not depend on which other
images are processed or in which order. ``degrade-images`` writes the same degradations for a
folder of ``<identity>/<image>`` files (the index is the image's position in the order
``pipeline.eval tarfar --images`` reads the folder), as PNG in the same layout, one sub-folder per
degradation, so that ``tarfar --images OUT/occ-eyes`` runs unchanged. The parameters of every
occluded copy are written beside it (``<copy>.json`` / ``OUT/occ-KIND/occlusion.json``).

CLI::

    python -m data_prep.bin info F.bin
    python -m data_prep.bin from-pairs --pairs pairsDevTest.txt --root devtest_112 --out lfw.bin
    python -m data_prep.bin degrade --bin lfw.bin --out-dir D --blur 1 2 3 --lowres 7 14 20 --cross
    python -m data_prep.bin degrade --bin lfw.bin --out-dir D --occlude black noise face eyes mask --seed 0 --cross
    python -m data_prep.bin degrade-images --images devtest_112 --out-dir D --occlude eyes mask black
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import pickle
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_prep.manifest import DataError

NUM_FOLDS = 10


# --------------------------------------------------------------------------- .bin read / write


def _as_bytes(item, path, index: int) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 2 and item.shape[1] == 1:
        return item.tobytes()  # cv2.imencode's (N, 1) buffer
    if isinstance(item, str):  # a Python 2 str unpickled with encoding="latin1"
        return item.encode("latin1")
    raise DataError(f"{path}: image {index} is a {type(item).__name__}, not encoded image bytes")


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global that a ``.bin`` never holds (raised before anything is called)."""

    def __init__(self, qualname: str, args: tuple | None = None):
        self.qualname = qualname
        self.detail = f" called with ({', '.join(_describe(a) for a in args)})" if args is not None else ""
        super().__init__(qualname + self.detail)


def _describe(arg) -> str:
    return repr(arg) if isinstance(arg, str) and len(arg) <= 20 else type(arg).__name__


def _latin1_encode(text="", encoding="latin1", errors="strict"):
    """``_codecs.encode`` as Python 3 protocol-0/2 pickles call it for ``bytes`` (latin-1 only)."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise RefusedGlobal("_codecs.encode", (text, encoding))
    return text.encode("latin1", errors)


def _data_only(kind: type):
    """``bytes`` / ``bytearray`` from what a pickle passes them (bytes, or str + encoding), never a size."""

    def make(*args):
        if len(args) > 2 or (args and not isinstance(args[0], (bytes, bytearray, str))):
            raise RefusedGlobal(f"builtins.{kind.__name__}", args)
        return kind(*args)

    return make


def _numpy_global(name: str):
    """numpy's own reconstructor ``name`` from ``numpy._core`` (numpy 2) or ``numpy.core`` (numpy 1)."""
    import importlib

    for mod in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{mod}.{name.split('.')[0]}"), name.split(".")[1])
        except (ImportError, AttributeError):
            continue
    raise RefusedGlobal(f"numpy._core.{name}", ())  # not in this numpy


#: (module, name) → what it resolves to; ``numpy.core`` (numpy 1 writers) and ``numpy._core`` (numpy 2)
#: are the same functions; ``__builtin__`` is Python 2's ``builtins``.
_ALLOWED = {
    **{
        (f"{core}.{mod}", fn): f"{mod}.{fn}"
        for core in ("numpy.core", "numpy._core")
        for mod, fn in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
    },
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    **{(b, t): t for b in ("builtins", "__builtin__") for t in ("bytes", "bytearray")},
    ("_codecs", "encode"): "encode",
}


class BinUnpickler(pickle.Unpickler):
    """Unpickles what an insightface ``.bin`` holds and nothing else: every global the stream names
    goes through :meth:`find_class`, which admits only :data:`_ALLOWED` (see the module docstring)."""

    def __init__(self, file):
        super().__init__(file, encoding="bytes")  # Python 2 str → bytes, as insightface loads them

    def find_class(self, module: str, name: str):
        what = _ALLOWED.get((module, name))
        if what is None:
            raise RefusedGlobal(f"{module}.{name}")
        if what == "ndarray":
            return np.ndarray
        if what == "dtype":
            return np.dtype
        if what == "encode":
            return _latin1_encode
        if what in ("bytes", "bytearray"):
            return _data_only(bytes if what == "bytes" else bytearray)
        return _numpy_global(what)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent IDs are not part of a .bin")


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def read_bin(path: str | Path) -> tuple[list[bytes], list[bool]]:
    """``(bins, issame)`` of an insightface ``.bin``; DataError (one line, naming the file) if bad.

    The only place a ``.bin`` is unpickled; a pickle that names any global other than what bytes,
    bools and numpy arrays need is refused without calling anything (:class:`BinUnpickler`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: .bin file does not exist")
    try:
        with open(path, "rb") as f:
            obj = BinUnpickler(f).load()
    except RefusedGlobal as exc:
        raise DataError(
            f"{path}: refused pickle global '{exc.qualname}'{exc.detail} "
            "(a .bin holds only bytes, bools and numpy arrays)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a .bin"
        raise DataError(f"{path}: not a pickle of (bins, issame) ({type(exc).__name__}: {_one_line(exc)})") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataError(f"{path}: not a pickle of (bins, issame) (got {type(obj).__name__})")
    bins, issame = obj
    try:
        bins = [_as_bytes(b, path, i) for i, b in enumerate(bins)]
        issame_arr = np.asarray(issame)
    except TypeError:
        raise DataError(f"{path}: not a pickle of (bins, issame) (bins or issame is not a sequence)") from None
    if issame_arr.ndim != 1 or not (issame_arr.dtype == bool or np.issubdtype(issame_arr.dtype, np.integer)):
        raise DataError(f"{path}: issame must be a list of booleans (got dtype {issame_arr.dtype})")
    if issame_arr.dtype != bool and not np.isin(issame_arr, (0, 1)).all():
        raise DataError(f"{path}: issame holds values other than 0/1")
    if len(bins) != 2 * len(issame_arr):
        raise DataError(f"{path}: {len(bins)} images for {len(issame_arr)} pairs (expected {2 * len(issame_arr)})")
    if not bins:
        raise DataError(f"{path}: holds no pairs")
    return bins, [bool(x) for x in issame_arr]


def write_bin(path: str | Path, bins: list[bytes], issame: list[bool]) -> None:
    """Write an insightface ``.bin`` (protocol 4) atomically: temporary name, then rename."""
    path = Path(path)
    if len(bins) != 2 * len(issame):
        raise DataError(f"{path}: {len(bins)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(([bytes(b) for b in bins], [bool(x) for x in issame]), f, protocol=4)
    tmp.replace(path)


MIN_SIDE, MAX_SIDE = 8, 4096  # px: outside, a file is not a face crop (a 1×1 placeholder, a whole photograph)


def decode_image(data: bytes, where: str = "image") -> np.ndarray:
    """Encoded bytes → uint8 RGB array (H, W, 3); a DataError naming ``where`` if empty, undecodable, or of a size
    no face crop has (a side under MIN_SIDE or over MAX_SIDE px: resizing it would hide the mistake)."""
    from PIL import Image

    if not data:
        raise DataError(f"{where}: cannot decode image (the file is 0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if min(w, h) < MIN_SIDE or max(w, h) > MAX_SIDE:
                raise DataError(
                    f"{where}: a {w}×{h} px image is not a face crop (sides must lie in [{MIN_SIDE}, {MAX_SIDE}] px); "
                    "align and crop the faces first (insightface's 112×112)"
                )
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data
        if "cannot identify image file" in str(exc):  # PIL names a BytesIO object's address here
            raise DataError(
                f"{where}: cannot decode image (not an image: unknown format or truncated header)"
            ) from None
        raise DataError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from None


def encode_png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=1)  # 2 ms, ~16 KB at 112 px
    return buf.getvalue()


# --------------------------------------------------------------------------- pairs.txt


def read_pairs(
    pairs_path: str | Path, root: str | Path, ext: str = "jpg", check_files: bool = True
) -> tuple[list[tuple[Path, Path]], list[bool]]:
    """LFW pairs file → (image path pairs, issame) in fold order (see the module docstring)."""
    pairs_path, root = Path(pairs_path), Path(root)
    if not pairs_path.is_file():
        raise DataError(f"{pairs_path}: pairs file does not exist")
    if check_files and not root.is_dir():
        raise DataError(f"{root}: image root does not exist")
    lines = [(i + 1, ln.split()) for i, ln in enumerate(pairs_path.read_text().splitlines()) if ln.strip()]
    if not lines:
        raise DataError(f"{pairs_path}: empty pairs file")
    head_no, head = lines[0]
    try:
        header = [int(x) for x in head]
    except ValueError:
        raise DataError(
            f"{pairs_path} line {head_no}: header must be 'N' (View 1) or 'FOLDS N' (View 2), got {' '.join(head)!r}"
        ) from None
    if len(header) == 1:
        folds, per = 1, header[0]
    elif len(header) == 2:
        folds, per = header
    else:
        raise DataError(f"{pairs_path} line {head_no}: header must be 'N' or 'FOLDS N'")
    body = lines[1:]
    if len(body) != 2 * folds * per:
        raise DataError(f"{pairs_path}: header promises {2 * folds * per} pairs, file has {len(body)}")

    def img(name: str, num: str, line_no: int) -> Path:
        try:
            n = int(num)
        except ValueError:
            raise DataError(f"{pairs_path} line {line_no}: image number {num!r} is not an integer") from None
        p = root / name / f"{name}_{n:04d}.{ext}"
        if check_files and not p.is_file():
            raise DataError(f"{pairs_path} line {line_no}: image {p} does not exist")
        return p

    parsed: list[tuple[tuple[Path, Path], bool]] = []
    for k, (line_no, f) in enumerate(body):
        expect_same = (k % (2 * per)) < per
        if len(f) == 3 and expect_same:
            parsed.append(((img(f[0], f[1], line_no), img(f[0], f[2], line_no)), True))
        elif len(f) == 4 and not expect_same:
            parsed.append(((img(f[0], f[1], line_no), img(f[2], f[3], line_no)), False))
        else:
            want = "'name n1 n2' (matched)" if expect_same else "'name1 n1 name2 n2' (mismatched)"
            raise DataError(f"{pairs_path} line {line_no}: expected {want}, got {' '.join(f)!r}")
    if folds == 1:  # View 1: interleave into NUM_FOLDS folds of matched-then-mismatched
        same, diff = parsed[:per], parsed[per:]
        edges = np.linspace(0, per, NUM_FOLDS + 1).round().astype(int)
        parsed = []
        for a, b in zip(edges[:-1], edges[1:]):
            parsed += same[a:b] + diff[a:b]
    return [p for p, _ in parsed], [s for _, s in parsed]


def bin_from_pairs(pairs_path, root, out, ext: str = "jpg") -> int:
    """Build a ``.bin`` from pairs.txt + image folder, keeping each file's original bytes."""
    pairs, issame = read_pairs(pairs_path, root, ext)
    bins = []
    for a, b in pairs:
        bins += [a.read_bytes(), b.read_bytes()]
    write_bin(out, bins, issame)
    return len(issame)


# --------------------------------------------------------------------------- degraded copies


def _fmt(x: float) -> str:
    return f"{x:g}"


def degrade_image(img: np.ndarray, kind: str, level: float | None) -> np.ndarray:
    """uint8 (H,W,3) → degraded uint8 via pipeline.data.degrade, on values 0..255, rounded.

    ``occ-eyes`` / ``occ-mask`` (``level`` unused) are the default-geometry bands of
    :func:`occlude_image`; they depend on the image alone. The random occlusions need the image's
    index and its set: :func:`degrade_in_set`."""
    if kind in ("occ-eyes", "occ-mask"):
        return occlude_image(img, kind[4:], OcclusionParams())
    if kind.startswith("occ-"):
        raise ValueError(f"{kind} depends on the image's index and set: use degrade_in_set")
    import torch

    from pipeline.data.degrade import bicubic_down_up, gaussian_blur

    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float()
    if kind == "blur":
        y = gaussian_blur(x, float(level))
    elif kind == "lr":
        y = bicubic_down_up(x, int(level))
    else:
        raise ValueError(f"unknown degradation {kind!r}")
    return y.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def degradation_tag(kind: str, level: float | None) -> str:
    """``blur2``, ``lr14``, ``occ-eyes``: the suffix of a degraded copy's name."""
    return kind if level is None else f"{kind}{_fmt(level)}"


def degraded_name(stem: str, kind: str, level: float | None, cross: bool) -> str:
    return f"{stem}_{degradation_tag(kind, level)}{'_cross' if cross else ''}.bin"


def degradation_jobs(blur=(), lowres=(), occlude=(), where: str = "degrade") -> list[tuple[str, float | None]]:
    """``(kind, level)`` per requested degradation; DataError (one line) on a bad level or kind."""
    jobs = [("blur", s) for s in blur] + [("lr", s) for s in lowres]
    for kind, level in jobs:
        if (kind == "blur" and level <= 0) or (kind == "lr" and (int(level) != level or level < 1)):
            raise DataError(f"{where}: bad degradation level {kind} {level}")
    for kind in occlude:
        if kind not in OCCLUSION_KINDS:
            raise DataError(
                f"--occlude {kind!r}: unknown occlusion kind (expected one of {', '.join(OCCLUSION_KINDS)})"
            )
    return jobs + [(f"occ-{k}", None) for k in dict.fromkeys(occlude)]


def degrade_bin(
    bin_path,
    out_dir,
    blur=(),
    lowres=(),
    cross: bool = False,
    full: bool = True,
    progress: bool = True,
    occlude=(),
    occlusion: OcclusionParams | None = None,
) -> list[Path]:
    """Write degraded copies of ``bin_path`` into ``out_dir``; returns the written paths.

    For each σ in ``blur``, each size in ``lowres`` and each kind in ``occlude``:
    ``<stem>_blurσ.bin`` / ``<stem>_lrS.bin`` / ``<stem>_occ-KIND.bin`` (both images of every pair
    degraded) when ``full``, and ``..._cross.bin`` (only the second image of each pair degraded,
    the first kept byte-identical) when ``cross``. ``occlusion``: the occlusion geometry and seed
    (defaults: :class:`OcclusionParams`), also written to ``<copy>.json``.
    """
    import torch

    bin_path, out_dir = Path(bin_path), Path(out_dir)
    occlusion = occlusion or OcclusionParams()
    occlusion.validate()
    jobs = degradation_jobs(blur, lowres, occlude, str(bin_path))
    bins, issame = read_bin(bin_path)
    images = [decode_image(b, f"{bin_path} image {i}") for i, b in enumerate(bins)]
    donors = DonorPool([hashlib.sha1(b).hexdigest() for b in bins])
    written = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one small image at a time: intra-op threads only add overhead
    try:
        for kind, level in jobs:
            written += _degrade_one(
                bin_path, out_dir, bins, issame, images, kind, level, cross, full, progress, donors, occlusion
            )
    finally:
        torch.set_num_threads(threads)
    return written


def _degrade_one(
    bin_path, out_dir, bins, issame, images, kind, level, cross, full, progress, donors, occlusion
) -> list[Path]:
    """One degradation level: the full copy and/or the cross-resolution copy."""
    from tqdm import tqdm

    written = []
    todo = range(len(bins)) if full else range(1, len(bins), 2)
    degraded = {
        i: encode_png(degrade_in_set(images, donors, i, kind, level, occlusion))
        for i in tqdm(
            todo, desc=f"{bin_path.stem} {degradation_tag(kind, level)}", unit="img", disable=not progress, leave=False
        )
    }
    outs = []
    if full:
        outs.append(out_dir / degraded_name(bin_path.stem, kind, level, False))
        write_bin(outs[-1], [degraded[i] for i in range(len(bins))], issame)
    if cross:
        outs.append(out_dir / degraded_name(bin_path.stem, kind, level, True))
        write_bin(outs[-1], [bins[i] if i % 2 == 0 else degraded[i] for i in range(len(bins))], issame)
    for out in outs:
        written.append(out)
        if kind.startswith("occ-"):  # the file name holds the kind only: seed and geometry go beside it
            write_occlusion_record(
                out.with_suffix(".json"), kind, occlusion, source=bin_path, cross=out.stem.endswith("_cross")
            )
    return written


# --------------------------------------------------------------------------- occlusion (synthetic proxy)

#: insightface's ArcFace 5-point template at 112×112 (x, y): left eye, right eye, nose tip, mouth corners.
ARCFACE_TEMPLATE_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)
TEMPLATE_SIZE = 112
OCCLUSION_KINDS = ("black", "noise", "face", "eyes", "mask")
MASK_COLORS = {"blue": (173, 216, 230), "white": (240, 240, 240), "black": (0, 0, 0)}  # blue: a surgical mask
# independent random streams per image: the rectangle must not shift when the fill changes kind
_RECT_STREAM, _FILL_STREAM, _DONOR_STREAM = 0, 1, 2


@dataclass(frozen=True)
class OcclusionParams:
    """Seed and geometry of the occlusions; lengths in template px at 112 (scaled to the image)."""

    seed: int = 0
    area: tuple[float, float] = (0.1, 0.3)  # random rectangle: fraction of the image area
    aspect: tuple[float, float] = (0.5, 2.0)  # random rectangle: width / height, log-uniform
    eye_half_height: float = 11.0  # eye band: rows eye-y ± this (≈ eyebrows to cheekbones)
    eye_x: tuple[float, float] = (24.0, 88.0)  # eye band: columns (both eyes, x 38–74, and the frames)
    mask_top: float = 76.0  # mask band: first row (the nose tip is at y 71.7); down to the chin
    mask_color: tuple[int, int, int] = MASK_COLORS["blue"]

    def validate(self) -> OcclusionParams:
        """self, or DataError (one line) naming the CLI option that is out of range."""
        (a0, a1), (r0, r1), (x0, x1) = self.area, self.aspect, self.eye_x
        checks = (
            (isinstance(self.seed, int) and self.seed >= 0, "--seed", self.seed, "must be an integer ≥ 0"),
            (0 < a0 <= a1 <= 1, "--occ-area", f"{a0:g} {a1:g}", "must satisfy 0 < MIN ≤ MAX ≤ 1"),
            (0 < r0 <= r1 < math.inf, "--occ-aspect", f"{r0:g} {r1:g}", "must satisfy 0 < MIN ≤ MAX"),
            (0 < self.eye_half_height < math.inf, "--eye-half-height", f"{self.eye_half_height:g}", "must be > 0"),
            (0 <= x0 < x1 <= TEMPLATE_SIZE, "--eye-x", f"{x0:g} {x1:g}", f"must satisfy 0 ≤ X0 < X1 ≤ {TEMPLATE_SIZE}"),
            (
                0 <= self.mask_top < TEMPLATE_SIZE,
                "--mask-top",
                f"{self.mask_top:g}",
                f"must lie in [0, {TEMPLATE_SIZE})",
            ),
            (
                len(self.mask_color) == 3 and all(0 <= c <= 255 for c in self.mask_color),
                "--mask-color",
                ",".join(map(str, self.mask_color)),
                "must be 3 values in 0..255",
            ),
        )
        for ok, option, value, rule in checks:
            if not ok:
                raise DataError(f"{option} {value}: {rule}")
        return self


def parse_mask_color(text: str) -> tuple[int, int, int]:
    """``blue`` | ``white`` | ``black`` | ``R,G,B``; DataError naming ``--mask-color`` otherwise."""
    if text.lower() in MASK_COLORS:
        return MASK_COLORS[text.lower()]
    try:
        rgb = tuple(int(c) for c in text.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise DataError(f"--mask-color {text}: expected {' | '.join(MASK_COLORS)} or R,G,B with values in 0..255")
    return rgb


def _px(value: float, size: int) -> int:
    """Template px at 112 → pixel edge at ``size``, rounded half up (Python's round() would go to even)."""
    return int(math.floor(value * size / TEMPLATE_SIZE + 0.5))


def _rng(params: OcclusionParams, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([params.seed, index, stream])


def occlusion_box(shape, kind: str, params: OcclusionParams, index: int = 0) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` (bottom/right exclusive) that ``kind`` fills in image ``index``."""
    h, w = shape[:2]
    if kind == "eyes":
        eye_y = (ARCFACE_TEMPLATE_112[0][1] + ARCFACE_TEMPLATE_112[1][1]) / 2
        top, bottom = _px(eye_y - params.eye_half_height, h), _px(eye_y + params.eye_half_height, h)
        return max(top, 0), min(bottom, h), _px(params.eye_x[0], w), _px(params.eye_x[1], w)
    if kind == "mask":
        return _px(params.mask_top, h), h, 0, w
    if kind in ("black", "noise", "face"):
        return _random_box(h, w, params, index)
    raise DataError(f"--occlude {kind!r}: unknown occlusion kind (expected one of {', '.join(OCCLUSION_KINDS)})")


def _random_box(h: int, w: int, params: OcclusionParams, index: int) -> tuple[int, int, int, int]:
    """Area fraction ~ U(area), width/height log-uniform in aspect, position uniform (RandomErasing-like)."""
    rng = _rng(params, index, _RECT_STREAM)
    area = rng.uniform(*params.area) * h * w
    ratio = math.exp(rng.uniform(math.log(params.aspect[0]), math.log(params.aspect[1])))
    box_h = min(max(int(round(math.sqrt(area / ratio))), 1), h)  # clipped: a tall, large box can exceed the image
    box_w = min(max(int(round(math.sqrt(area * ratio))), 1), w)
    top = int(rng.integers(0, h - box_h + 1))
    left = int(rng.integers(0, w - box_w + 1))
    return top, top + box_h, left, left + box_w


class DonorPool:
    """Which image lends its patch to image i for ``face``: any image of the set whose bytes differ
    from image i's (an identical copy elsewhere in the set would be no occlusion at all)."""

    def __init__(self, keys):
        self.keys = list(keys)
        self.copies: dict[str, list[int]] = {}  # content key → sorted indices holding it
        for i, key in enumerate(self.keys):
            self.copies.setdefault(key, []).append(i)

    def pick(self, index: int, seed: int) -> int:
        own = self.copies[self.keys[index]]
        others = len(self.keys) - len(own)
        if others < 1:
            raise DataError("--occlude face: the set needs at least two different images (a donor)")
        j = int(np.random.default_rng([seed, index, _DONOR_STREAM]).integers(others))
        for k in own:  # the j-th image not in `own`: step over own's indices (sorted) at or before it
            if k <= j:
                j += 1
        return j


def occlude_image(
    img: np.ndarray, kind: str, params: OcclusionParams, index: int = 0, donor: np.ndarray | None = None
) -> np.ndarray:
    """A copy of uint8 ``img`` (H,W,3) with ``kind`` filled in (see the module docstring); pixels
    outside :func:`occlusion_box` are untouched. ``face`` takes the ``donor`` image's same region."""
    top, bottom, left, right = occlusion_box(img.shape, kind, params, index)
    out = np.array(img, dtype=np.uint8, copy=True)
    region = (slice(top, bottom), slice(left, right))
    if kind in ("black", "eyes"):
        out[region] = 0
    elif kind == "mask":
        out[region] = params.mask_color
    elif kind == "noise":
        out[region] = _rng(params, index, _FILL_STREAM).integers(0, 256, (bottom - top, right - left, 3), np.uint8)
    else:  # face
        if donor is None or donor.shape != img.shape:
            got = "none" if donor is None else "x".join(map(str, donor.shape))
            raise DataError(f"--occlude face: image {index} needs a donor of shape {img.shape} (got {got})")
        out[region] = donor[region]
    return out


def degrade_in_set(images, donors: DonorPool, index: int, kind: str, level, params: OcclusionParams) -> np.ndarray:
    """Image ``index`` of a set under one degradation: blur / lr / bands depend on the image alone;
    the random occlusions on (seed, index) too, and ``occ-face`` on a donor image of the set."""
    if not kind.startswith("occ-"):
        return degrade_image(images[index], kind, level)
    occ = kind[4:]
    donor = images[donors.pick(index, params.seed)] if occ == "face" else None
    return occlude_image(images[index], occ, params, index, donor)


def write_occlusion_record(path: Path, kind: str, params: OcclusionParams, **extra) -> None:
    """The seed and geometry an occluded copy was made with (its name holds the kind only)."""
    record = {"kind": kind, **{k: str(v) if isinstance(v, Path) else v for k, v in extra.items()}, **asdict(params)}
    path.write_text(json.dumps(record, indent=1) + "\n")


class _FolderImages:
    """Images of a folder decoded on access: a donor may be any image, and a large folder need not
    sit decoded in memory."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return decode_image(self.paths[i].read_bytes(), str(self.paths[i]))


def degrade_folder(
    images_dir, out_dir, blur=(), lowres=(), occlude=(), occlusion: OcclusionParams | None = None, progress=True
) -> list[Path]:
    """Degraded PNG copies of an ``<identity>/<image>`` folder: ``out_dir/<tag>/<identity>/<name>.png``
    per degradation (tag ``blur2``, ``lr14``, ``occ-eyes``, …); returns the written folders.

    Image i is the i-th file in the order ``pipeline.eval tarfar --images`` reads the folder, so
    an occlusion is a function of (seed, that index). A folder is built under a temporary name and
    renamed when complete; an existing one is an error (stale files would survive an overwrite).
    """
    import torch

    from data_prep.folder2wds import identity_folder_images

    images_dir, out_dir = Path(images_dir), Path(out_dir)
    occlusion = (occlusion or OcclusionParams()).validate()
    jobs = degradation_jobs(blur, lowres, occlude, "degrade-images")
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: --images folder does not exist")
    paths = [p for p, _ in identity_folder_images(images_dir)]
    targets = [p.relative_to(images_dir).with_suffix(".png") for p in paths]
    clash = next((t for t, n in Counter(targets).items() if n > 1), None)
    if clash is not None:
        raise DataError(f"{images_dir}: two images would both be written as {clash} (same name, other extension)")
    for kind, level in jobs:
        if (out_dir / degradation_tag(kind, level)).exists():
            raise DataError(
                f"{out_dir / degradation_tag(kind, level)}: already exists (remove it or pick another --out-dir)"
            )
    images = _FolderImages(paths)
    donors = DonorPool([hashlib.sha1(p.read_bytes()).hexdigest() for p in paths])
    written = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one small image at a time: intra-op threads only add overhead
    try:
        for kind, level in jobs:
            written.append(
                _degrade_folder_one(images_dir, out_dir, images, targets, donors, kind, level, occlusion, progress)
            )
    finally:
        torch.set_num_threads(threads)
    return written


def _degrade_folder_one(images_dir, out_dir, images, targets, donors, kind, level, occlusion, progress) -> Path:
    from tqdm import tqdm

    tag = degradation_tag(kind, level)
    final, tmp = out_dir / tag, out_dir / f".{tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover of an interrupted run
    for i in tqdm(range(len(targets)), desc=f"{images_dir.name} {tag}", unit="img", disable=not progress, leave=False):
        dest = tmp / targets[i]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(encode_png(degrade_in_set(images, donors, i, kind, level, occlusion)))
    if kind.startswith("occ-"):  # a top-level file: tarfar reads <identity>/ sub-folders only
        write_occlusion_record(tmp / "occlusion.json", kind, occlusion, source=images_dir)
    tmp.replace(final)
    return final


# --------------------------------------------------------------------------- CLI


def info(path) -> dict:
    bins, issame = read_bin(path)
    kinds = Counter()
    sizes = Counter()
    for i, b in enumerate(bins):
        kinds["png" if b[:8] == b"\x89PNG\r\n\x1a\n" else "jpeg" if b[:2] == b"\xff\xd8" else "other"] += 1
        if i < 64:
            sizes[decode_image(b, f"{path} image {i}").shape[:2]] += 1
    return {
        "file": str(path),
        "pairs": len(issame),
        "same": int(sum(issame)),
        "different": len(issame) - int(sum(issame)),
        "images": len(bins),
        "encodings": dict(kinds),
        "sizes_of_first_64": {f"{h}x{w}": n for (h, w), n in sizes.items()},
        "bytes": Path(path).stat().st_size,
    }


def _add_degradation_arguments(p: argparse.ArgumentParser) -> None:
    """--blur / --lowres / --occlude and the occlusion geometry, shared by degrade and degrade-images."""
    d = OcclusionParams()
    p.add_argument("--blur", type=float, nargs="*", default=[], help="Gaussian σ values, e.g. 1 2 3")
    p.add_argument("--lowres", type=int, nargs="*", default=[], help="bicubic down-up sizes in px, e.g. 7 14 20")
    p.add_argument(
        "--occlude",
        nargs="*",
        default=[],
        metavar="KIND",
        help=f"occlusion proxies ({', '.join(OCCLUSION_KINDS)}): random rectangle black / noise / patch of another "
        "face; black eye band (sunglasses); lower-face band (mask). Geometry in template px at 112, scaled",
    )
    g = p.add_argument_group("occlusion (see the module docstring; lengths in ArcFace-template px at 112)")
    g.add_argument("--seed", type=int, default=d.seed, help="occlusion = f(seed, image index) (default %(default)s)")
    g.add_argument("--occ-area", type=float, nargs=2, default=list(d.area), metavar=("MIN", "MAX"),
                   help="random rectangle: area fraction range, in (0, 1] (default %(default)s)")  # fmt: skip
    g.add_argument("--occ-aspect", type=float, nargs=2, default=list(d.aspect), metavar=("MIN", "MAX"),
                   help="random rectangle: width/height range, log-uniform (default %(default)s)")  # fmt: skip
    g.add_argument("--eye-half-height", type=float, default=d.eye_half_height,
                   help="eye band: rows eye-y (51.6) ± this (default %(default)s)")  # fmt: skip
    g.add_argument("--eye-x", type=float, nargs=2, default=list(d.eye_x), metavar=("X0", "X1"),
                   help="eye band: columns X0..X1 (default %(default)s; the eyes are at x 38 and 74)")  # fmt: skip
    g.add_argument("--mask-top", type=float, default=d.mask_top,
                   help="mask band: first row, down to the chin (default %(default)s; nose tip y 71.7)")  # fmt: skip
    g.add_argument("--mask-color", default="blue",
                   help=f"mask band: {' | '.join(MASK_COLORS)} | R,G,B (default %(default)s)")  # fmt: skip


def occlusion_from_args(args) -> OcclusionParams:
    """The CLI's occlusion options, validated (DataError naming the option)."""
    return OcclusionParams(
        seed=args.seed,
        area=tuple(args.occ_area),
        aspect=tuple(args.occ_aspect),
        eye_half_height=args.eye_half_height,
        eye_x=tuple(args.eye_x),
        mask_top=args.mask_top,
        mask_color=parse_mask_color(args.mask_color),
    ).validate()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_prep.bin",
        description="insightface .bin verification sets: inspect, build from LFW pairs.txt, degrade.",
        epilog="examples:\n"
        "  python -m data_prep.bin info ../shared/data/lfw_view1_112/lfw_devtest_112.bin\n"
        "  python -m data_prep.bin from-pairs --pairs ../shared/data/lfw_view1_112/pairsDevTest.txt \\\n"
        "      --root ../shared/data/lfw_view1_112/devtest_112 --out /tmp/lfw.bin\n"
        "  python -m data_prep.bin degrade --bin /tmp/lfw.bin --out-dir /tmp/deg --blur 1 2 3 "
        "--lowres 7 14 20 --cross\n"
        "  python -m data_prep.bin degrade --bin /tmp/lfw.bin --out-dir /tmp/deg --occlude black noise face eyes mask "
        "--cross\n"
        "  python -m data_prep.bin degrade-images --images ../shared/data/lfw_view1_112/devtest_112 \\\n"
        "      --out-dir /tmp/occ --occlude eyes mask black   # then: pipeline.eval tarfar --images /tmp/occ/occ-eyes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="print pair counts, encodings and image sizes of a .bin")
    p.add_argument("bin")
    p = sub.add_parser("from-pairs", help="LFW pairs.txt + image folder → .bin (original bytes, fold order)")
    p.add_argument("--pairs", required=True, help="pairs file ('N' or 'FOLDS N' header)")
    p.add_argument("--root", required=True, help="folder holding NAME/NAME_%%04d.EXT")
    p.add_argument("--out", required=True, help="output .bin")
    p.add_argument("--ext", default="jpg", help="image extension (default jpg)")
    p = sub.add_parser("degrade", help="write blurred / low-resolution / occluded / cross-resolution copies (PNG)")
    p.add_argument("--bin", required=True)
    p.add_argument("--out-dir", required=True)
    _add_degradation_arguments(p)
    p.add_argument(
        "--cross", action="store_true", help="also write *_cross.bin: only the 2nd image of each pair degraded"
    )
    p.add_argument("--cross-only", action="store_true", help="write only the *_cross.bin variants")
    p = sub.add_parser(
        "degrade-images",
        help="the same degradations for an <identity>/<image> folder: OUT/<tag>/<identity>/<name>.png (tarfar input)",
    )
    p.add_argument("--images", required=True, help="folder of <identity>/<image> files (as tarfar --images reads)")
    p.add_argument("--out-dir", required=True, help="one sub-folder per degradation: blur2, lr14, occ-eyes, ...")
    _add_degradation_arguments(p)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "info":
            for k, v in info(args.bin).items():
                print(f"{k}: {v}")
        elif args.cmd == "from-pairs":
            n = bin_from_pairs(args.pairs, args.root, args.out, args.ext)
            print(f"wrote {args.out}: {n} pairs")
        else:
            if not args.blur and not args.lowres and not args.occlude:
                raise DataError(f"{args.cmd}: give --blur, --lowres and/or --occlude")
            progress = sys.stderr.isatty()  # bars on a terminal only, never into a log file
            levels = dict(blur=args.blur, lowres=args.lowres, occlude=args.occlude, occlusion=occlusion_from_args(args))
            if args.cmd == "degrade":
                cross = dict(cross=args.cross or args.cross_only, full=not args.cross_only)
                out = degrade_bin(args.bin, args.out_dir, progress=progress, **cross, **levels)
            else:
                out = degrade_folder(args.images, args.out_dir, progress=progress, **levels)
            for p in out:
                print(f"wrote {p}")
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
