"""python -m benchmarks.bench_eval (issue 12, item 8): it runs, the two paths it compares compute the same embeddings,
and its JSON holds the figures BENCHMARKS.md quotes. Timings themselves are never asserted."""

from __future__ import annotations

import json

import torch

from benchmarks import bench_eval


def test_bench_eval_runs_and_writes_its_figures(lfw_bin, tmp_path, capsys):
    out = tmp_path / "bench_eval.json"
    rc = bench_eval.main(
        [
            "--bin",
            str(lfw_bin),
            "--images",
            "12",
            "--batch",
            "8",
            "--repeats",
            "2",
            "--width",
            "0.125",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    figures = json.loads(out.read_text())
    assert figures["device"] == "cpu" and figures["images"] == 12 and figures["repeats"] == 2
    assert len(figures["seconds"]["pipeline"]) == len(figures["seconds"]["plain"]) == 2
    assert figures["pipeline_over_plain"] > 0 and figures["decode_img_per_s"] > 0
    assert "pipeline / plain:" in capsys.readouterr().out


def test_the_two_timed_paths_embed_alike(lfw_bin):
    """The ratio only means something if the evaluation path and the plain loop compute the same thing."""
    from pipeline.eval.embed import embed_images
    from pipeline.eval.sets import load_bin
    from pipeline.models.iresnet import build_iresnet

    images, _ = load_bin(lfw_bin, 112)
    images = images[:6]
    torch.manual_seed(0)
    net = build_iresnet(18, width=0.125, embedding_size=64, input_size=112).eval()
    with torch.inference_mode():
        plain, flipped = embed_images(net.embedder(), images, 4, torch.device("cpu"))
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        ref_plain, ref_flipped = net.embed(x), net.embed(torch.flip(x, dims=[3]))
    # same ops on the same input; the batch split (4 + 2 vs 6) may change the reduction order: float32 round-off
    assert torch.allclose(torch.from_numpy(plain), ref_plain, rtol=1e-4, atol=1e-5)
    assert torch.allclose(torch.from_numpy(flipped), ref_flipped, rtol=1e-4, atol=1e-5)
