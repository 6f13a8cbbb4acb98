"""python -m benchmarks.bench_gpu: the --cpu-smoke mode runs every part on the CPU and writes every section.

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_bench_gpu.py.
"""

from __future__ import annotations

import pytest


def test_the_faces_are_found_through_lowq_shared(tmp_path, monkeypatch, shared_data):
    """On the GPU machine ../shared does not travel: gpu_check.sh carries a copy and points LOWQ_SHARED at it,
    and the bench must read it there (the 2026-11-27 H100 check lost its bench to the old fixed default)."""
    from benchmarks.gpu import shards as bench_gpu  # the bench's shard maker

    carried = tmp_path / "carried"
    (carried / "data").mkdir(parents=True)
    (carried / "data" / "lfw_view1_112").symlink_to(shared_data / "lfw_view1_112")
    monkeypatch.setenv("LOWQ_SHARED", str(carried))
    assert bench_gpu.default_shared() == carried / "data"
    shards = bench_gpu.make_shards(tmp_path / "shards", bench_gpu.default_shared(), num_classes=200)
    assert (shards / "manifest.json").is_file() and list(shards.glob("*.tar"))
    with pytest.raises(SystemExit) as exc:
        bench_gpu.make_shards(tmp_path / "none", tmp_path / "empty")
    assert "no LFW faces at" in str(exc.value) and "--shared" in str(exc.value) and "\n" not in str(exc.value)
