"""Composable face models: trunk + conv kind + inserts + head, trained by any procedure (issue 8).

Unit level (tiny widths): the forward returns aux losses / monitors as values and keeps nothing on a
module; inserts sit exactly at their named point; heads read the points they ask for; the classifier
width comes from the head; registration and renamed keys. End to end (real LFW faces, the real trainer):
SCAN × LRFR, SCAN × fc folded → ONNX, and the test insert + test head through checkpoint → eval → export.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_compose.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models.network import build_network
from tests.helpers import run, train_command
from tests.support.compose import PROBE, SMOKE

# --------------------------------------------------------------------------- the network object


def tb_scalars(tb_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def lfw_faces(lfw_bin, n=6):
    """The first n real faces of the LFW dev-test .bin as model input: (n, 3, 112, 112) in [-1, 1]."""
    from pipeline.eval.embed import to_model_input
    from pipeline.eval.sets import load_bin

    imgs, _ = load_bin(lfw_bin, 112)
    return to_model_input(imgs[:n]).contiguous()


@pytest.mark.slow
def test_scan_convs_under_lrfr_pairing(lfw_shards, tmp_path):
    out = tmp_path / "scan_lrfr"
    run(
        train_command(
            "schedule.max_steps=4",
            "output.log_every=2",
            "model.backbone=iresnet18",
            f"data.train={lfw_shards}",
            f"output.dir={out}",
            configs=["configs/compose/scan_lrfr.yaml", SMOKE],
        )
    )
    tags = tb_scalars(out / "tb")
    for tag in (
        "loss/rmo",
        "loss/dist",
        "loss/cls_hr",
        "loss/cls_lr",
        "loss/total",
        "monitor/scan/t_mean",
        "monitor/dist_7px",
        "monitor/cos_hr_lr",
    ):
        assert tag in tags and len(tags[tag]) == 2 and all(np.isfinite(tags[tag])), tag
    # both terms enter the total: total = ½ cls_hr + ½ cls_lr + dist + rmo (rank-mean of each)
    for i in range(2):
        parts = 0.5 * tags["loss/cls_hr"][i] + 0.5 * tags["loss/cls_lr"][i] + tags["loss/dist"][i] + tags["loss/rmo"][i]
        assert abs(parts - tags["loss/total"][i]) <= 1e-5 * abs(parts)
    assert 0 < tags["loss/rmo"][0]


@pytest.mark.slow
def test_scan_fc_folded_onnx_agrees_on_real_faces(lfw_shards, lfw_bin, tmp_path):
    import onnxruntime as ort

    from pipeline.checkpoint import load_network

    out = tmp_path / "scan_fc"
    run(
        train_command(
            "schedule.max_steps=3",
            f"data.train={lfw_shards}",
            f"output.dir={out}",
            configs=["configs/compose/scan_fc.yaml", SMOKE],
        )
    )
    onnx_path, folded_pt = tmp_path / "scan.onnx", tmp_path / "folded.pt"
    log = run(
        [
            sys.executable,
            "-m",
            "pipeline.export",
            "--checkpoint",
            out,
            "--out",
            onnx_path,
            "--fold",
            "--save-folded",
            folded_pt,
        ]
    ).stdout
    assert "folded 17 convolution layers" in log and "plain convolutions only" in log
    net, model_cfg, _ = load_network(out)
    x = lfw_faces(lfw_bin)
    with torch.no_grad():
        ref = net.eval().embed(x).numpy()  # the unfolded SCAN network, as trained
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    scale = float(np.abs(ref).max())
    assert float(np.abs(got - ref).max()) <= 1e-4 * max(1.0, scale)
    # the folded state dict is the plain-conv network of the same config
    import dataclasses

    from pipeline.config import PartOptions

    plain = build_network(dataclasses.replace(model_cfg, conv=PartOptions(kind="plain")))
    plain.load_state_dict(torch.load(folded_pt, weights_only=True), strict=True)
    with torch.no_grad():
        assert float((plain.eval().embed(x) - torch.from_numpy(ref)).abs().max()) <= 1e-4 * max(1.0, scale)


@pytest.mark.slow
def test_probe_insert_and_head_roundtrip_checkpoint_eval_export(lfw_shards, lfw_bin, tmp_path):
    import onnxruntime as ort

    from pipeline.checkpoint import load_network
    from pipeline.eval.checkpoint import load_model

    out = tmp_path / "probe"
    run(
        train_command(
            "schedule.max_steps=4",
            "output.log_every=2",
            "output.histogram_every=2",
            f"data.train={lfw_shards}",
            f"output.dir={out}",
            f"data.val=[{lfw_bin}]",
            configs=[PROBE, SMOKE],
        )
    )
    tags = tb_scalars(out / "tb")
    assert {"loss/probe", "monitor/probe/layer3.branch/mean_abs", "monitor/probe/pooled_norm"} <= set(tags)
    ck = out / "checkpoints" / "step_0000004"
    state = torch.load(ck / "model.pt", weights_only=True)
    assert any(".branch.inserts.0.gain" in k for k in state) and "head.proj.weight" in state
    net, _, _ = load_network(out)
    gain = net.trunk.layer3[-1].branch.inserts[0].gain
    assert float(gain.detach().abs().max()) > 0  # trained away from its zero init: the insert got gradients

    x = lfw_faces(lfw_bin)
    with torch.no_grad():
        ref = net.eval().embed(x)
        emb, info = load_model(out)
        torch.testing.assert_close(emb(x), ref, rtol=0, atol=0)
    assert info["head"] == "probe_pool"
    res = run(
        [
            sys.executable,
            "-m",
            "pipeline.eval",
            "verify",
            "--checkpoint",
            out,
            "--bin",
            lfw_bin,
            "--json",
            tmp_path / "v.json",
            "--no-progress",
        ]
    )
    assert "lfw_devtest_112: accuracy" in res.stdout
    assert json.loads((tmp_path / "v.json").read_text())["head"] == "probe_pool"
    onnx_path = tmp_path / "probe.onnx"
    run([sys.executable, "-m", "pipeline.export", "--checkpoint", out, "--out", onnx_path])
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    assert got.shape == (6, 64)
    assert float(np.abs(got - ref.numpy()).max()) <= 1e-4 * max(1.0, float(ref.abs().max()))
