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

CLI::

    python -m data_prep.bin info F.bin
    python -m data_prep.bin from-pairs --pairs pairsDevTest.txt --root devtest_112 --out lfw.bin
    python -m data_prep.bin degrade --bin lfw.bin --out-dir D --blur 1 2 3 --lowres 7 14 20 --cross
"""

from __future__ import annotations

import argparse
import io
import pickle
import sys
from collections import Counter
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


def decode_image(data: bytes, where: str = "image") -> np.ndarray:
    """Encoded bytes → uint8 RGB array (H, W, 3); DataError naming ``where`` if undecodable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data
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


def degrade_image(img: np.ndarray, kind: str, level: float) -> np.ndarray:
    """uint8 (H,W,3) → degraded uint8 via pipeline.data.degrade, on values 0..255, rounded."""
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


def degraded_name(stem: str, kind: str, level: float, cross: bool) -> str:
    return f"{stem}_{kind}{_fmt(level)}{'_cross' if cross else ''}.bin"


def degrade_bin(
    bin_path, out_dir, blur=(), lowres=(), cross: bool = False, full: bool = True, progress: bool = True
) -> list[Path]:
    """Write degraded copies of ``bin_path`` into ``out_dir``; returns the written paths.

    For each σ in ``blur`` and each size in ``lowres``: ``<stem>_blurσ.bin`` / ``<stem>_lrS.bin``
    (both images of every pair degraded) when ``full``, and ``..._cross.bin`` (only the second
    image of each pair degraded, the first kept byte-identical) when ``cross``.
    """
    import torch

    bin_path, out_dir = Path(bin_path), Path(out_dir)
    bins, issame = read_bin(bin_path)
    images = [decode_image(b, f"{bin_path} image {i}") for i, b in enumerate(bins)]
    jobs = [("blur", s) for s in blur] + [("lr", s) for s in lowres]
    for kind, level in jobs:
        if (kind == "blur" and level <= 0) or (kind == "lr" and (int(level) != level or level < 1)):
            raise DataError(f"{bin_path}: bad degradation level {kind} {level}")
    written = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one small image at a time: intra-op threads only add overhead
    try:
        for kind, level in jobs:
            written += _degrade_one(bin_path, out_dir, bins, issame, images, kind, level, cross, full, progress)
    finally:
        torch.set_num_threads(threads)
    return written


def _degrade_one(bin_path, out_dir, bins, issame, images, kind, level, cross, full, progress) -> list[Path]:
    """One degradation level: the full copy and/or the cross-resolution copy."""
    from tqdm import tqdm

    written = []
    todo = range(len(bins)) if full else range(1, len(bins), 2)
    degraded = {
        i: encode_png(degrade_image(images[i], kind, level))
        for i in tqdm(todo, desc=f"{bin_path.stem} {kind}{_fmt(level)}", unit="img", disable=not progress, leave=False)
    }
    if full:
        out = out_dir / degraded_name(bin_path.stem, kind, level, False)
        write_bin(out, [degraded[i] for i in range(len(bins))], issame)
        written.append(out)
    if cross:
        out = out_dir / degraded_name(bin_path.stem, kind, level, True)
        write_bin(out, [bins[i] if i % 2 == 0 else degraded[i] for i in range(len(bins))], issame)
        written.append(out)
    return written


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_prep.bin",
        description="insightface .bin verification sets: inspect, build from LFW pairs.txt, degrade.",
        epilog="examples:\n"
        "  python -m data_prep.bin info ../shared/data/lfw_view1_112/lfw_devtest_112.bin\n"
        "  python -m data_prep.bin from-pairs --pairs ../shared/data/lfw_view1_112/pairsDevTest.txt \\\n"
        "      --root ../shared/data/lfw_view1_112/devtest_112 --out /tmp/lfw.bin\n"
        "  python -m data_prep.bin degrade --bin /tmp/lfw.bin --out-dir /tmp/deg --blur 1 2 3 "
        "--lowres 7 14 20 --cross",
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
    p = sub.add_parser("degrade", help="write blurred / low-resolution / cross-resolution copies (PNG)")
    p.add_argument("--bin", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--blur", type=float, nargs="*", default=[], help="Gaussian σ values, e.g. 1 2 3")
    p.add_argument("--lowres", type=int, nargs="*", default=[], help="bicubic down-up sizes in px, e.g. 7 14 20")
    p.add_argument(
        "--cross", action="store_true", help="also write *_cross.bin: only the 2nd image of each pair degraded"
    )
    p.add_argument("--cross-only", action="store_true", help="write only the *_cross.bin variants")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "info":
            for k, v in info(args.bin).items():
                print(f"{k}: {v}")
        elif args.cmd == "from-pairs":
            n = bin_from_pairs(args.pairs, args.root, args.out, args.ext)
            print(f"wrote {args.out}: {n} pairs")
        else:
            if not args.blur and not args.lowres:
                raise DataError("degrade: give --blur and/or --lowres levels")
            out = degrade_bin(
                args.bin,
                args.out_dir,
                args.blur,
                args.lowres,
                cross=args.cross or args.cross_only,
                full=not args.cross_only,
                progress=sys.stderr.isatty(),  # bars on a terminal only, never into a log file
            )
            for p in out:
                print(f"wrote {p}")
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
