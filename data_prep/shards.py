"""Shard-writing machinery shared by :mod:`data_prep.folder2wds` and :mod:`data_prep.rec2wds`.

A *source* lists its samples once, in a canonical order (``Source.sizes`` / ``Source.entry``; big
listings live in numpy arrays, ~24 bytes per record), and reads one sample on demand
(``Source.read``). :func:`run` then

1. **plans**: a seeded permutation of the entries, cut into shards by sample count or by bytes, so
   every shard mixes identities; the plan is a pure function of (source listing, seed, shard size),
   hashed into ``plan`` (no timestamps anywhere);
2. **writes** each shard as a whole in a worker process (``multiprocessing``): the tar is written
   to ``.shard-NNNNNN.tar.tmp<pid>``, fsynced and renamed, so no half-written tar ever carries a
   final name. Tars are deterministic (fixed mtime/uid/gid/uname, USTAR, members in plan order,
   each sample's members sorted by extension), so a rerun gives byte-identical shards;
3. **journals** every finished shard (name, count, sha256, corrupt records) in
   ``OUT/.journal.jsonl``. A run started again after a kill keeps each shard whose file still
   has the journaled sha256 and rewrites the others, so it ends with identical shards;
4. writes ``manifest.json`` (atomic) unless more than ``max_bad_fraction`` of the records were bad,
   in which case it writes ``OUT/corrupt.json`` and exits with status 1.

Per sample the tar holds ``<key>.<ext>`` (the original image bytes, ``ext`` from the bytes' real
format, see :data:`IMAGE_EXTS`), ``<key>.cls`` (ASCII integer label), ``<key>.src`` (source path or
``file:key``), ``<key>.crc`` (the CRC-32 of the image bytes, 8 lowercase hex digits: both loaders check it,
so an image whose bytes were damaged after sharding — a flipped bit in the JPEG body, which decoders decode
into a wrong picture without an error — is skipped and counted instead of trained on) and, when a RecordIO
record carries several float labels, ``<key>.labels`` (JSON list of all of them, the first being the class label).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
import tarfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.manifest import (
    IMAGE_EXTENSIONS,
    MANIFEST,
    DataError,
    Manifest,
    ShardInfo,
    atomic_write_text,
    sha256_file,
    write_manifest,
)

TOOL_VERSION = "1.0.0"
JOURNAL = ".journal.jsonl"
CORRUPT_REPORT = "corrupt.json"
SHARD_PATTERN = "shard-{:06d}.tar"
#: PIL format → tar extension. Loaders should accept every value here (``jpg`` and ``png`` in practice).
IMAGE_EXTS = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "WEBP": "webp", "TIFF": "tif", "GIF": "gif"}
_PNM_EXT = {b"P1": "pbm", b"P4": "pbm", b"P2": "pgm", b"P5": "pgm", b"P3": "ppm", b"P6": "ppm"}
assert set(IMAGE_EXTS.values()) | set(_PNM_EXT.values()) == set(IMAGE_EXTENSIONS)
MAX_LISTED_CORRUPT = 1000
#: Test hook: stop the run (exit status 75) after this many newly written shards, simulating a kill.
STOP_ENV = "DATA_PREP_STOP_AFTER_SHARDS"
_TAR_OVERHEAD = 3 * 1024  # three 512-byte headers + padding per sample (for --shard-bytes)


class BadRecord(Exception):
    """Raised by ``Source.read`` for a record to skip; carries a short reason tag."""

    def __init__(self, reason: str, message: str, offset: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.offset = offset


@dataclass
class Sample:
    label: int
    image: bytes
    src: str
    extra: dict = field(default_factory=dict)  # ext → bytes (e.g. "labels")


class Source:
    """What a tool provides: a listing in canonical order, and a reader of one sample.

    ``sizes()``: int64 array of per-sample byte estimates (its length is the number of samples);
    ``entry(pos)`` → (index, ref): ``index`` identifies the record in reports and names the tar
    key, ``ref`` is what ``read`` needs (small and picklable: it travels to the workers).
    """

    tool = "data_prep"

    def sizes(self) -> np.ndarray:
        raise NotImplementedError

    def entry(self, pos: int) -> tuple[int, Any]:
        raise NotImplementedError

    def read(self, ref) -> Sample:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        raise NotImplementedError

    def sources(self) -> list[dict]:
        raise NotImplementedError

    def offset_of(self, ref) -> int | None:
        """Byte offset of a record in its source file (None for one-file-per-image sources)."""
        return None

    num_classes: int | None = None  # known before reading the images (None: max label + 1)
    pre_corrupt: list = []  # bad records found while listing (e.g. keys missing from the index)
    extra: dict = {}


# --------------------------------------------------------------------------- images


def image_crc(data: bytes) -> str:
    """The ``<key>.crc`` member of a sample: CRC-32 of its image bytes as 8 lowercase hex digits."""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def check_crc(data: bytes, stored: bytes) -> None:
    """Raise DataError unless ``data`` has the CRC-32 recorded in a ``<key>.crc`` member."""
    want = stored.decode("ascii", "replace").strip().lower()
    got = image_crc(data)
    if got != want:
        raise DataError(f"image bytes fail their checksum (crc32 {got}, recorded {want}): damaged after sharding")


def image_ext(data: bytes, verify: str = "decode") -> str:
    """Extension of an encoded image's real format; raises BadRecord('undecodable') if it is not one.

    ``verify``: 'decode' fully decodes (JPEG in draft mode at 1/8 scale: every entropy-coded
    byte is still parsed, so truncation and corrupt data are caught at a fraction of the cost);
    'header' only parses the header (PIL ``verify``); 'none' trusts the magic bytes.
    """
    if not data:
        raise BadRecord("undecodable", "empty image")
    if verify == "none":
        if data[:3] == b"\xff\xd8\xff":
            return "jpg"
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return "png"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if verify == "decode":
                if fmt == "JPEG":
                    im.draft(
                        im.mode if im.mode in ("L", "RGB") else "RGB", (max(1, im.width // 8), max(1, im.height // 8))
                    )
                im.load()
            elif verify == "header":
                im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadRecord("undecodable", f"undecodable image ({str(exc)[:80]})") from None
    except Exception as exc:  # PIL raises assorted errors on garbage; any of them means "bad image"
        raise BadRecord("undecodable", f"undecodable image ({type(exc).__name__}: {str(exc)[:80]})") from None
    if fmt == "PPM":
        return _PNM_EXT.get(data[:2], "ppm")
    if fmt not in IMAGE_EXTS:
        raise BadRecord("unsupported_format", f"image format {fmt} is not supported by the loaders")
    return IMAGE_EXTS[fmt]


# --------------------------------------------------------------------------- plan


@dataclass
class Plan:
    shards: list[np.ndarray]  # per shard: positions into the source listing, in write order
    digest: str
    num_entries: int


def make_plan(source: Source, seed: int, shard_size: int | None, shard_bytes: int | None, verify: str) -> Plan:
    sizes = np.asarray(source.sizes(), dtype=np.int64)
    n = len(sizes)
    if n == 0:
        raise DataError("the source holds no readable images")
    perm = np.random.default_rng(seed).permutation(n)
    if shard_bytes:
        # greedy: a new shard starts when adding the next sample would pass the target
        cost = sizes[perm] + _TAR_OVERHEAD
        cuts, cur = [], 0
        for i, c in enumerate(cost.tolist()):
            if cur and cur + c > shard_bytes:
                cuts.append(i)
                cur = 0
            cur += c
        shards = np.split(perm, cuts)
    else:
        step = max(1, int(shard_size or 10000))
        shards = [perm[s : s + step] for s in range(0, n, step)]
    spec = {
        "tool": source.tool,
        "version": TOOL_VERSION,
        "seed": seed,
        "shard_size": shard_size,
        "shard_bytes": shard_bytes,
        "verify": verify,
        "source": source.fingerprint(),
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return Plan(shards, digest, n)


# --------------------------------------------------------------------------- shard writer


class TarStream:
    """Deterministic USTAR writer: every member ``mode 0644, uid/gid 0, empty uname/gname, mtime 0``.

    Its bytes equal what :mod:`tarfile` writes (``USTAR_FORMAT``) for the same members — checked
    by ``tests/unit/test_rec2wds.py::test_tar_stream_matches_tarfile`` — at a fraction of the cost
    (tarfile builds each 512-byte header through ~40 Python calls, which dominated the run time).
    Everything written goes through sha256, so a shard's digest costs no second read.
    """

    _BLOCK = tarfile.BLOCKSIZE
    _RECORD = tarfile.RECORDSIZE
    # fixed fields after name (100 bytes): mode, uid, gid | size | mtime, chksum placeholder, type,
    # linkname | magic+version, uname, gname, devmajor, devminor, prefix
    _MID = b"0000644\0" + b"0000000\0" + b"0000000\0"
    _TAIL = (
        b"00000000000\0" + b" " * 8 + b"0" + b"\0" * 100 + tarfile.POSIX_MAGIC + b"\0" * 64 + b"\0" * 16 + b"\0" * 155
    )  # devmajor/devminor empty for regular files, as tarfile

    def __init__(self, f):
        self.f = f
        self.h = hashlib.sha256()
        self.n = 0

    def _write(self, b: bytes) -> None:
        self.h.update(b)
        self.f.write(b)
        self.n += len(b)

    def add(self, name: str, data: bytes) -> None:
        raw = name.encode("utf-8")
        if len(raw) > 100:
            raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
        size = len(data)
        if size >= 8**11:
            raise ValueError(f"tar member {name!r} too large for USTAR ({size} bytes)")
        head = raw.ljust(100, b"\0") + self._MID + b"%011o\0" % size + self._TAIL
        head = head.ljust(self._BLOCK, b"\0")
        chk = sum(head)  # checksum field counted as 8 spaces, as POSIX specifies
        head = head[:148] + b"%06o\0" % chk + head[155:]
        self._write(head)
        self._write(data)
        if size % self._BLOCK:
            self._write(b"\0" * (self._BLOCK - size % self._BLOCK))

    def close(self) -> None:
        self._write(b"\0" * (2 * self._BLOCK))
        if self.n % self._RECORD:
            self._write(b"\0" * (self._RECORD - self.n % self._RECORD))

    def hexdigest(self) -> str:
        return self.h.hexdigest()


_WORKER: dict = {}


def _init_worker(source, out_dir, verify, num_classes):
    _WORKER.update(source=source, out=Path(out_dir), verify=verify, num_classes=num_classes)


def _write_shard(task) -> dict:
    shard_idx, entries = task
    source: Source = _WORKER["source"]
    out: Path = _WORKER["out"]
    verify, num_classes = _WORKER["verify"], _WORKER["num_classes"]
    name = SHARD_PATTERN.format(shard_idx)
    tmp = out / f".{name}.tmp{os.getpid()}"
    corrupt, formats, labels = [], Counter(), Counter()
    count = 0
    with open(tmp, "wb", buffering=1 << 20) as raw:
        tw = TarStream(raw)
        for index, ref in entries:
            try:
                s = source.read(ref)
                if s.label < 0 or (num_classes is not None and s.label >= num_classes):
                    raise BadRecord("label_out_of_range", f"label {s.label} outside [0, {num_classes})", None)
                ext = image_ext(s.image, verify)
            except BadRecord as exc:
                off = exc.offset if exc.offset is not None else source.offset_of(ref)
                corrupt.append(
                    {
                        "index": index,
                        "offset": off,
                        "source": _ref_src(source, ref),
                        "reason": exc.reason,
                        "message": exc.message,
                    }
                )
                continue
            key = f"{index:09d}"
            members = {
                "cls": str(s.label).encode(),
                ext: s.image,
                "src": s.src.encode(),
                "crc": image_crc(s.image).encode(),
                **s.extra,
            }
            for e in sorted(members):
                tw.add(f"{key}.{e}", members[e])
            formats[ext] += 1
            labels[s.label] += 1
            count += 1
        tw.close()
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, out / name)
    return {
        "shard": shard_idx,
        "name": name,
        "count": count,
        "sha256": tw.hexdigest(),
        "bytes": tw.n,
        "corrupt": corrupt,
        "formats": dict(formats),
        "max_label": max(labels) if labels else -1,
        "labels": len(labels),
    }


def _ref_src(source, ref):
    fn = getattr(source, "describe", None)
    return fn(ref) if fn else str(ref)


# --------------------------------------------------------------------------- driver


@dataclass
class RunResult:
    manifest: Manifest | None
    out: Path
    num_bad: int
    bad_fraction: float
    seconds: float
    written_shards: int


def _read_journal(path: Path, digest: str) -> dict[int, dict] | None:
    """Completed shards of the journal for plan ``digest``; None if the journal is of another plan."""
    if not path.is_file():
        return {}
    done = {}
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines:
        return {}
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError:
        return None
    if head.get("plan") != digest:
        return None
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill: that shard is simply redone
            continue
        done[int(rec["shard"])] = rec
    return done


def _clear_outputs(out: Path) -> None:
    for p in list(out.glob("shard-*.tar")) + [out / JOURNAL, out / MANIFEST, out / CORRUPT_REPORT]:
        if p.exists():
            p.unlink()


def run(
    source: Source,
    out: str | Path,
    *,
    seed: int = 0,
    shard_size: int | None = None,
    shard_bytes: int | None = None,
    workers: int = 1,
    verify: str = "decode",
    max_bad_fraction: float = 0.01,
    overwrite: bool = False,
    progress: bool | None = None,
    log=print,
) -> RunResult:
    """Plan, write (resumably, in parallel) and describe the shards of ``source`` in ``out``."""
    t0 = time.perf_counter()
    if verify not in ("decode", "header", "none"):
        raise DataError(f"--verify must be decode, header or none, not {verify!r}")
    if shard_size is not None and shard_size <= 0:
        raise DataError(f"--shard-size must be positive, got {shard_size}")
    if shard_bytes is not None and shard_bytes <= 0:
        raise DataError(f"--shard-bytes must be positive, got {shard_bytes}")
    if not 0 <= max_bad_fraction <= 1:
        raise DataError(f"--max-bad-fraction must lie in [0, 1], got {max_bad_fraction}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --out exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    plan = make_plan(source, seed, shard_size, shard_bytes, verify)
    journal_path = out / JOURNAL
    done = _read_journal(journal_path, plan.digest)
    has_outputs = any(out.glob("shard-*.tar")) or (out / MANIFEST).exists()
    if done is None or (not done and has_outputs and not journal_path.exists()):
        if not overwrite:
            raise DataError(
                f"{out}: holds shards or a manifest from a different run (other input, seed or "
                f"shard size); pass --overwrite to replace them or choose another --out"
            )
        _clear_outputs(out)
        done = {}
    for stale in out.glob(".shard-*.tar.tmp*"):  # left by a killed run
        stale.unlink()
    # stale shard files numbered beyond this plan (only possible after --overwrite races): drop them
    for p in out.glob("shard-*.tar"):
        try:
            if int(p.stem.split("-")[1]) >= len(plan.shards):
                p.unlink()
        except ValueError:
            pass

    results: dict[int, dict] = {}
    todo = []
    for i in range(len(plan.shards)):
        rec = done.get(i)
        path = out / SHARD_PATTERN.format(i)
        if rec and path.is_file() and path.stat().st_size == rec["bytes"] and sha256_file(path) == rec["sha256"]:
            results[i] = rec
        else:
            todo.append(i)
    if not journal_path.exists() or done == {} and not results:
        atomic_write_text(
            journal_path, json.dumps({"plan": plan.digest, "tool": source.tool, "version": TOOL_VERSION}) + "\n"
        )
    kept = len(results)
    if kept:
        log(f"resuming: {kept} of {len(plan.shards)} shards already complete")

    num_classes = source.num_classes
    stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
    from tqdm import tqdm

    bar = tqdm(
        total=plan.num_entries,
        initial=sum(len(plan.shards[i]) for i in results),
        unit="img",
        unit_scale=True,
        desc=f"{source.tool} → {out.name}",
        disable=(not progress) if progress is not None else None,
        smoothing=0.1,
    )
    written = 0
    workers = max(1, int(workers))
    pool = None
    # tasks carry their (index, ref) lists, built lazily: the pool's feeder blocks on a full pipe
    tasks = ((i, [source.entry(int(p)) for p in plan.shards[i]]) for i in todo)
    try:
        if workers > 1 and len(todo) > 1:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(
                min(workers, len(todo)), initializer=_init_worker, initargs=(source, out, verify, num_classes)
            )
            it = pool.imap_unordered(_write_shard, tasks, chunksize=1)
        else:
            _init_worker(source, out, verify, num_classes)
            it = map(_write_shard, tasks)
        with open(journal_path, "a") as jf:
            for rec in it:
                jf.write(json.dumps(rec, sort_keys=True) + "\n")
                jf.flush()
                results[rec["shard"]] = rec
                bar.update(len(plan.shards[rec["shard"]]))
                written += 1
                if stop_after and written >= stop_after:  # simulated kill -9: no cleanup at all
                    log(f"{STOP_ENV}={stop_after}: stopping after {written} shards (simulated kill)")
                    sys.stderr.flush()
                    os._exit(75)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
    finally:
        bar.close()
        if pool is not None:  # an exception (e.g. Ctrl-C): stop the workers
            pool.terminate()
            pool.join()

    # ---- summarise
    recs = [results[i] for i in range(len(plan.shards))]
    corrupt = sorted(list(source.pre_corrupt) + [c for r in recs for c in r["corrupt"]], key=lambda c: c["index"])
    num_images = sum(r["count"] for r in recs)
    total = plan.num_entries + len(source.pre_corrupt)
    bad_fraction = len(corrupt) / max(1, total)
    max_label = max(r["max_label"] for r in recs)
    nc = num_classes if num_classes is not None else max_label + 1
    formats = Counter()
    for r in recs:
        formats.update(r["formats"])
    corrupt_block = {
        "count": len(corrupt),
        "records": corrupt[:MAX_LISTED_CORRUPT],
        "by_reason": dict(sorted(Counter(c["reason"] for c in corrupt).items())),
    }
    seconds = time.perf_counter() - t0
    for c in corrupt[:20]:
        log(f"bad record {c['index']} at offset {c['offset']} ({c['source']}): {c['reason']}: {c['message']}")
    if len(corrupt) > 20:
        log(f"... and {len(corrupt) - 20} more bad records (see manifest.json / corrupt.json)")
    if bad_fraction > max_bad_fraction:
        atomic_write_text(
            out / CORRUPT_REPORT,
            json.dumps(
                {
                    "total_records": total,
                    "bad_fraction": bad_fraction,
                    "max_bad_fraction": max_bad_fraction,
                    **corrupt_block,
                },
                indent=1,
                sort_keys=True,
            )
            + "\n",
        )
        if (out / MANIFEST).exists():
            (out / MANIFEST).unlink()
        return RunResult(None, out, len(corrupt), bad_fraction, seconds, written)
    if (out / CORRUPT_REPORT).exists():
        (out / CORRUPT_REPORT).unlink()
    extra = {
        "plan": plan.digest,
        "seed": seed,
        "shard_size": shard_size,
        "shard_bytes": shard_bytes,
        "verify": verify,
        "formats": dict(sorted(formats.items())),
        "identities_per_shard": {"min": min(r["labels"] for r in recs), "max": max(r["labels"] for r in recs)},
        **source.extra,
    }
    manifest = Manifest(
        num_classes=nc,
        num_images=num_images,
        shards=[ShardInfo(r["name"], r["count"], r["sha256"]) for r in recs],
        corrupt=corrupt_block,
        sources=source.sources(),
        tool=f"{source.tool} {TOOL_VERSION}",
        extra=extra,
    )
    write_manifest(out, manifest)
    return RunResult(manifest, out, len(corrupt), bad_fraction, seconds, written)


def finish(res: RunResult, max_bad_fraction: float, log=print) -> int:
    """Print the one-line summary of a run; return the CLI exit status."""
    rate = (res.manifest.num_images if res.manifest else 0) / max(res.seconds, 1e-9)
    if res.manifest is None:
        log(
            f"error: {res.num_bad} bad records = {res.bad_fraction:.2%} of the input, more than "
            f"--max-bad-fraction {max_bad_fraction:.2%}; no manifest written, see {res.out / CORRUPT_REPORT}"
        )
        return 1
    m = res.manifest
    log(
        f"wrote {m.num_images} images of {m.num_classes} classes in {len(m.shards)} shards to {res.out} "
        f"({res.written_shards} shards written this run, {res.num_bad} bad records skipped) "
        f"in {res.seconds:.1f} s, {rate:.0f} img/s"
    )
    return 0


def add_common_args(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--shard-size", type=int, default=None, help="samples per shard (default 10000 when --shard-bytes is not given)"
    )
    g.add_argument(
        "--shard-bytes",
        type=_parse_bytes,
        default=None,
        help="approximate bytes per shard, e.g. 500M or 1G (instead of --shard-size)",
    )
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes, each writes whole shards")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled sample → shard assignment")
    p.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="exit with status 1 (and write no manifest) when more than this fraction is bad",
    )
    p.add_argument(
        "--verify",
        choices=["decode", "header", "none"],
        default="decode",
        help="image check: full decode (default), header parse only, or none",
    )
    p.add_argument("--overwrite", action="store_true", help="replace shards of a different earlier run in --out")
    p.add_argument(
        "--dataset",
        default=None,
        help="known dataset (ms1mv2, webface4m, casia_webface): compare the counts at the end",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_bytes(text: str) -> int:
    t = text.strip().upper().rstrip("B")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        v = int(float(t) * mult)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (examples: 500000000, 500M, 1G)") from None
    return v


def run_cli(source, args) -> int:
    """The body shared by the folder2wds and rec2wds CLIs: shard, report, optionally check the
    manifest against a known dataset (``--dataset``); returns the exit status."""

    def log(m):
        print(m, file=sys.stderr)

    res = run(
        source,
        args.out,
        seed=args.seed,
        shard_size=args.shard_size,
        shard_bytes=args.shard_bytes,
        workers=args.workers,
        verify=args.verify,
        max_bad_fraction=args.max_bad_fraction,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
        log=log,
    )
    status = finish(res, args.max_bad_fraction, log=log)
    if status == 0 and args.dataset:
        from data_prep import datasets

        status = datasets.check_cli(args.out, args.dataset)
    return status


def main_wrapper(fn, argv=None) -> int:
    """Run a CLI body: DataError (or an OS error such as an unwritable --out) → ``error: <msg>``, status 2."""
    try:
        return fn(argv)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
