"""Face sets on disk: insightface's ``.bin`` verification format (read with a restricted unpickler, written),
LFW ``pairs.txt`` (→ pairs in fold order, → a ``.bin``), and image decoding / lossless PNG encoding.

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
(the order of ``lfw_devtest_112.bin``). The command line is ``python -m data_prep.bin``.
"""

from __future__ import annotations

import io
import pickle
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
