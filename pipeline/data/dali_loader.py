"""DALI training loader: ``fn.readers.webdataset`` → decode → the augmentation spec as DALI ops.

The device is the GPU when CUDA is present (``mixed`` decode, ``gpu`` operators), else DALI's CPU
operators with ``device_id=None`` (../shared/FACTS.md). Every step of :mod:`pipeline.data.augment`
is a DALI operator on that device:

* crop: four ``fn.random.uniform`` draws → the box of :func:`pipeline.data.augment.crop_box`
  in DALI arithmetic; ``fn.slice`` cuts the rectangle, a second ``fn.slice`` with negative
  anchor and ``out_of_bounds_policy="pad"`` puts it back in place on a black canvas;
* low-resolution rescale: ``fn.random.uniform(lowres_ratio)`` → the small side of
  :func:`pipeline.data.augment.lowres_side`; two ``fn.random.choice`` over the DALI interpolation
  codes of ``lowres_interp`` (down, up); two ``fn.resize(antialias=False)`` with a per-sample
  ``interp_type`` (:func:`dali_low_res`), nearest with its source origin shifted by
  :data:`pipeline.data.degrade.NN_ROI_SHIFT` through ``roi_start``/``roi_end``;
* flip: the ``mirror`` of the final ``fn.crop_mirror_normalize`` (the spec's later steps are
  mirror-symmetric but cutout, whose square is mirrored instead, see the augment module doc);
* photometric: DALI arithmetic ``b·(m + c·(x − m))`` with ``m`` the mean grey level from
  ``fn.reductions.mean`` (exactly ``fn.brightness_contrast`` with ``contrast_center=m``, but
  valid with a GPU-computed ``m``), then ``fn.saturation``; clamps with ``dali.math.clamp``;
* blur: ``fn.gaussian_blur(sigma=fn.random.uniform(blur_sigma))``;
* cutout: two ``fn.random.uniform`` draws → the square of :func:`pipeline.data.augment.cutout_box` in
  DALI arithmetic, mirrored when the sample will be mirrored, then ``fn.erase`` (:func:`dali_cutout`);
* multi-resolution: ``fn.random.choice(sizes, p)`` then two cubic ``fn.resize`` with float sizes;
* every probability with ``fn.random.coin_flip`` and DALI conditionals (``enable_conditionals``).

Labels: ``.cls`` payloads are padded (``fn.pad``) and parsed to int on the Python side.

Splitting: ``shard_id=rank, num_shards=world`` (DALI splits the sample sequence into contiguous
disjoint parts); ``stick_to_shard`` keeps a rank on its part, a short part wraps around (repeats
within the rank's own samples). Epoch length comes from the manifest; each epoch builds a fresh
pipeline seeded by (seed, epoch, rank), so ``set_epoch`` reshuffles and a resumed run sees the
same order. ``iter_from(step)`` runs the first ``step`` batches through the pipeline (DALI's
random state is sequential, so skipping is not cheap here).

Corrupt data: DALI stops on a truncated tar or an undecodable image, so every shard is scanned at
start-up (tar headers; each sample's image magic bytes and its ``.cls`` label; the result is
cached per shard path/size/mtime under ``LOWQ_CACHE`` or ~/.cache/lowq-face) and the DALI index
files are written for the good samples only; a truncated shard keeps its complete samples, a
garbage shard is dropped. Skipped shards/samples are warned about and counted (``stats()``).
A sample with a ``.crc`` member (every shard data_prep writes) has its image bytes checked against it in the
same scan, so an image whose body was damaged after sharding (which libjpeg decodes into a wrong picture, only
printing "Corrupt JPEG data") is skipped and counted; the scan then reads the whole shard once (cached).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_prep.manifest import DataError, atomic_write_text
from data_prep.shards import check_crc
from pipeline.config import ConfigError, DataConfig
from pipeline.data.augment import CROP_LOG_RATIO, GRAY_WEIGHTS, photometric_ranges, resolution_probs, validate
from pipeline.data.base import TrainLoaderBase
from pipeline.data.degrade import NN_ROI_SHIFT
from pipeline.data.torch_loader import hash_seed

log = logging.getLogger("pipeline.data")

# Formats data_prep writes that DALI's image decoder reads (GIF is not among them), with their magic.
IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "pgm", "pbm", "ppm", "gif")
_MAGIC = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"BM",
    b"RIFF",
    b"II*\x00",
    b"MM\x00*",
    b"P1",
    b"P2",
    b"P3",
    b"P4",
    b"P5",
    b"P6",
)


# --------------------------------------------------------------------------- shard validation


@dataclass
class ShardScan:
    path: str
    samples: list = field(default_factory=list)  # per good sample: [(ext, offset, size, name), ...]
    bad_samples: list = field(default_factory=list)  # (key, reason)
    error: str | None = None  # shard-level problem (truncated, not a tar)


def _split_name(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return name, ""
    prefix = name[: len(name) - len(base)]
    stem, ext = base.split(".", 1)
    return prefix + stem, ext.lower()


SCAN_VERSION = 2  # in the scan cache's key: 2 = image bytes checked against their .crc member


def scan_shard(path: str | Path, num_classes: int) -> ShardScan:
    """Check a tar's structure and each sample's image header and label (reads headers only)."""
    scan = ShardScan(str(path))
    size = os.path.getsize(path)
    groups: dict[str, dict] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                if m.offset_data + m.size > size:
                    scan.error = f"truncated: member {m.name} ends at byte {m.offset_data + m.size} > file size {size}"
                    break
                key, ext = _split_name(m.name)
                if key.rsplit("/", 1)[-1].startswith(".") or not ext:
                    continue
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext] = m
    except (tarfile.TarError, OSError, EOFError) as exc:
        scan.error = f"{type(exc).__name__}: {exc}"
    with open(path, "rb") as f:
        for key in order:
            comps = groups[key]
            img = next((comps[e] for e in IMAGE_EXTS if e in comps), None)
            if img is None or "cls" not in comps:
                scan.bad_samples.append((key, "missing " + ("image" if img is None else ".cls")))
                continue
            f.seek(img.offset_data)
            head = f.read(8)
            if "crc" in comps:
                f.seek(img.offset_data)
                body = f.read(img.size)
                f.seek(comps["crc"].offset_data)
                try:
                    check_crc(body, f.read(comps["crc"].size))
                except DataError as exc:
                    scan.bad_samples.append((key, f"{img.name}: {exc}"))
                    continue
            if not any(head.startswith(mg) for mg in _MAGIC):
                what = "GIF (DALI cannot decode it; use data.loader=torch)" if head.startswith(b"GIF8") else "an image"
                scan.bad_samples.append((key, f"{img.name}: not {what} (starts {head[:4]!r})"))
                continue
            f.seek(comps["cls"].offset_data)
            raw = f.read(comps["cls"].size)
            try:
                label = int(raw.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                scan.bad_samples.append((key, f"unparsable label {raw[:16]!r}"))
                continue
            if not 0 <= label < num_classes:
                scan.bad_samples.append((key, f"label {label} outside [0, {num_classes})"))
                continue
            scan.samples.append([(e, m.offset_data, m.size, m.name) for e, m in comps.items()])
    return scan


def cache_dir() -> Path:
    """Where shard scans are cached (``LOWQ_CACHE`` or ~/.cache/lowq-face)."""
    return Path(os.environ.get("LOWQ_CACHE") or Path.home() / ".cache" / "lowq-face") / "shard-scans"


def scan_shard_cached(path: str | Path, num_classes: int) -> ShardScan:
    """:func:`scan_shard`, remembered per (absolute path, size, mtime, num_classes): reruns and the
    other ranks of a node skip the scan of a multi-million-image dataset."""
    st = os.stat(path)
    what = f"{SCAN_VERSION}|{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{num_classes}"
    key = hashlib.sha1(what.encode()).hexdigest()
    cached = cache_dir() / f"{key}.json"
    try:
        data = json.loads(cached.read_text())
        return ShardScan(
            str(path),
            [[tuple(c) for c in comps] for comps in data["samples"]],
            [tuple(b) for b in data["bad_samples"]],
            data["error"],
        )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    scan = scan_shard(path, num_classes)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            cached, json.dumps({"samples": scan.samples, "bad_samples": scan.bad_samples, "error": scan.error})
        )
    except OSError as exc:  # a read-only home is no reason to stop
        log.info("shard scan cache not written (%s)", exc)
    return scan


def write_index(scan: ShardScan, path: str | Path) -> None:
    """DALI webdataset index (v1.2): one line per sample, ``ext offset size name`` per component."""
    lines = [f"v1.2 {len(scan.samples)}"]
    # the name field is informational (data is located by offset/size); the format is space-separated
    lines += [" ".join(f"{e} {o} {s} {'_'.join(str(n).split())}" for e, o, s, n in comps) for comps in scan.samples]
    Path(path).write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- the DALI graph


def dali_draw_resolution(sizes, weights):
    """DALI op: one LR size per sample with probabilities ∝ weights (LRFR 4.1: 7:14:20 = 1:1:2)."""
    from nvidia.dali import fn

    return fn.random.choice(np.asarray(sizes, np.float32), p=[float(p) for p in resolution_probs(sizes, weights)])


# lowres_interp names → DALI interpolation types (the filters of pipeline.data.degrade.resize_square)
DALI_INTERP = {"nearest": "INTERP_NN", "linear": "INTERP_LINEAR", "cubic": "INTERP_CUBIC", "lanczos": "INTERP_LANCZOS3"}


def dali_interp_codes(names) -> np.ndarray:
    """int32 DALI interpolation codes of ``lowres_interp`` names, for ``fn.random.choice``."""
    from nvidia.dali import types

    return np.array([int(getattr(types, DALI_INTERP[n])) for n in names], np.int32)


def dali_low_res(img, small, down, up, size: int):
    """DALI op of :func:`pipeline.data.degrade.low_res`: HWC float ``img`` (S×S) resized to ``small``×``small``
    (float) with interpolation code ``down`` (int32), back to S×S with ``up``, each clamped to [0, 1].

    ``antialias=False`` keeps every kernel at its width (OpenCV's resize). Nearest neighbour gets its source
    origin shifted by ``NN_ROI_SHIFT`` px (``roi_start``/``roi_end``): DALI computes ``floor((i + ½)·scale)``
    in float32, which can fall on either side of an exact tie; the shift makes it the exact value.
    """
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    nn = int(types.INTERP_NN)

    def resize(x, out, code, n_in):
        shift = fn.cast(code == nn, dtype=types.FLOAT) * NN_ROI_SHIFT
        start = fn.stack(shift, shift)
        y = fn.resize(
            x,
            resize_x=out,
            resize_y=out,
            interp_type=fn.cast(code, dtype=types.INTERP_TYPE),
            antialias=False,
            roi_start=start,
            roi_end=start + n_in,
            roi_relative=False,
        )
        return dmath.clamp(y, 0.0, 1.0)

    return resize(resize(img, small, down, float(size)), float(size), up, small)


def dali_cutout(img, y0, x0, h, w, mirror, size: int):
    """DALI op of :func:`pipeline.data.augment.cutout` for a box drawn in the *mirrored* frame: the DALI loader
    mirrors at the very end, so when ``mirror`` is 1 the columns ``[x0, x0+w)`` become ``[S-x0-w, S-x0)``."""
    from nvidia.dali import fn

    if not (isinstance(mirror, (int, float)) and mirror == 0):
        x0 = x0 + mirror * (float(size) - 2.0 * x0 - w)
    return fn.erase(img, anchor=fn.stack(y0, x0), shape=fn.stack(h, w), axis_names="HW", fill_value=0.0)


def dali_cutout_box(side: int, size: int, u_y=None, u_x=None):
    """(y0, x0, h, w) float DataNodes of :func:`pipeline.data.augment.cutout_box` from two U(0,1) draws
    (``fn.random.uniform`` unless given)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn

    S, half = float(size), float(side // 2)
    out = []
    for u in (u_y, u_x):
        u = fn.random.uniform(range=[0.0, 1.0]) if u is None else u
        c = dmath.min(S - 1.0, dmath.floor(u * S))
        lo, hi = dmath.max(0.0, c - half), dmath.min(S, c - half + float(side))
        out.append((lo, hi - lo))
    (y0, h), (x0, w) = out
    return y0, x0, h, w


def _coin(p: float):
    """Python ``True`` for p >= 1 (no op), else a per-sample DALI coin (a conditional's predicate)."""
    from nvidia.dali import fn, types

    return True if p >= 1 else fn.random.coin_flip(probability=float(p), dtype=types.BOOL)


def _uniform(lo: float, hi: float):
    """U(lo, hi) per sample; a plain float when the range is one point (DALI needs lo < hi)."""
    from nvidia.dali import fn

    return float(lo) if hi <= lo else fn.random.uniform(range=[float(lo), float(hi)])


def build_pipeline(
    paths,
    index_paths,
    aug,
    *,
    size: int,
    batch_size: int,
    num_threads: int,
    device_id,
    seed: int,
    shard_id: int,
    num_shards: int,
    shuffle_buffer: int,
    with_keys: bool,
    prefetch: int = 2,
    hw_decoder_load: float = 0.65,
):
    """The DALI pipeline of the spec; outputs image, cls bytes, [image_lr, lr_size], [src bytes]."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    S = float(size)
    (b0, b1), (c0, c1), (s0, s1) = photometric_ranges(aug)
    validate(aug)

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        enable_conditionals=True,
        prefetch_queue_depth=prefetch,
    )
    def pipe():
        outs = fn.readers.webdataset(
            paths=paths,
            index_paths=index_paths,
            ext=[";".join(IMAGE_EXTS[:-1]), "cls"] + (["src"] if with_keys else []),
            missing_component_behavior="skip",
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=shuffle_buffer > 1,
            initial_fill=max(1, shuffle_buffer),
            seed=seed,
            stick_to_shard=True,
            name="reader",
        )
        jpegs, cls = outs[0], outs[1]
        # 0. decode (GPU: nvJPEG via "mixed"); resize to S×S only when the stored size differs
        shape = fn.peek_image_shape(jpegs)
        if gpu:  # hw_decoder_load: the share of images for the GPU's hardware JPEG decoder (the rest: CUDA)
            img = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load)
        else:
            img = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        if (shape[0] != size) | (shape[1] != size):
            img = fn.resize(img, resize_x=S, resize_y=S, interp_type=types.INTERP_CUBIC, antialias=True)
        img = fn.cast(img, dtype=types.FLOAT) * (1.0 / 255.0)
        # 1. AdaFace rectangle crop, zero padded (augment.crop_box in DALI arithmetic)
        if aug.crop_p > 0:
            area = (
                aug.crop_scale[0] + (aug.crop_scale[1] - aug.crop_scale[0]) * fn.random.uniform(range=[0.0, 1.0])
            ) * (S * S)
            ratio = dmath.exp(
                CROP_LOG_RATIO[0] + (CROP_LOG_RATIO[1] - CROP_LOG_RATIO[0]) * fn.random.uniform(range=[0.0, 1.0])
            )
            w = dmath.min(S, dmath.floor(dmath.sqrt(area * ratio) + 0.5))
            h = dmath.min(S, dmath.floor(dmath.sqrt(area / ratio) + 0.5))
            x0 = dmath.min(S - w, dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (S - w + 1.0)))
            y0 = dmath.min(S - h, dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (S - h + 1.0)))
            box0 = fn.cast(fn.stack(y0, x0), dtype=types.INT32)
            box1 = fn.cast(fn.stack(h, w), dtype=types.INT32)
            back = fn.cast(fn.stack(-y0, -x0), dtype=types.INT32)
            canvas = fn.cast(fn.stack(h * 0.0 + S, h * 0.0 + S), dtype=types.INT32)
            apply = _coin(aug.crop_p)
            if apply:
                img = fn.slice(img, box0, box1, axis_names="HW")
                img = fn.slice(img, back, canvas, axis_names="HW", out_of_bounds_policy="pad", fill_values=0.0)
        # 1b. AdaFace low-resolution rescale: down to max(1, int(r·S)) and back up, interpolations drawn
        if aug.lowres_p > 0:
            r = _uniform(*aug.lowres_ratio)
            small = dmath.max(1.0, dmath.floor(r * S)) if not isinstance(r, float) else float(max(1, int(r * S)))
            codes = dali_interp_codes(aug.lowres_interp)
            down, up = fn.random.choice(codes), fn.random.choice(codes)
            apply = _coin(aug.lowres_p)
            if apply:
                img = dali_low_res(img, small, down, up, size)
        # 2. flip: applied by crop_mirror_normalize below (later steps are mirror-symmetric; cutout mirrors its box)
        mirror = fn.random.coin_flip(probability=float(aug.flip)) if aug.flip > 0 else 0
        # 3. photometric: brightness+contrast about the mean grey level, then saturation
        if aug.photometric_p > 0:
            bri, con, sat = _uniform(b0, b1), _uniform(c0, c1), _uniform(s0, s1)
            apply = _coin(aug.photometric_p)
            if apply:
                means = fn.reductions.mean(img, axes=[0, 1])
                m = means[0] * GRAY_WEIGHTS[0] + means[1] * GRAY_WEIGHTS[1] + means[2] * GRAY_WEIGHTS[2]
                img = dmath.clamp(bri * (m + con * (img - m)), 0.0, 1.0)
                img = dmath.clamp(fn.saturation(img, saturation=sat), 0.0, 1.0)
        # 4. Gaussian blur, sigma ~ U(blur_sigma), radius ceil(3 sigma), reflect-101 borders
        if aug.blur_p > 0:
            sigma = _uniform(*aug.blur_sigma)
            apply = _coin(aug.blur_p)
            if apply:
                img = fn.gaussian_blur(img, sigma=sigma)
        # 4b. Cutout: a black square (its columns mirrored when the sample is, see dali_cutout)
        if aug.cutout_p > 0:
            y0, x0, h, w = dali_cutout_box(aug.cutout_size, size)
            apply = _coin(aug.cutout_p)
            if apply:
                img = dali_cutout(img, y0, x0, h, w, mirror, size)
        # 5. multi-resolution: bicubic down to the drawn size, back up to S, clamped to the image range
        lr = img
        if aug.multires_p > 0:
            px = dali_draw_resolution(aug.multires_sizes, aug.multires_weights)
            lr_size = fn.cast(px * 0.0, dtype=types.INT64)  # 0 = not degraded
            apply = _coin(aug.multires_p)
            if apply:
                lo, hi = fn.reductions.min(img), fn.reductions.max(img)
                lr = fn.resize(img, resize_x=px, resize_y=px, interp_type=types.INTERP_CUBIC, antialias=True)
                lr = fn.resize(lr, resize_x=S, resize_y=S, interp_type=types.INTERP_CUBIC)
                lr = dmath.clamp(lr, lo, hi)
                lr_size = fn.cast(px, dtype=types.INT64)
        else:
            lr_size = fn.cast(fn.random.coin_flip(probability=0.0), dtype=types.INT64)

        # 6. normalise to [-1, 1], CHW; the mirror is shared by the HR and the LR copy
        def norm(x):
            return fn.crop_mirror_normalize(
                x, mirror=mirror, mean=[0.5], std=[0.5], dtype=types.FLOAT, output_layout="CHW"
            )

        result = [norm(img), fn.pad(cls, fill_value=0)] if aug.paired else [norm(lr), fn.pad(cls, fill_value=0)]
        if aug.paired:
            result += [norm(lr), lr_size]
        if with_keys:
            result.append(fn.pad(outs[2], fill_value=0))
        return tuple(result)

    return pipe()


# --------------------------------------------------------------------------- the loader


def _parse_bytes(arr) -> list[str]:
    a = arr.cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    return [bytes(row).rstrip(b"\0").decode("utf-8", "replace").strip() for row in a.reshape(a.shape[0], -1)]


class DaliTrainLoader(TrainLoaderBase):
    """See :mod:`pipeline.data.loader` for the interface shared with the torch loader."""

    def __init__(
        self,
        data_cfg: DataConfig,
        rank: int,
        world_size: int,
        seed: int,
        input_size: int = 112,
        with_keys: bool = False,
        device: str = "auto",
    ):
        super().__init__(data_cfg, rank, world_size, seed, input_size, with_keys)
        self.aug = validate(data_cfg.augment)
        self.threads = max(1, data_cfg.num_workers)
        if device not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"DaliTrainLoader: device must be auto, cpu or gpu, got {device!r}")
        if device == "gpu" and not torch.cuda.is_available():
            raise ConfigError("DaliTrainLoader: device 'gpu' asked for but CUDA is not available")
        use_gpu = device == "gpu" or (device == "auto" and torch.cuda.is_available())
        self.device_id = torch.cuda.current_device() if use_gpu else None
        self._tmp = tempfile.TemporaryDirectory(prefix="dali-wds-index-")
        self.paths, self.index_paths = self._scan()

    def _scan(self) -> tuple[list[str], list[str]]:
        from tqdm import tqdm

        paths, index_paths = [], []
        shards = self.manifest.shard_paths(self.root)
        bar = tqdm(shards, desc="checking shards", unit="shard", disable=self.rank != 0 or len(shards) < 50)
        for i, p in enumerate(bar):
            scan = scan_shard_cached(p, self.num_classes)
            name = Path(p).name
            if scan.error:
                self._record("shard", name, scan.error)
            for key, why in scan.bad_samples:
                self._record("sample", f"{name}/{key}", why)
            if not scan.samples:
                continue
            idx = Path(self._tmp.name) / f"{i:06d}.idx"
            write_index(scan, idx)
            paths.append(p)
            index_paths.append(str(idx))
        if not paths:
            raise DataError(f"{self.root}: no readable sample in any shard (corrupt: {self.stats()})")
        return paths, index_paths

    # ------------------------------------------------------------------ interface
    def pipeline(self, epoch: int | None = None):
        e = self.epoch if epoch is None else epoch
        return build_pipeline(
            self.paths,
            self.index_paths,
            self.aug,
            size=self.size,
            batch_size=self.batch_size,
            num_threads=self.threads,
            device_id=self.device_id,
            seed=hash_seed(self.seed, e, self.rank) % (2**31 - 1),
            shard_id=self.rank,
            num_shards=self.world,
            shuffle_buffer=self.cfg.shuffle_buffer,
            with_keys=self.with_keys,
            prefetch=self.cfg.dali_prefetch,
            hw_decoder_load=self.cfg.dali_hw_decoder_load,
        )

    def iter_from(self, step: int):
        if not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"iter_from: step {step} outside [0, {self.steps_per_epoch}]")
        return self._epoch(step)

    def _epoch(self, step: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        names = (
            ["image", "cls"]
            + (["image_lr", "lr_size"] if self.aug.paired else [])
            + (["key"] if self.with_keys else [])
        )
        pipe = self.pipeline()
        pipe.build()
        # size=-1 and no reader_name: the reader wraps around inside the rank's part; we take
        # exactly steps_per_epoch batches, so every rank yields the same count.
        it = DALIGenericIterator([pipe], names, size=-1, auto_reset=False, prepare_first_batch=False)
        try:
            for i in range(self.steps_per_epoch):
                out = next(it)[0]
                if i < step:
                    continue
                batch = {"image": out["image"]}
                batch["label"] = torch.tensor(
                    [int(s) for s in _parse_bytes(out["cls"])], dtype=torch.int64, device=out["image"].device
                )
                if self.aug.paired:
                    batch["image_lr"] = out["image_lr"]
                    batch["lr_size"] = out["lr_size"].reshape(-1).to(torch.int64)
                if self.with_keys:
                    batch["key"] = _parse_bytes(out["key"])
                yield batch
        finally:
            del it, pipe


__all__ = [
    "DaliTrainLoader",
    "build_pipeline",
    "dali_cutout",
    "dali_cutout_box",
    "dali_draw_resolution",
    "dali_interp_codes",
    "dali_low_res",
    "scan_shard",
    "write_index",
]
