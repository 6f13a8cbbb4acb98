"""The one evaluation front-end (issue 20 item 4): :func:`pipeline.eval.run.evaluate` against independent paths to
the same numbers — a labelled set's TAR@FAR against the tarfar command's file-by-file embedding, the embeddings it
keeps against embedding the decoded set directly — and the set type's cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.eval import run as ER
from pipeline.eval.degradations import CLEAN, parse_degradations
from pipeline.eval.embed import embed_images, embed_paths
from pipeline.eval.sets import EvalSet, read_image_set
from pipeline.eval.tarfar import all_pairs_metrics
from pipeline.faces import io as FIO


def pooled(x: torch.Tensor) -> torch.Tensor:
    """A cheap, deterministic embedder: 8×8 average pool of the face (per image, so batching cannot change it)."""
    return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)


def test_labelled_set_equals_tarfar_on_file_by_file_embeddings(tiny_folder):
    fars = (0.5, 1e-1)  # 62 impostor pairs: both measurable
    row = ER.evaluate(pooled, [EvalSet.from_images(tiny_folder, fars=fars)], image_size=56)["results"][0]
    image_set = read_image_set(tiny_folder)
    feats = embed_paths(pooled, image_set.paths, 56, batch_size=5)  # another batching, decoded file by file
    ref = all_pairs_metrics(feats, np.asarray(image_set.labels), fars)
    assert ER.metrics_of(row).keys() == ref.keys()
    for k, v in ref.items():
        assert row[k] == pytest.approx(v, abs=1e-12), k
    assert (row["set"], row["degradation"], row["genuine_pairs"]) == ("devtest_tiny", "clean", 4)


def test_cross_degradation_of_a_labelled_set_is_a_config_error(tiny_folder):
    with pytest.raises(ConfigError, match="a cross degradation needs pairs"):
        ER.evaluate(pooled, [EvalSet.from_images(tiny_folder)], parse_degradations(["cross:7"]), 56)


def test_kept_embeddings_are_the_clean_set_in_order(small_bin):
    out = ER.evaluate(pooled, [EvalSet.from_bin(small_bin)], [CLEAN], 56, keep_embeddings=True)
    images, _ = EvalSet.from_bin(small_bin).load(56)
    plain, _ = embed_images(pooled, images, batch_size=7)
    np.testing.assert_allclose(out["embeddings"]["lfw_small"], plain, rtol=0, atol=1e-6)


def test_a_rewritten_set_is_read_again(small_bin, tmp_path):
    bins, issame = FIO.read_bin(small_bin)
    path = tmp_path / "s.bin"
    FIO.write_bin(path, bins, issame)
    first = EvalSet.from_bin(path).decoded()
    assert EvalSet.from_bin(path).decoded() is first  # cached: decoded once
    FIO.write_bin(path, bins[2:] + bins[:2], issame)  # another order: another set
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    again = EvalSet.from_bin(path).decoded()
    assert again is not first and again.keys == first.keys[2:] + first.keys[:2]
