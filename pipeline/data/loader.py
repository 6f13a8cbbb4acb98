"""Training-loader factory: ``data.loader`` picks the engine, the trainer sees one interface.

``build_train_loader(data_cfg, rank, world_size, seed, input_size=112)`` returns an object with

* ``num_classes``, ``num_images`` (from the shard directory's ``manifest.json``);
* ``steps_per_epoch`` = ``num_images // (batch_size · world_size)`` (at least 1);
* ``set_epoch(epoch)``: the next iteration uses the order seeded by (seed, epoch);
* ``__iter__``: exactly ``steps_per_epoch`` batches on every rank (ranks never deadlock; a rank
  whose share is short resamples within its own disjoint share); ``iter_from(step)`` gives the
  batches ``step..steps_per_epoch-1`` of the epoch (resume);
* batches: ``{"image": float32 (B,3,S,S) in [-1,1], "label": int64 (B,)}`` plus, when
  ``data.augment.paired``, ``"image_lr"`` (B,3,S,S) and ``"lr_size"`` int64 (B,); with
  ``with_keys=True`` (tests, debugging) also ``"key"``: the samples' ``.src`` keys;
* ``stats()`` → ``{"corrupt_samples": n, "corrupt_shards": n}`` (distinct items skipped so far).

``auto`` (the default): DALI when training on CUDA and DALI imports, else torch.
``torch``: :class:`pipeline.data.torch_loader.TorchTrainLoader` (WebDataset + DataLoader workers,
CPU). ``dali``: :class:`pipeline.data.dali_loader.DaliTrainLoader` (decode and augment on the
GPU when CUDA is present, else DALI's CPU operators). Both implement
:mod:`pipeline.data.augment`.
"""

from __future__ import annotations

import torch

from pipeline.config import ConfigError, DataConfig

LOADERS = ("auto", "torch", "dali")


def resolve_loader(name: str, device: str | torch.device = "cpu") -> tuple[str, str]:
    """(engine, why) for ``data.loader``: ``auto`` is DALI when training on CUDA and DALI imports (decode
    with nvJPEG "mixed", every augmentation on the GPU), else the torch loader."""
    device = torch.device(device)
    if name != "auto":
        return name, f"data.loader={name}"
    if device.type != "cuda":
        return "torch", f"data.loader=auto on {device.type}: the torch loader"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        return "torch", f"data.loader=auto: nvidia-dali does not import ({exc}); the torch loader on the CPU"
    return "dali", "data.loader=auto on CUDA: DALI, mixed decoding and augmentation on the GPU"


def build_train_loader(
    data_cfg: DataConfig,
    rank: int,
    world_size: int,
    seed: int,
    input_size: int = 112,
    with_keys: bool = False,
    device: str | torch.device = "cpu",
):
    """The loader ``data.loader`` names (``auto``: see :func:`resolve_loader`); ``.engine`` / ``.why`` say which."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"build_train_loader: rank {rank} outside [0, {world_size})")
    engine, why = resolve_loader(data_cfg.loader, device)
    if engine == "torch":
        from pipeline.data.torch_loader import TorchTrainLoader

        loader = TorchTrainLoader(data_cfg, rank, world_size, seed, input_size, with_keys=with_keys)
    elif engine == "dali":
        try:
            from pipeline.data.dali_loader import DaliTrainLoader
        except ImportError as exc:
            raise ConfigError(f"data.loader: 'dali' needs nvidia-dali ({exc}); use data.loader=torch") from None
        loader = DaliTrainLoader(data_cfg, rank, world_size, seed, input_size, with_keys=with_keys)
    else:
        raise ConfigError(f"data.loader: unknown loader {data_cfg.loader!r} (known: {', '.join(LOADERS)})")
    loader.engine, loader.why = engine, why
    return loader
