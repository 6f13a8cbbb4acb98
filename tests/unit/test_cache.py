"""pipeline.core.cache, the one on-disk cache: a record or array is read back only for the key it was written for;
anything else (absent, another key, half-written, another shape or type, a pickle) reads as absent."""

from __future__ import annotations

import numpy as np

from pipeline.core import cache


def test_record_is_valid_for_its_key_only(tmp_path):
    path = tmp_path / "sub" / "r.json"
    assert cache.read_record(path, {"a": 1}) is None  # absent
    cache.write_record(path, {"a": 1}, {"value": 3})
    assert cache.read_record(path, {"a": 1}) == {"value": 3, "key": {"a": 1}}
    assert cache.read_record(path, {"a": 2}) is None
    path.write_text('{"value": 3, "key": {"a": 1}')  # half-written
    assert cache.read_record(path, {"a": 1}) is None
    assert not list(path.parent.glob(".*tmp*"))  # nothing left behind by the writes


def test_array_shape_type_and_pickles(tmp_path):
    path = tmp_path / "a.npy"
    assert cache.load_array(path, 3) == (None, "absent")
    cache.save_array(path, np.ones((3, 4), np.float32))
    a, why = cache.load_array(path, 3)
    assert why == "" and a.shape == (3, 4)
    assert cache.load_array(path, 2)[1] == "cache holds float32 (3, 4), expected 2 rows"
    cache.save_array(path, np.ones((3, 4), np.float64))
    assert cache.load_array(path, 3)[0] is None
    np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)  # a pickle is never loaded
    assert cache.load_array(path, 1)[1].startswith("unreadable cache")


def test_digest_is_canonical():
    assert cache.digest({"b": 1, "a": [1, 2]}) == cache.digest({"a": [1, 2], "b": 1})
    assert cache.digest({"a": 1}) != cache.digest({"a": 2})
    assert len(cache.digest({"a": 1}, 16)) == 16
