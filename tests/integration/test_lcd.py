"""LCD's occlusion-locality diagnostic on real faces (the ablation runner's, against LCD's own monitor): an
integration test — two networks and 256 faces take longer than the unit tier allows."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models.lcd import (
    occlude_faces,
    occlusion_concentration,
)
from pipeline.models.network import build_network
from tests.support.lcd import tiny_cfg


def test_occlusion_locality_diagnostic_reads_the_point_lcd_reads_in_any_network(small_bin, tmp_path):
    """The ablation diagnostic on real faces: for an LCD network it equals what LCD's own validation monitor
    measures on the same faces (LCD's input = bn3's output of stage 3's last block); for the baseline it is the
    same computation on bn3's output, captured here by a hook; a uniform split is ⌈0.1·c⌉/c."""
    from pipeline.eval.embed import to_model_input
    from pipeline.eval.sets import EvalSet, load_bin
    from pipeline.experiments.diagnostics import (
        DiagnosticContext,
        occlusion_locality_diagnostic,
        validation_monitors_diagnostic,
    )

    eval_set = EvalSet.from_bin(str(small_bin), name="t")
    ctx = DiagnosticContext(tmp_path, [eval_set], torch.device("cpu"), 112, {})
    images, _ = load_bin(small_bin, 112)
    faces = to_model_input(images[0::2])
    torch.manual_seed(13)
    net = build_network(tiny_cfg().model).eval()
    got = occlusion_locality_diagnostic(net, None, ctx)
    own = net.validation_monitors(faces)
    for kind in ("", "/eyes", "/mask"):
        assert got[f"occlusion_concentration{kind}"] == pytest.approx(own[f"lcd/occlusion_concentration{kind}"])
    assert got["spatial_entropy"] == pytest.approx(own["lcd/spatial_entropy_val"])
    assert validation_monitors_diagnostic(net, None, ctx) == own  # the same distinct faces (20 of the 40 images)

    base = build_network(tiny_cfg("model.inserts=[]").model).eval()
    feats = []
    hook = base.trunk.layer3[-1].bn3.register_forward_hook(lambda m, a, o: feats.append(o.detach()))
    with torch.no_grad():
        for x in (faces, occlude_faces(faces, "eyes"), occlude_faces(faces, "mask")):
            base.embed(x)
    hook.remove()
    got = occlusion_locality_diagnostic(base, None, ctx)
    assert validation_monitors_diagnostic(base, None, ctx) == {}  # no module of the baseline measures anything
    for i, kind in enumerate(("eyes", "mask"), start=1):
        share = occlusion_concentration(feats[0], feats[i])[0].mean()
        assert got[f"occlusion_concentration/{kind}"] == pytest.approx(float(share), rel=1e-6)
        assert math.ceil(0.1 * 64) / 64 < got[f"occlusion_concentration/{kind}"] < 1.0
