"""The plan of a shard run: a seeded permutation of a source's entries, cut into shards by sample count or by bytes.

Every shard mixes identities. The plan is a pure function of (source listing, seed, shard size), hashed into
``Plan.digest`` (no timestamps anywhere): the resume journal and the manifest name the plan by it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from data_prep.manifest import DataError
from data_prep.shard_source import Source

TOOL_VERSION = "1.0.0"
_TAR_OVERHEAD = 3 * 1024  # three 512-byte headers + padding per sample (for --shard-bytes)


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
        shards = _cut_by_bytes(perm, sizes, shard_bytes)
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


def _cut_by_bytes(perm: np.ndarray, sizes: np.ndarray, shard_bytes: int) -> list[np.ndarray]:
    """Greedy: a new shard starts when adding the next sample would pass the target."""
    cost = sizes[perm] + _TAR_OVERHEAD
    cuts, cur = [], 0
    for i, c in enumerate(cost.tolist()):
        if cur and cur + c > shard_bytes:
            cuts.append(i)
            cur = 0
        cur += c
    return np.split(perm, cuts)
