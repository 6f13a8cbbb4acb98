"""``python -m data_prep.bin``: verification sets in insightface's ``.bin`` format — inspect, build from LFW
``pairs.txt``, and write degraded copies of a whole set or image folder. The format, its restricted reader and pairs
live in :mod:`pipeline.faces.io`; what one image becomes under each degradation in :mod:`pipeline.faces.degrade`.

Degraded copies (``degrade``) are re-encoded as **PNG**: lossless, so a degraded image is exactly the degradation of
the decoded original rounded to uint8, and the benchmark measures blur / low resolution alone, without JPEG
artefacts added on top. In the cross-resolution variants the first image of every pair keeps its original bytes.

Occluded copies (``degrade --occlude KIND ...``; ``<stem>_occ-KIND.bin``) are a *synthetic proxy* for occlusion
(kinds and geometry: :mod:`pipeline.faces.degrade`; every option in template px at 112, scaled to the image's size).
``degrade-images`` writes the same degradations for a folder of ``<identity>/<image>`` files (the index is the
image's position in the order ``pipeline.eval tarfar --images`` reads the folder), as PNG in the same layout, one
sub-folder per degradation, so that ``tarfar --images OUT/occ-eyes`` runs unchanged. The parameters of every
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
import json
import shutil
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data_prep.manifest import DataError
from pipeline.faces.degrade import (
    MASK_COLORS,
    OCCLUSION_KINDS,
    DonorPool,
    OcclusionParams,
    degradation_jobs,
    degradation_tag,
    degrade_in_set,
    degraded_name,
    parse_mask_color,
)
from pipeline.faces.io import bin_from_pairs, decode_image, encode_png, read_bin, write_bin


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


def build_parser() -> argparse.ArgumentParser:
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
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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
