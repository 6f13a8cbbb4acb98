"""One TAR@FAR: what the trainer logs as ``val/<set>/tar@far=…`` (verify.verification_metrics over a pair set's
distances) is :func:`pipeline.eval.tarfar.tar_at_far` — the ``tarfar``/``ijb`` commands' definition — on the same
embeddings scored as those commands score them (cosine), and both equal scikit-learn's ROC point."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

from pipeline.eval import tarfar, verify


def sklearn_tar(genuine, impostor, far) -> float:
    y = np.r_[np.ones(len(genuine)), np.zeros(len(impostor))]
    fpr, tpr, _ = roc_curve(y, np.r_[genuine, impostor], drop_intermediate=False)
    return float(tpr[fpr <= far].max())


def test_trainer_tar_at_far_is_the_tarfar_definition_on_the_same_embeddings():
    rng = np.random.default_rng(0)
    pairs, dim = 4000, 16
    issame = rng.random(pairs) < 0.5
    emb = rng.normal(size=(2 * pairs, dim))
    emb[1::2][issame] = emb[0::2][issame] + 1.2 * rng.normal(size=(int(issame.sum()), dim))  # genuine: close
    flip = emb + 0.1 * rng.normal(size=emb.shape)

    logged = verify.verification_metrics(emb, flip, issame)["tar_at_far"]  # Trainer.evaluate → val/<set>/tar@far=

    # the tarfar command's scores: cosine of the L2-normalised flip-summed embeddings
    both = emb + flip
    unit = both / np.linalg.norm(both, axis=1, keepdims=True)
    cosine = np.sum(unit[0::2] * unit[1::2], axis=1)
    points = tarfar.tar_at_far(cosine[issame], cosine[~issame], verify.FARS)

    assert {tarfar.far_key(p.far) for p in points} == {f"tar@far={k}" for k in logged}  # the TensorBoard tag
    for p in points:
        key = f"{p.far:.0e}"
        if p.far * (~issame).sum() < 1:
            assert logged[key] is None and p.tar is None
            continue
        assert logged[key] == p.tar == sklearn_tar(cosine[issame], cosine[~issame], p.far), key
    assert 0 < logged["1e-02"] < 1 and logged["1e-04"] is None  # ~2,000 impostor pairs: 1e-4 not measurable
