"""Both training loaders on real LFW shards: layout, parity, rank/worker splits, corrupt data, resume.

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_loaders.py.
"""

from __future__ import annotations

import pytest

from data_prep.manifest import DataError
from pipeline.config import ConfigError
from pipeline.data.loader import build_train_loader
from tests.support.loaders import _cfg, _keys, _run, make_shards


def test_dali_ranks_disjoint_and_cover(shards4):
    root, all_keys = shards4
    for shuffle in (0, 40):
        seen = []
        for rank in range(2):
            L = build_train_loader(_cfg(root, "dali", shuffle_buffer=shuffle), rank, 2, seed=1, with_keys=True)
            bs = _run(L)
            assert len(bs) == L.steps_per_epoch == 4
            seen.append(_keys(bs))
            assert len(set(seen[-1])) == len(seen[-1])
        assert not set(seen[0]) & set(seen[1])
        if shuffle == 0:  # DALI's shuffle buffer may draw across its epoch boundary; without it: exact cover
            assert sorted(seen[0] + seen[1]) == sorted(all_keys)


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_bad_input_is_a_one_line_error(tmp_path, loader):
    with pytest.raises(DataError, match="does not exist"):
        build_train_loader(_cfg(tmp_path / "nope", loader), 0, 1, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest"):
        build_train_loader(_cfg(tmp_path / "empty", loader), 0, 1, 0)


def test_unknown_loader_is_a_config_error(shards4):
    with pytest.raises(ConfigError, match="data.loader"):
        build_train_loader(_cfg(shards4[0], "tf"), 0, 1, 0)


def test_dali_shard_scan_is_cached_and_invalidated(lfw_train, tmp_path):
    from pipeline.data.dali_loader import cache_dir, scan_shard, scan_shard_cached

    root, _ = make_shards(lfw_train, tmp_path / "wds", 32, 32, bad_image_at=3)
    shard = root / "shard-000000.tar"
    first = scan_shard_cached(shard, 200)
    assert len(first.samples) == 31 and [k for k, _ in first.bad_samples] == ["s00003"] and first.error is None
    assert len(list(cache_dir().glob("*.json"))) >= 1
    again = scan_shard_cached(shard, 200)
    assert again == first == scan_shard(shard, 200)
    shard.write_bytes(shard.read_bytes()[:20_000])  # changed file → new scan, not the cached one
    assert scan_shard_cached(shard, 200).error is not None


# --------------------------------------------------------------------------- AdaFace low-res rescale, Cutout
