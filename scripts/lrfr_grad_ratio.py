"""How strong is LRFR's distance term next to the classification term? (issue 11, item 3)

Measures, on real LFW faces with their paired low-resolution views (the trainer's own loader, MAug 7/14/20 px
at 1:1:2), the ratio of gradient norms over the backbone's parameters

    R = ‖∇θ L_dist‖ / ‖∇θ L_cls‖        (L_cls = ½ CosFace(f_HR) + ½ CosFace(f_LR), eq. 7, with λ = 1)

at initialisation (or from a checkpoint's weights), for each form of the distance: eq. 5 on normalised
embeddings (the paper), L1/L2 (eq. 1/2), and the authors' released LogExp (one log over the batch, ÷ p·B, raw
embeddings). λ·R ≈ 1 is where the distance term starts to matter as much as the classifier: the λ sweep of an
ablation should straddle 1/R. Mean ± sd over ``--batches`` batches.

    .venv/bin/python scripts/lrfr_grad_ratio.py --shards shards/lfw_view1 [--checkpoint RUN] [--width 0.125]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FORMS = {  # name → method overrides
    "logexp (eq. 5, normalised)": ["method.distance=logexp"],
    "l1 (eq. 1, normalised)": ["method.distance=l1"],
    "l2 (eq. 2, normalised)": ["method.distance=l2"],
    "logexp released (raw)": ["method.distance=logexp", "method.form=released", "method.normalize=false"],
}


def grad_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shards", required=True, type=Path, help="WebDataset shards (data_prep.folder2wds)")
    ap.add_argument("--checkpoint", help="weights to measure at (a run dir or checkpoint); default: initialisation")
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--input-size", type=int, default=56)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from pipeline import registry
    from pipeline.checkpoint import load_weights
    from pipeline.config import load_config
    from pipeline.data.loader import build_train_loader
    from pipeline.losses.margin import CombinedMargin
    from pipeline.losses.sharded_classifier import ShardedMarginClassifier

    torch.set_num_threads(1)
    rows = []
    for form, overrides in FORMS.items():
        cfg = load_config(
            [REPO / "configs/lrfr_r34_casia.yaml"],
            [f"data.train={args.shards}", f"model.width={args.width}", f"model.input_size={args.input_size}",
             f"data.batch_size={args.batch}", "data.loader=torch", "data.num_workers=0", "device=cpu", *overrides],
        )  # fmt: skip
        torch.manual_seed(args.seed)
        model = registry.build_recipe(cfg).train()
        if args.checkpoint:
            load_weights(model.net, args.checkpoint, "--checkpoint")
        loader = build_train_loader(cfg.data, 0, 1, args.seed, cfg.model.input_size)
        torch.manual_seed(args.seed + 1)
        margin = CombinedMargin(cfg.margin.s, cfg.margin.m1, cfg.margin.m2, cfg.margin.m3)
        clf = ShardedMarginClassifier(loader.num_classes, model.embedding_size, margin, rank=0, world_size=1)
        params = [p for p in model.parameters() if p.requires_grad]
        ratios = []
        for i, batch in enumerate(loader):
            if i >= args.batches:
                break
            out = model(batch)
            l_cls = sum(h.weight * clf(h.embeddings.float(), h.labels) for h in out.heads.values())
            l_dist = out.aux_losses["dist"] / cfg.method.lambda_dist
            ratios.append(grad_norm(l_dist, params) / grad_norm(l_cls, params))
        m = statistics.mean(ratios)
        sd = statistics.stdev(ratios) if len(ratios) > 1 else float("nan")
        rows.append((form, m, sd, len(ratios)))
        print(f"{form:30s} R = {m:.3g} ± {sd:.2g} ({len(ratios)} batches); λ for R·λ = 1: {1 / m:.3g}", flush=True)
    print("\n| distance form | ‖∇L_dist‖ / ‖∇L_cls‖ at λ = 1 | λ where they match |\n|---|---:|---:|")
    for form, m, sd, _ in rows:
        print(f"| {form} | {m:.3g} ± {sd:.2g} | {1 / m:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
