"""CPU training loader: WebDataset shards → DataLoader workers → the augmentation spec.

Splitting (disjoint across ranks and workers, with rank and world passed explicitly, so it also
holds under ``torch.multiprocessing.spawn`` where webdataset's own ``split_by_node`` sees no
process group, ../shared/FACTS.md). Each (rank, worker) reader reads a list of shards and keeps
the samples whose position in that stream is ``m mod M``:

* ``shards >= world·workers``: shards are dealt to ranks, then to workers (M = 1): no tar is
  read twice.
* ``world <= shards < world·workers``: shards dealt to ranks; the workers of a rank all read the
  rank's shards and keep every ``workers``-th sample.
* ``shards < world``: every reader reads every shard and keeps every ``world·workers``-th sample.

The shard order is permuted per epoch with a seed shared by all ranks (``set_epoch``), so the
ranks' subsets are disjoint and together cover the epoch. A rank yields exactly
``steps_per_epoch`` batches: workers stream their samples once ("a pass"); the main process
re-chunks them into batches of ``batch_size``; a rank whose subset is too small starts another
pass over the *same* subset with a new shuffle (resampling), never touching other ranks' data.

Corrupt data: errors while reading a tar (truncated, garbage) skip the rest of that shard;
samples with a missing/undecodable image or a bad label are skipped. Workers report what they
skipped alongside their chunks, the main process warns once per shard/sample and counts them
(:meth:`TorchTrainLoader.stats`), so the counts survive worker processes.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.manifest import READ_EXTENSIONS, DataError
from data_prep.shards import check_crc
from pipeline.config import DataConfig
from pipeline.data.augment import Augmenter, decode, sample_generator, validate
from pipeline.data.base import TrainLoaderBase

_PENDING: list = []  # corrupt items seen in this process since the last chunk (worker-local)


def hash_seed(*parts) -> int:
    return int(sample_generator(*parts).initial_seed())


def _url_of(exn: BaseException) -> str:
    for a in reversed(getattr(exn, "args", ())):
        if isinstance(a, str) and a.endswith(".tar"):
            return a
    m = re.search(r"name='([^']+\.tar)'", str(exn))
    return m.group(1) if m else "unknown shard"


def _shard_error(exn: BaseException) -> bool:
    """webdataset handler for tar-level failures: record, skip the rest of that shard."""
    first = exn.args[0] if getattr(exn, "args", None) else exn
    _PENDING.append(("shard", Path(_url_of(exn)).name, f"{type(exn).__name__}: {first}"))
    return True


def _split_plan(num_shards: int, world: int, workers: int, rank: int, worker: int) -> tuple[str, int, int]:
    """(mode, modulus M, residue m) for this reader; see the module doc."""
    if num_shards >= world * workers:
        return "shards", 1, 0
    if num_shards >= world:
        return "rank-shards", workers, worker
    return "samples", world * workers, rank * workers + worker


def _reader_shards(urls: list[str], world: int, workers: int, rank: int, worker: int) -> list[str]:
    mode, _, _ = _split_plan(len(urls), world, workers, rank, worker)
    if mode == "shards":
        return urls[rank::world][worker::workers]
    if mode == "rank-shards":
        return urls[rank::world]
    return list(urls)


class _ShardStream(IterableDataset):
    """One pass of one rank: every DataLoader worker streams its share and yields chunks."""

    def __init__(
        self, urls, counts, rank, world, workers, chunk, aug, size, num_classes, seeds, skips, with_keys, shuffle_buffer
    ):
        self.shuffle_buffer = shuffle_buffer
        self.urls, self.counts = urls, counts  # epoch-ordered shard urls, {url: manifest count}
        self.rank, self.world, self.workers = rank, world, workers
        self.chunk, self.aug, self.size, self.num_classes = chunk, aug, size, num_classes
        self.seeds, self.skips, self.with_keys = seeds, skips, with_keys  # seeds=(seed, epoch, pass)

    def _worker(self) -> int:
        info = get_worker_info()
        return info.id if info is not None else 0

    # webdataset splitters: rank/world are ours, never read from the environment
    def _nodesplit(self, src):
        worker = self._worker()
        mine = set(_reader_shards(self.urls, self.world, self.workers, self.rank, worker))
        for item in src:
            if item["url"] in mine:
                yield item

    def _keep(self, src):
        _, modulus, residue = _split_plan(len(self.urls), self.world, self.workers, self.rank, self._worker())
        for i, sample in enumerate(src):
            if i % modulus == residue:
                yield sample

    def _shuffle(self, src):
        bufsize = self.shuffle_buffer
        if bufsize <= 1:
            yield from src
            return
        rng = random.Random(hash_seed(*self.seeds, "shuffle", self.rank, self._worker()))
        yield from wds.filters._shuffle(src, bufsize, min(bufsize, 100), rng=rng)

    def _decode(self, sample, augment: bool = True) -> tuple[dict | None, str | None]:
        key = f"{Path(sample.get('__url__', '?')).name}/{sample.get('__key__', '?')}"
        try:
            data = next((sample[e] for e in READ_EXTENSIONS if e in sample), None)
            if data is None:
                raise DataError("no image member (.jpg/.png/...)")
            if "cls" not in sample:
                raise DataError("no .cls member")
            if "crc" in sample:  # written by data_prep (older shards have none)
                check_crc(data, sample["crc"])
            label = int(sample["cls"].decode("ascii").strip())
            if not 0 <= label < self.num_classes:
                raise DataError(f"label {label} outside [0, {self.num_classes})")
            img = decode(data, self.size)
            if not augment:  # resume: only whether the sample is valid matters
                return {}, None
            out = self.aug(img, sample_generator(*self.seeds, key))
            out["label"] = label
            out["key"] = sample["src"].decode("utf-8", "replace") if "src" in sample else sample.get("__key__", "")
            return out, None
        except Exception as exn:  # noqa: BLE001 — any failure of one sample skips that sample
            return None, f"{key}: {type(exn).__name__}: {exn}"

    def _chunks(self, src):
        skip = self.skips[self._worker()] if self.skips else 0
        items, n_skipped, seen = [], 0, 0

        def flush():
            nonlocal items, n_skipped
            out = {"n_skipped": n_skipped, "corrupt": list(_PENDING), "n": len(items)}
            _PENDING.clear()
            if items:
                out["image"] = torch.stack([it["image"] for it in items])
                out["label"] = torch.tensor([it["label"] for it in items], dtype=torch.int64)
                if "image_lr" in items[0]:
                    out["image_lr"] = torch.stack([it["image_lr"] for it in items])
                    out["lr_size"] = torch.tensor([it["lr_size"] for it in items], dtype=torch.int64)
                if self.with_keys:
                    out["key"] = [it["key"] for it in items]
            items, n_skipped = [], 0
            return out

        # In the main process (num_workers=0) the tiny per-image ops run far faster on one thread;
        # the trainer's thread count is restored whenever control returns to it.
        main_threads = torch.get_num_threads() if get_worker_info() is None else 0
        if main_threads:
            torch.set_num_threads(1)
        for sample in src:
            # resume: samples consumed before the checkpoint are decoded (to know they are valid,
            # so that chunks are cut exactly as in a full pass) but not augmented
            skipping = seen < skip
            out, err = self._decode(sample, augment=not skipping)
            if err is not None:
                _PENDING.append(("sample", err.split(":", 1)[0], err))
                continue
            seen += 1
            if skipping:
                n_skipped += 1
            else:
                items.append(out)
            if n_skipped + len(items) >= self.chunk:
                out = flush()
                if main_threads:
                    torch.set_num_threads(main_threads)
                yield out
                if main_threads:
                    torch.set_num_threads(1)
        out = flush()
        if main_threads:
            torch.set_num_threads(main_threads)
        yield out  # the tail, and a marker carrying any corrupt reports

    def __iter__(self):
        _PENDING.clear()
        ds = wds.WebDataset(
            self.urls,
            handler=_shard_error,
            shardshuffle=False,
            nodesplitter=self._nodesplit,
            workersplitter=None,
            empty_check=False,
            seed=0,
        )
        return iter(ds.compose(self._keep).compose(self._shuffle).compose(self._chunks))


class _PlanMismatch(Exception):
    pass


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers ignore the trainer's stop signals: a SIGTERM/SIGINT/SIGUSR1 sent to the whole process
    group (scancel, torchrun, Ctrl-C) must reach only the main process, which finishes its step and writes a
    checkpoint; torch's own worker handler would otherwise let the worker die and take the run with it."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


class TorchTrainLoader(TrainLoaderBase):
    """See :mod:`pipeline.data.loader` for the interface shared with the DALI loader."""

    def __init__(
        self,
        data_cfg: DataConfig,
        rank: int,
        world_size: int,
        seed: int,
        input_size: int = 112,
        with_keys: bool = False,
    ):
        super().__init__(data_cfg, rank, world_size, seed, input_size, with_keys)
        self.aug = Augmenter(validate(data_cfg.augment), input_size)
        self.workers = max(1, data_cfg.num_workers)
        self.urls = self.manifest.shard_paths(self.root)
        self.counts = {u: s.count for u, s in zip(self.urls, self.manifest.shards)}

    # ------------------------------------------------------------------ interface
    def iter_from(self, step: int):
        """Batches ``step .. steps_per_epoch-1`` of the current epoch, the same as a full iteration
        would give them; the skipped samples are read and decoded but not augmented."""
        if not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"iter_from: step {step} outside [0, {self.steps_per_epoch}]")
        return self._epoch(step)

    # ------------------------------------------------------------------ internals
    def _epoch_urls(self, pass_idx: int) -> list[str]:
        """Epoch order of all shards (same on every rank); later passes reshuffle within the rank's subset."""
        urls = list(self.urls)
        random.Random(hash_seed(self.seed, self.epoch, "shards")).shuffle(urls)
        if pass_idx == 0:
            return urls
        mode, _, _ = _split_plan(len(urls), self.world, self.workers, self.rank, 0)
        if mode == "samples":
            return urls  # every reader reads all shards; a new pass differs by its shuffle and seeds
        mine = urls[self.rank :: self.world]
        random.Random(hash_seed(self.seed, self.epoch, pass_idx, self.rank)).shuffle(mine)
        # keep the dealing `urls[rank::world]` valid: place the rank's shards at its own positions
        out = list(urls)
        out[self.rank :: self.world] = mine
        return out

    def _worker_counts(self, urls: list[str]) -> list[int]:
        """Samples each worker will read this pass, from the manifest counts."""
        counts = []
        for w in range(self.workers):
            _, modulus, residue = _split_plan(len(urls), self.world, self.workers, self.rank, w)
            total = sum(self.counts[u] for u in _reader_shards(urls, self.world, self.workers, self.rank, w))
            counts.append(len(range(residue, total, modulus)))
        return counts

    def _skip_plan(self, counts: list[int], skip: int) -> list[int]:
        """Per worker: how many of its leading samples fall in the first ``skip`` of the pass.

        DataLoader yields the workers' chunks in turn, dropping a worker when it is exhausted.
        """
        B = self.batch_size
        chunks = [[B] * (c // B) + ([c % B] if c % B else []) for c in counts]
        plan, pos, j = [0] * len(counts), 0, 0
        while pos < skip and any(j < len(c) for c in chunks):
            for w, cw in enumerate(chunks):
                if j < len(cw) and pos < skip:
                    take = min(cw[j], skip - pos)
                    plan[w] += take
                    pos += take
            j += 1
        return plan

    def _pass(self, pass_idx: int, skip: int, planned: bool):
        """Chunks of one pass over the rank's subset; ``skip`` leading positions are dropped."""
        urls = self._epoch_urls(pass_idx)
        counts = self._worker_counts(urls)
        plan = self._skip_plan(counts, skip) if (planned and skip) else None
        ds = _ShardStream(
            urls,
            self.counts,
            self.rank,
            self.world,
            self.workers,
            self.batch_size,
            self.aug,
            self.size,
            self.num_classes,
            (self.seed, self.epoch, pass_idx),
            plan,
            self.with_keys,
            self.cfg.shuffle_buffer,
        )
        nw = self.cfg.num_workers
        dl = DataLoader(
            ds,
            batch_size=None,
            num_workers=nw,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=2 if nw else None,
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals,
        )
        pos = 0
        for chunk in dl:
            for kind, name, msg in chunk["corrupt"]:
                self._record(kind, name, msg)
            ns, n = chunk["n_skipped"], chunk["n"]
            if plan is not None and ((ns and pos + ns > skip) or (n and pos + ns < skip)):
                raise _PlanMismatch()
            pos += ns
            if n == 0:
                continue
            drop = max(0, min(n, skip - pos))  # unplanned skipping (fallback): drop decoded samples
            pos += n
            if drop:
                chunk = _slice(chunk, drop, n)
            yield chunk
        self._last_pass_positions = pos

    def _epoch(self, step: int):
        B, target = self.batch_size, self.steps_per_epoch - step
        skip = step * B
        buf, have, emitted, pass_idx = [], 0, 0, 0
        while emitted < target:
            before, buf_before, have_before = emitted, list(buf), have
            planned, pass_skip = True, skip
            while True:
                try:
                    for chunk in self._pass(pass_idx, pass_skip, planned):
                        buf.append(chunk)
                        have += _size(chunk)
                        while have >= B and emitted < target:
                            batch, buf, have = _take(buf, B, have)
                            emitted += 1
                            yield batch
                        if emitted >= target:
                            return
                    break
                except _PlanMismatch:
                    # The shards hold fewer samples than the manifest says (corrupt data), so the
                    # planned skip is off: replay the pass decoding everything and drop by position.
                    # Batches already given out stay given; the count of batches stays exact.
                    if not planned:
                        raise
                    used = (emitted - before) * B - have_before
                    planned = False
                    if used > 0:
                        pass_skip, buf, have = skip + used, [], 0
                    else:
                        buf, have = list(buf_before), have_before
            positions = self._last_pass_positions
            if positions == 0:
                raise DataError(
                    f"{self.root}: rank {self.rank} read no valid sample from its shards (corrupt: {self.stats()})"
                )
            skip = max(0, pass_skip - positions)
            pass_idx += 1


def _size(chunk: dict) -> int:
    return int(chunk["label"].shape[0])


def _slice(chunk: dict, a: int, b: int) -> dict:
    out = {}
    for k, v in chunk.items():
        if k in ("n_skipped", "corrupt"):
            continue
        out[k] = v if k == "n" else v[a:b]
    out["n"] = b - a
    return out


_BATCH_KEYS = ("image", "label", "image_lr", "lr_size", "key")


def _take(buf: list, B: int, have: int):
    """Exactly B samples from the front of the chunk buffer."""
    first = buf[0]
    if _size(first) == B:
        return {k: first[k] for k in _BATCH_KEYS if k in first}, buf[1:], have - B
    parts, need, rest = [], B, []
    for i, ch in enumerate(buf):
        n = _size(ch)
        if need == 0:
            rest = buf[i:]
            break
        if n <= need:
            parts.append(ch)
            need -= n
        else:
            parts.append(_slice(ch, 0, need))
            rest = [_slice(ch, need, n)] + buf[i + 1 :]
            need = 0
            break
    batch = {}
    for k in _BATCH_KEYS:
        if k in parts[0]:
            vals = [p[k] for p in parts]
            batch[k] = sum(vals, []) if k == "key" else torch.cat(vals)
    return batch, rest, have - B
