"""IJB-B / IJB-C 1:1 (``pipeline.eval ijb``) and ONNX evaluation (``--onnx`` on every subcommand).

The IJB fixture is built from the real LFW View-1 dev-test faces in IJB's layout: 30 people, two or
three templates each (1-4 images over 1-2 media; some images in two templates), loose crops that
are the aligned faces placed in bigger noisy canvases by *exact* similarity transforms (integer
shifts, 2× pixel repetition, quarter turns) with the landmarks moved along, so aligning a loose crop
must give back the original face bit for bit. The reference is computed here independently: the
original faces through the PyTorch network one at a time, plain loops over templates and media,
dot products per pair, scikit-learn's ``roc_curve`` for the TAR.

The integration half (tests that start processes or outgrow the unit tier); the unit half is tests/unit/test_eval_ijb.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_curve

from pipeline.eval import ijb
from pipeline.eval.checkpoint import load_embedder, load_model
from pipeline.eval.cli import main as eval_main
from pipeline.eval.embed import embed_images
from pipeline.eval.sets import load_bin
from tests.helpers import REPO
from tests.support.eval_ijb import SIZE, IJBFixture, decode

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reference_feats(fixture, checkpoint) -> dict[str, np.ndarray]:
    """Each original face resized to 56 px by Pillow, f(x) + f(flip x) by the PyTorch network (one batch)."""
    net, _ = load_model(checkpoint)
    faces = [Image.fromarray(decode(p)).resize((SIZE, SIZE), Image.BILINEAR) for p in fixture.originals.values()]
    x = torch.from_numpy(np.stack([np.asarray(f, dtype=np.float32) for f in faces])).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        f = (net(x) + net(torch.flip(x, dims=[3]))).double().numpy()
    return dict(zip(fixture.originals, f))


def reference_scores(fx: IJBFixture, feats: dict[str, np.ndarray], use_scores: bool) -> np.ndarray:
    """Independent reference: image features × detector score, media means and template sums in
    plain loops, normalised, one dot product per pair."""
    feats = {name: f * fx.scores[name] if use_scores else f for name, f in feats.items()}
    templates = {}
    for t in dict.fromkeys(t for _, t, _ in fx.rows):
        media: dict[int, list[np.ndarray]] = {}
        for name, tt, m in fx.rows:
            if tt == t:
                media.setdefault(m, []).append(feats[name])
        v = sum(np.mean(fs, axis=0) for fs in media.values())
        templates[t] = v / np.linalg.norm(v)
    return np.array([templates[a] @ templates[b] for a, b, _ in fx.pairs])


def sklearn_tar(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(tpr[fpr <= far].max())


def run_ijb(capsys, fx: IJBFixture, model: list[str], out: Path, *extra: str) -> tuple[int, str, str]:
    rc = eval_main(["ijb", *model, "--root", str(fx.root), "--out", str(out), "--no-progress", *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# --------------------------------------------------------------------------- alignment


def test_ijb_against_reference_and_cache_reuse(fixture, checkpoint, reference_feats, tmp_path, capsys, monkeypatch):
    labels = np.array([y for _, _, y in fixture.pairs])
    n_impostor = int((labels == 0).sum())
    assert len(fixture.originals) >= 70 and 1000 <= n_impostor < 10_000  # FAR 1e-3 … 1e-1 measurable
    out = tmp_path / "out"
    rc, text, err = run_ijb(capsys, fixture, ["--checkpoint", str(checkpoint)], out, "--use-face-score")
    assert rc == 0, err
    scores = np.load(out / "scores.npy", allow_pickle=False)
    reference = reference_scores(fixture, reference_feats, use_scores=True)
    np.testing.assert_allclose(scores, reference, atol=1e-5)
    lines = text.splitlines()
    summary = next(ln for ln in lines if ln.startswith("IJBC "))
    n_templates = len({t for _, t, _ in fixture.rows})
    assert f"{len(fixture.originals)} images, {n_templates} templates" in summary
    assert f"{int(labels.sum())} genuine and {n_impostor} impostor template pairs, face scores used" in summary
    table = lines[lines.index(summary) + 1 :]
    assert table[0].split() == ["FAR", "[1]"]
    for far, line in zip(["1e-06", "1e-05", "1e-04"], table[1:4]):
        assert line.split(None, 1) == [far, f"n/a (only {n_impostor} impostor pairs)"]
    data = json.loads((out / "ijb.json").read_text())
    assert data["use_face_score"] and not data["aligned"] and data["templates"] == n_templates
    for p, line in zip(data["points"][3:], table[4:7]):
        assert p["tar"] == sklearn_tar(scores, labels, p["far"])
        assert p["tar"] == sklearn_tar(reference, labels, p["far"])
        assert line.split() == [f"{p['far']:.0e}", f"{p['tar']:.4f}"]
    assert 0 < data["points"][-1]["tar"] < 1
    assert (out / "roc.png").stat().st_size > 1000
    cached = np.load(out / "features" / "feat_rank0.npy", allow_pickle=False)
    assert cached.shape == (len(fixture.originals), 32) and not list((out / "features").glob("*.part*"))

    def no_embedding(*a, **k):
        raise AssertionError("a cached slice was embedded again")

    monkeypatch.setattr(ijb, "_embed_chunk", no_embedding)
    rc, text, err = run_ijb(capsys, fixture, ["--checkpoint", str(checkpoint)], out)  # no face scores now
    assert rc == 0, err
    assert f"rank 0: images 0-{len(fixture.originals)} from" in text
    np.testing.assert_allclose(
        np.load(out / "scores.npy", allow_pickle=False), reference_scores(fixture, reference_feats, False), atol=1e-5
    )
    assert not json.loads((out / "ijb.json").read_text())["use_face_score"]

    # --aligned: the faces themselves as the image folder (no landmarks read): the same scores
    aligned = tmp_path / "aligned"
    aligned.mkdir()
    for name, path in fixture.originals.items():
        Image.fromarray(decode(path)).save(aligned / name)
    monkeypatch.undo()
    rc, _, err = run_ijb(
        capsys,
        fixture,
        ["--checkpoint", str(checkpoint)],
        tmp_path / "out_aligned",
        "--aligned",
        "--images",
        str(aligned),
    )
    assert rc == 0, err
    np.testing.assert_allclose(
        np.load(tmp_path / "out_aligned" / "scores.npy"), reference_scores(fixture, reference_feats, False), atol=1e-5
    )


def test_ijb_resumes_an_interrupted_slice(fixture, checkpoint, reference_feats, tmp_path, capsys, monkeypatch):
    """--cache-every 16: a bad image in the third part stops the run (one line naming it, exit 2)
    after two parts were saved; the rerun embeds only the rest."""
    n = len(fixture.originals)
    victim = fixture.root / "loose_crop" / "40.png"
    good = victim.read_bytes()
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint)], out, "--cache-every", "16", "--workers", "0"
    try:
        victim.write_bytes(b"not an image")
        rc, _, err = run_ijb(capsys, fixture, *args)
        assert rc == 2 and err.startswith(f"error: {victim}: cannot decode image") and err.count("\n") == 1, err
    finally:
        victim.write_bytes(good)
    saved = sorted(p.name for p in (out / "features").glob("feat_rank0.part*.npy"))
    assert saved == ["feat_rank0.part00000.npy", "feat_rank0.part00001.npy"]
    embedded = []
    real = ijb._embed_chunk

    def counting(embed_fn, paths, *a):
        embedded.append(len(paths))
        return real(embed_fn, paths, *a)

    monkeypatch.setattr(ijb, "_embed_chunk", counting)
    rc, text, err = run_ijb(capsys, fixture, *args)
    assert rc == 0, err
    assert sum(embedded) == n - 32 and f"({32} from saved parts)" in text
    assert not list((out / "features").glob("*.part*"))
    np.testing.assert_allclose(
        np.load(out / "scores.npy"), reference_scores(fixture, reference_feats, False), atol=1e-5
    )
    # another model (a changed model.pt): the key differs, everything is embedded again
    other = tmp_path / "other_ckpt"
    shutil.copytree(checkpoint, other)
    state = torch.load(other / "model.pt", weights_only=True)
    next(v for v in state.values() if v.dtype.is_floating_point).add_(0.01)
    torch.save(state, other / "model.pt")
    embedded.clear()
    rc, _, err = run_ijb(capsys, fixture, ["--checkpoint", str(other)], out, "--cache-every", "16")
    assert rc == 0 and sum(embedded) == n, err


def test_ijb_two_processes_give_the_same_scores(fixture, checkpoint, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["ijb", "--checkpoint", str(checkpoint), "--root", str(fixture.root), "--no-progress", "--workers", "0"]
    assert eval_main([*common, "--out", str(one)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "pipeline.eval", *common, "--out", str(two), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
    assert r.stdout.count("FAR ") == 1  # the table comes from rank 0 only
    n = len(fixture.originals)
    for rank, (lo, hi) in enumerate([(0, n // 2), (n // 2, n)]):
        assert np.load(two / "features" / f"feat_rank{rank}.npy").shape == (hi - lo, 32)
        assert json.loads((two / "features" / f"feat_rank{rank}.json").read_text())["lo"] == lo
    np.testing.assert_allclose(np.load(two / "scores.npy"), np.load(one / "scores.npy"), atol=1e-6)
    assert json.loads((two / "ijb.json").read_text())["world_size"] == 2


def test_onnx_verify_equals_checkpoint(checkpoint, onnx_model, lfw_bin, tmp_path, capsys):
    """verify on the LFW dev-test .bin (1,000 pairs): the same printed numbers from the checkpoint and
    its ONNX export; embeddings agree to 2e-5 of their scale (measured on this model and machine:
    max |onnxruntime − PyTorch| = 3.9e-6 with embeddings up to 2.26 in magnitude, i.e. 1.7e-6 of the scale)."""
    lines = {}
    for kind, model in (("checkpoint", checkpoint), ("onnx", onnx_model)):
        out = tmp_path / f"{kind}.json"
        argv = ["verify", f"--{kind}", str(model), "--bin", str(lfw_bin), "--json", str(out), "--batch-size", "256"]
        assert eval_main([*argv, "--no-progress"]) == 0
        lines[kind] = capsys.readouterr().out.splitlines()[0]
        assert json.loads(out.read_text())["input_size"] == SIZE
    assert lines["onnx"] == lines["checkpoint"] and lines["onnx"].startswith("lfw_devtest_112: accuracy ")
    images, _ = load_bin(lfw_bin, SIZE)
    torch_net, _ = load_embedder(checkpoint=checkpoint)
    onnx_net, info = load_embedder(onnx=onnx_model)
    assert info["input_size"] == SIZE and info["providers"] == ["CPUExecutionProvider"]
    a, a_flip = embed_images(torch_net, images[:200], 100)
    b, b_flip = embed_images(onnx_net, images[:200], 100)
    scale = float(np.abs(a).max())
    assert np.abs(a - b).max() <= 2e-5 * scale and np.abs(a_flip - b_flip).max() <= 2e-5 * scale


def test_onnx_tarfar_identify_ijb(checkpoint, onnx_model, devtest, fixture, reference_feats, tmp_path, capsys):
    people = list(dict.fromkeys(devtest.labels))[:40]
    rows = [i for i, lab in enumerate(devtest.labels) if lab in people]
    images = tmp_path / "images.txt"
    images.write_text("".join(f"{devtest.paths[i]} {devtest.labels[i]}\n" for i in rows))
    argv = ["tarfar", "--checkpoint", str(checkpoint), "--onnx", str(onnx_model), "--images", str(images)]
    assert eval_main([*argv, "--no-progress"]) == 0
    table = capsys.readouterr().out.splitlines()
    measured = [ln.split() for ln in table if ln[:5] in ("1e-01", "1e-02", "1e-03")]
    assert len(measured) == 3 and all(r[1] == r[2] for r in measured)  # the checkpoint's column = the ONNX one
    assert table[-1] == f"[2] {onnx_model}"
    # identify: gallery = first image of each of these people, probes = the others
    seen, g, p = set(), [], []
    for i in rows:
        (p if devtest.labels[i] in seen else g).append(i)
        seen.add(devtest.labels[i])
    for name, idx in (("gallery", g), ("probe", p)):
        (tmp_path / f"{name}.txt").write_text("".join(f"{devtest.paths[i]} {devtest.labels[i]}\n" for i in idx))
    tables = []
    for kind, model in (("checkpoint", checkpoint), ("onnx", onnx_model)):
        argv = ["identify", f"--{kind}", str(model), "--gallery", str(tmp_path / "gallery.txt")]
        assert eval_main([*argv, "--probe", str(tmp_path / "probe.txt"), "--no-progress"]) == 0
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1]
    # ijb through onnxruntime: the checkpoint's scores
    rc, _, err = run_ijb(capsys, fixture, ["--onnx", str(onnx_model)], tmp_path / "ijb_onnx", "--workers", "0")
    assert rc == 0, err
    np.testing.assert_allclose(
        np.load(tmp_path / "ijb_onnx" / "scores.npy"), reference_scores(fixture, reference_feats, False), atol=1e-5
    )
