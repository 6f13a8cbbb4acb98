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
  ``interp_type`` (:func:`~pipeline.data.dali_ops.dali_low_res`), nearest with its source origin shifted by
  :data:`pipeline.data.degrade.NN_ROI_SHIFT` through ``roi_start``/``roi_end``;
* flip: the ``mirror`` of the final ``fn.crop_mirror_normalize`` (the spec's later steps are
  mirror-symmetric but cutout, whose square is mirrored instead, see the augment module doc);
* photometric: DALI arithmetic ``b·(m + c·(x − m))`` with ``m`` the mean grey level from
  ``fn.reductions.mean`` (exactly ``fn.brightness_contrast`` with ``contrast_center=m``, but
  valid with a GPU-computed ``m``), then ``fn.saturation``; clamps with ``dali.math.clamp``;
* blur: ``fn.gaussian_blur(sigma=fn.random.uniform(blur_sigma))``;
* cutout: two ``fn.random.uniform`` draws → the square of :func:`pipeline.data.augment.cutout_box` in
  DALI arithmetic, mirrored when the sample will be mirrored, then ``fn.erase``
  (:func:`~pipeline.data.dali_ops.dali_cutout`);
* multi-resolution: ``fn.random.choice(sizes, p)`` then two cubic ``fn.resize`` with float sizes;
* every probability with ``fn.random.coin_flip`` and DALI conditionals (``enable_conditionals``).

Each step is one stage function below (``_decode``, ``_crop``, ``_low_res``, ``_photometric``, ``_blur``,
``_cutout``, ``_multires``, ``_outputs``) that takes and returns DataNodes; :func:`build_pipeline` chains them.

Labels: ``.cls`` payloads are padded (``fn.pad``) and parsed to int on the Python side.

