"""Shared by tests/unit/test_eval_identify.py and tests/integration/test_eval_identify.py: fixtures and helpers of both halves."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from pipeline.eval import embed as EM
from pipeline.eval import identify as I
from pipeline.eval import sets as ES
from pipeline.models.iresnet import build_iresnet

SIZE = 56  # network input (px): small keeps the 2-core CPU time down


@pytest.fixture(scope="module")
def lfw(shared_data):
    return shared_data / "lfw_view1_112"


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return build_iresnet(18, width=0.0625, embedding_size=64, input_size=SIZE).embedder().eval()


@pytest.fixture(scope="module")
def devtest_feats(tiny_net, devtest) -> np.ndarray:
    """Embeddings of all 1,549 dev-test images by a random-init tiny network (the production path)."""
    return EM.embed_paths(tiny_net, devtest.paths, SIZE, batch_size=256)


@pytest.fixture(scope="module")
def train_distractors(lfw) -> ES.ImageSet:
    """Every 18th LFW training image (101 images of people disjoint from dev-test)."""
    full = ES.read_image_list(lfw / "train_list.txt")
    return ES.ImageSet(full.paths[::18], full.labels[::18], full.source)


def first_image_gallery(images: ES.ImageSet) -> tuple[list[int], list[int]]:
    """(gallery rows: the first image of every identity, probe rows: all the others)."""
    gallery, probes, seen = [], [], set()
    for row, label in enumerate(images.labels):
        (probes if label in seen else gallery).append(row)
        seen.add(label)
    return gallery, probes


def brute_force_cmc(probe, probe_labels, gallery, gallery_labels, max_rank) -> np.ndarray:
    """The whole similarity matrix, each row sorted (numpy argsort), first same-label position."""
    order = np.argsort(-(probe @ gallery.T), axis=1, kind="stable")
    ranks = np.array(
        [
            1 + np.flatnonzero(gallery_labels[order[i]] == probe_labels[i])[0]
            if (gallery_labels == probe_labels[i]).any()
            else np.inf
            for i in range(len(probe))
        ]
    )
    return np.array([(ranks <= k).mean() for k in range(1, max_rank + 1)])


def write_list(path, paths, labels=None):
    lines = [f"{p} {lab}" for p, lab in zip(paths, labels)] if labels is not None else [str(p) for p in paths]
    path.write_text("# image label\n\n" + "\n".join(lines) + "\n")
    return path


def make_scface(root, images: ES.ImageSet, subjects: int = 4, cameras=range(1, 7)):
    """SCface's layout from LFW images: mugshot_frontal_cropped_all/<id>_frontal.JPG and
    surveillance_cameras_distance_<d>/cam_<c>/<id>_cam<c>_<d>.jpg (cam 6: infrared)."""
    (root / I.SCFACE_MUGSHOTS).mkdir(parents=True)
    source = iter(images.paths)
    for s in range(1, subjects + 1):
        shutil.copyfile(next(source), root / I.SCFACE_MUGSHOTS / f"{s:03d}_frontal.JPG")
        for d in (1, 2, 3):
            for c in cameras:
                folder = root / f"surveillance_cameras_distance_{d}" / f"cam_{c}"
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(next(source), folder / f"{s:03d}_cam{c}_{d}.jpg")


def sklearn_tar_at_far(genuine, impostor, far) -> float:
    """Reference: the best TPR among the ROC points whose FPR ≤ far (every point kept)."""
    y = np.r_[np.ones(len(genuine)), np.zeros(len(impostor))]
    fpr, tpr, _ = roc_curve(y, np.r_[genuine, impostor], drop_intermediate=False)
    return float(tpr[fpr <= far].max())
