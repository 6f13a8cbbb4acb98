"""pipeline.export: checkpoint → (fold) → ONNX, checked against onnxruntime; folded state_dict → the same
network with plain convolutions."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pipeline import registry
from pipeline.config import dump_config, load_config
from pipeline.export import main
from pipeline.models.iresnet import build_iresnet
from pipeline.models.scan import sac_layers


@pytest.fixture(scope="module")
def scan_checkpoint(tmp_path_factory):
    """A checkpoint directory as the trainer writes it: config.yaml + model.pt (inference backbone)."""
    root = tmp_path_factory.mktemp("ckpt")
    src = root / "recipe.yaml"
    src.write_text(
        "recipe: margin\nmodel: {backbone: iresnet18, width: 0.0625, input_size: 48, "
        "conv: {kind: scan, sac: true, lsc: true, rmo: true}, head: {kind: fc, embedding_size: 16}}\n"
    )
    cfg = load_config([src])
    torch.manual_seed(0)
    recipe = registry.build_recipe(cfg)
    backbone = recipe.net
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a "trained" state: scales away from 1, BN statistics not trivial
        for _, m in sac_layers(backbone):
            m.scale_raw.copy_(torch.randn(m.scale_raw.shape, generator=g))
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    ckpt = root / "step_0000010"
    ckpt.mkdir()
    dump_config(cfg, ckpt / "config.yaml")
    torch.save(backbone.state_dict(), ckpt / "model.pt")
    return ckpt, backbone.eval()


def test_export_folded_onnx_matches_unfolded_pytorch(scan_checkpoint, tmp_path, capsys):
    ckpt, backbone = scan_checkpoint
    out = tmp_path / "scan.onnx"
    folded_pt = tmp_path / "plain.pt"
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--fold", "--save-folded", str(folded_pt)]) == 0
    log = capsys.readouterr().out
    assert "folded 17 convolution layers" in log and "iresnet18 (conv scan" in log and "plain convolutions only" in log
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version >= 17
    # the graph holds exactly the plain network's convolutions: 17 3×3 + 4 downsample 1×1
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 21
    x = torch.rand(5, 3, 48, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1  # batch ≠ export batch
    with torch.no_grad():
        ref = backbone.embed(x).numpy()  # the UNFOLDED SCAN network
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    diff = float(np.abs(got - ref).max())
    print(f"onnxruntime(folded) vs torch(unfolded): max abs diff {diff:.2e}")
    assert diff < 1e-4
    plain = build_iresnet(18, width=0.0625, embedding_size=16, input_size=48)
    plain.load_state_dict(torch.load(folded_pt, weights_only=True), strict=True)
    with torch.no_grad():
        assert float((plain.eval().embed(x) - torch.from_numpy(ref)).abs().max()) < 1e-4


def test_export_unfolded_also_runs_and_run_dir_resolves_latest(scan_checkpoint, tmp_path):
    ckpt, _ = scan_checkpoint
    run = ckpt.parent / "run"  # a run dir as the trainer leaves it: config.yaml + checkpoints/latest
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text((ckpt / "config.yaml").read_text())
    if not (run / "checkpoints" / ckpt.name).exists():
        (run / "checkpoints" / ckpt.name).symlink_to(ckpt)
    (run / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    assert main(["--checkpoint", str(run), "--out", str(tmp_path / "u.onnx")]) == 0


def test_export_errors(scan_checkpoint, tmp_path, capsys):
    ckpt, _ = scan_checkpoint
    assert main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "a.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --checkpoint:") and err.count("\n") == 1
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "a.onnx"), "--save-folded", "x.pt"]) == 2
    assert "needs --fold" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text((ckpt / "config.yaml").read_text().replace("iresnet18", "iresnet50"))
    (bad / "model.pt").write_bytes((ckpt / "model.pt").read_bytes())
    assert main(["--checkpoint", str(bad), "--out", str(tmp_path / "a.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a checkpoint of iresnet50 (conv scan" in err and "first mismatching key" in err