Splitting: ``shard_id=rank, num_shards=world`` (DALI splits the sample sequence into contiguous
disjoint parts); ``stick_to_shard`` keeps a rank on its part, a short part wraps around (repeats
within the rank's own samples). Epoch length comes from the manifest; each epoch builds a fresh
pipeline seeded by (seed, epoch, rank), so ``set_epoch`` reshuffles and a resumed run sees the
same order. ``iter_from(step)`` runs the first ``step`` batches through the pipeline (DALI's
random state is sequential, so skipping is not cheap here).

Corrupt data: DALI stops on a truncated tar or an undecodable image, so every shard is checked at start-up
(:mod:`pipeline.data.shard_scan`: tar headers, image magic bytes, labels, ``.crc`` checksums; cached) and the DALI
index files are written for the good samples only. Skipped shards/samples are warned about and counted (``stats()``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from data_prep.manifest import DataError
from pipeline.config import ConfigError, DataConfig
from pipeline.data.augment import CROP_LOG_RATIO, GRAY_WEIGHTS, photometric_ranges, validate
from pipeline.data.base import TrainLoaderBase
from pipeline.data.dali_ops import (
    dali_cutout,
    dali_cutout_box,
    dali_draw_resolution,
    dali_interp_codes,
    dali_low_res,
)
from pipeline.data.shard_scan import (  # noqa: F401  (cache_dir re-exported: pipeline.data.dali_loader.cache_dir)
    DALI_EXTENSIONS,
    cache_dir,
    scan_shard,
    scan_shard_cached,
    write_index,
)
from pipeline.data.torch_loader import hash_seed

# --------------------------------------------------------------------------- per-sample draws


def _coin(p: float):
    """Python ``True`` for p >= 1 (no op), else a per-sample DALI coin (a conditional's predicate)."""
    from nvidia.dali import fn, types

    return True if p >= 1 else fn.random.coin_flip(probability=float(p), dtype=types.BOOL)


def _uniform(lo: float, hi: float):
    """U(lo, hi) per sample; a plain float when the range is one point (DALI needs lo < hi)."""
    from nvidia.dali import fn

    return float(lo) if hi <= lo else fn.random.uniform(range=[float(lo), float(hi)])


# --------------------------------------------------------------------------- the stages of the graph
# DALI's conditionals convert the functions the pipeline calls too: a per-sample ``if`` works inside each stage.


def _read_samples(paths, index_paths, *, seed: int, shard_id: int, num_shards: int, shuffle_buffer: int, with_keys):
    """The reader: this rank's part of the shards (``stick_to_shard``), shuffled through ``shuffle_buffer``;
    outputs the encoded image, the ``.cls`` bytes and, ``with_keys``, the ``.src`` bytes."""
    from nvidia.dali import fn

    return fn.readers.webdataset(
        paths=paths,
        index_paths=index_paths,
        ext=[";".join(DALI_EXTENSIONS), "cls"] + (["src"] if with_keys else []),
        missing_component_behavior="skip",
        shard_id=shard_id,
        num_shards=num_shards,
        random_shuffle=shuffle_buffer > 1,
        initial_fill=max(1, shuffle_buffer),
        seed=seed,
        stick_to_shard=True,
        name="reader",
    )


def _decode(jpegs, size: int, gpu: bool, hw_decoder_load: float):
    """0. decode (GPU: nvJPEG via "mixed") to float RGB in [0, 1]; resized to S×S only when the stored size differs."""
    from nvidia.dali import fn, types

    S = float(size)
    shape = fn.peek_image_shape(jpegs)
    if gpu:  # hw_decoder_load: the share of images for the GPU's hardware JPEG decoder (the rest: CUDA)
        img = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load)
    else:
        img = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
    if (shape[0] != size) | (shape[1] != size):
        img = fn.resize(img, resize_x=S, resize_y=S, interp_type=types.INTERP_CUBIC, antialias=True)
    return fn.cast(img, dtype=types.FLOAT) * (1.0 / 255.0)


def _crop(img, crop_scale, crop_p: float, size: int):
    """1. AdaFace rectangle crop with probability ``crop_p``, zero padded (augment.crop_box in DALI arithmetic)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    S = float(size)
    area = (crop_scale[0] + (crop_scale[1] - crop_scale[0]) * fn.random.uniform(range=[0.0, 1.0])) * (S * S)
    ratio = dmath.exp(CROP_LOG_RATIO[0] + (CROP_LOG_RATIO[1] - CROP_LOG_RATIO[0]) * fn.random.uniform(range=[0.0, 1.0]))
    w = dmath.min(S, dmath.floor(dmath.sqrt(area * ratio) + 0.5))
    h = dmath.min(S, dmath.floor(dmath.sqrt(area / ratio) + 0.5))
    x0 = dmath.min(S - w, dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (S - w + 1.0)))
    y0 = dmath.min(S - h, dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (S - h + 1.0)))
    box0 = fn.cast(fn.stack(y0, x0), dtype=types.INT32)
    box1 = fn.cast(fn.stack(h, w), dtype=types.INT32)
    back = fn.cast(fn.stack(-y0, -x0), dtype=types.INT32)
    canvas = fn.cast(fn.stack(h * 0.0 + S, h * 0.0 + S), dtype=types.INT32)
    apply = _coin(crop_p)
    if apply:
        img = fn.slice(img, box0, box1, axis_names="HW")
        img = fn.slice(img, back, canvas, axis_names="HW", out_of_bounds_policy="pad", fill_values=0.0)
    return img


def _low_res(img, aug, size: int):
    """1b. AdaFace low-resolution rescale with probability ``lowres_p``: down to max(1, int(r·S)) and back up,
    the two interpolations drawn from ``lowres_interp`` (:func:`dali_low_res`)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn

    S = float(size)
    r = _uniform(*aug.lowres_ratio)
    small = dmath.max(1.0, dmath.floor(r * S)) if not isinstance(r, float) else float(max(1, int(r * S)))
    codes = dali_interp_codes(aug.lowres_interp)
    down, up = fn.random.choice(codes), fn.random.choice(codes)
    apply = _coin(aug.lowres_p)
    if apply:
        img = dali_low_res(img, small, down, up, size)
    return img


def _photometric(img, photometric_p: float, brightness, contrast, saturation):
    """3. photometric with probability ``photometric_p``: brightness+contrast about the mean grey level, then
    saturation, each factor drawn from its ``(low, high)`` range (:func:`pipeline.data.augment.photometric_ranges`)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn

    bri, con, sat = _uniform(*brightness), _uniform(*contrast), _uniform(*saturation)
    apply = _coin(photometric_p)
    if apply:
        means = fn.reductions.mean(img, axes=[0, 1])
        m = means[0] * GRAY_WEIGHTS[0] + means[1] * GRAY_WEIGHTS[1] + means[2] * GRAY_WEIGHTS[2]
        img = dmath.clamp(bri * (m + con * (img - m)), 0.0, 1.0)
        img = dmath.clamp(fn.saturation(img, saturation=sat), 0.0, 1.0)
    return img


def _blur(img, blur_sigma, blur_p: float):
    """4. Gaussian blur with probability ``blur_p``, sigma ~ U(blur_sigma), radius ceil(3 sigma), reflect-101
    borders."""
    from nvidia.dali import fn

    sigma = _uniform(*blur_sigma)
    apply = _coin(blur_p)
    if apply:
        img = fn.gaussian_blur(img, sigma=sigma)
    return img


def _cutout(img, cutout_size: int, cutout_p: float, mirror, size: int):
    """4b. Cutout with probability ``cutout_p``: a black square (its columns mirrored when the sample is, see
    :func:`dali_cutout`)."""
    y0, x0, h, w = dali_cutout_box(cutout_size, size)
    apply = _coin(cutout_p)
    if apply:
        img = dali_cutout(img, y0, x0, h, w, mirror, size)
    return img


def _multires(img, aug, size: int):
    """5. multi-resolution with probability ``multires_p``: bicubic down to the drawn size, back up to S, clamped
    to the image range. Returns (the low-resolution copy, its size in px as int64: 0 = not degraded)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    S = float(size)
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
    return lr, lr_size


def _outputs(img, lr, lr_size, cls, key, mirror, paired: bool) -> tuple:
    """6. normalise to [-1, 1], CHW, the mirror shared by the HR and the LR copy; the outputs: image (``lr``
    unless ``paired``), cls bytes, [image_lr, lr_size] when ``paired``, [key bytes] when ``key`` is given."""
    from nvidia.dali import fn, types

    def norm(x):
        return fn.crop_mirror_normalize(x, mirror=mirror, mean=[0.5], std=[0.5], dtype=types.FLOAT, output_layout="CHW")

    result = [norm(img), fn.pad(cls, fill_value=0)] if paired else [norm(lr), fn.pad(cls, fill_value=0)]
    if paired:
        result += [norm(lr), lr_size]
    if key is not None:
        result.append(fn.pad(key, fill_value=0))
    return tuple(result)


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
    from nvidia.dali import fn, pipeline_def

    gpu = device_id is not None
    photometric = photometric_ranges(aug)  # ((b0, b1), (c0, c1), (s0, s1))
    validate(aug)
    split = dict(seed=seed, shard_id=shard_id, num_shards=num_shards, shuffle_buffer=shuffle_buffer)

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        enable_conditionals=True,
        prefetch_queue_depth=prefetch,
    )
    def pipe():
        outs = _read_samples(paths, index_paths, **split, with_keys=with_keys)
        img = _decode(outs[0], size, gpu, hw_decoder_load)
        if aug.crop_p > 0:
            img = _crop(img, aug.crop_scale, aug.crop_p, size)
        if aug.lowres_p > 0:
            img = _low_res(img, aug, size)
        # 2. flip: crop_mirror_normalize mirrors in _outputs (later steps are mirror-symmetric; cutout mirrors its box)
        mirror = fn.random.coin_flip(probability=float(aug.flip)) if aug.flip > 0 else 0
        if aug.photometric_p > 0:
            img = _photometric(img, aug.photometric_p, *photometric)
        if aug.blur_p > 0:
            img = _blur(img, aug.blur_sigma, aug.blur_p)
        if aug.cutout_p > 0:
            img = _cutout(img, aug.cutout_size, aug.cutout_p, mirror, size)
        lr, lr_size = _multires(img, aug, size)
        return _outputs(img, lr, lr_size, outs[1], outs[2] if with_keys else None, mirror, aug.paired)

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
