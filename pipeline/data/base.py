"""What the torch and DALI training loaders share: the manifest, the batch count, the epoch
counter and the bookkeeping of skipped corrupt shards and samples. The interface itself is
documented in :mod:`pipeline.data.loader`."""

from __future__ import annotations

import logging
from pathlib import Path

from data_prep.manifest import read_manifest
from pipeline.config import DataConfig, check

log = logging.getLogger("pipeline.data")


def steps_for(num_images: int, batch_size: int, world_size: int) -> int:
    """Batches per rank and epoch; every rank yields exactly this many (no deadlock)."""
    return max(1, num_images // (batch_size * world_size))


class TrainLoaderBase:
    def __init__(self, data_cfg: DataConfig, rank: int, world_size: int, seed: int, input_size: int, with_keys: bool):
        check(data_cfg, "data.")  # a DataConfig built in code has not been through the loader's validation
        self.root = Path(data_cfg.train)
        self.manifest = read_manifest(self.root)
        self.cfg, self.rank, self.world, self.seed = data_cfg, rank, world_size, seed
        self.size, self.with_keys = input_size, with_keys
        self.num_classes = self.manifest.num_classes
        self.num_images = self.manifest.num_images
        self.batch_size = data_cfg.batch_size
        self.steps_per_epoch = steps_for(self.num_images, self.batch_size, world_size)
        self.epoch = 0
        self._corrupt: dict[str, dict[str, str]] = {"shard": {}, "sample": {}}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, step: int):  # pragma: no cover - implemented by each engine
        raise NotImplementedError

    def stats(self) -> dict:
        return {"corrupt_samples": len(self._corrupt["sample"]), "corrupt_shards": len(self._corrupt["shard"])}

    def _record(self, kind: str, name: str, msg: str) -> None:
        """Count a skipped shard or sample once, and warn once."""
        if name not in self._corrupt[kind]:
            self._corrupt[kind][name] = msg
            log.warning("skipping corrupt %s %s (%s)", kind, name, msg)
