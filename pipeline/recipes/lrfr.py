"""LRFR: multi-resolution augmentation + feature-distance loss on a Siamese HR/LR backbone.

Ling et al., "Dive into the Resolution Augmentations and Metrics in Low Resolution Face
Recognition: A Plain yet Effective New Baseline" (AAAI 2023), Sec. 3.3, eq. 7:

    f_HR = F_CNN(I_HR),  f_LR = F_CNN(I_LR)                       (one backbone, shared weights)
    L_dist = L_LogExp(f_HR/‖f_HR‖₂, f_LR/‖f_LR‖₂)                  (eq. 5 / eq. 3; or L1/L2, eqs. 1–2)
    L_all  = λ·L_dist + ½·L_cls(f_HR) + ½·L_cls(f_LR)              (eq. 7)

L_cls is the shared (class-sharded) margin classifier, CosFace s = 48, m = 0.4 in the paper
(config ``margin: {s: 48, m1: 1, m2: 0, m3: 0.4}``); the trainer applies it to each entry of
``StepOutput.heads`` with its weight, so the two halves use one classifier and the trainer has
no LRFR-specific code.

Data: I_LR is the loader's paired output (``data.augment.paired: true``): the multi-resolution
copy (bicubic down to 7/14/20 px at 1:1:2 and back up, Sec. 3.1 / 4.1 "MAug") of the *same*
augmented HR image, so the two views share flip and crop, and ``multires_p: 1.0`` degrades every
LR view. Note: the authors' public code (github.com/hurricanelx/LRFR, train_webface_pair.py)
flips the two views independently, draws only 7 and 20 px (probabilities 1:0:1 for 7/14/20),
divides a batch-summed LogExp by B instead of D and applies it to un-normalised features; we
follow the paper (shared flip, 7/14/20 at 1:1:2, eq. 5 per sample / (p·D), eq. 7 normalisation).

Any network (``model:``) works: its aux losses (e.g. SCAN's ``rmo``) and monitors are reported per view
and averaged over the two views (each view is half of eq. 7's classification term), so a term keeps the
meaning it has under the ``margin`` procedure.

Monitoring (``StepOutput.scalars``, logged as ``monitor/<name>``): ``dist`` (unweighted L_dist),
``dist_<s>px`` (L_dist over the samples whose LR copy has s px, one per size in
``data.augment.multires_sizes``, plus ``dist_clean`` for undegraded copies (lr_size 0) when
``multires_p`` < 1) and ``cos_hr_lr``. The bucket keys are the same at every step and on every
rank (the trainer all-reduces scalars by name); a bucket with no sample in the batch reads NaN (mean cosine between
the two views). Histogram ``lrfr/dim_abs_error``: mean |f̂_HR − f̂_LR| per embedding dimension
(the quantity of the paper's Fig. 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline import registry
from pipeline.config import ConfigError, Invalid
from pipeline.losses.logexp import DISTANCES, feature_distance, logexp_distance_released
from pipeline.recipes.base import ClassifierInput, RecipeModel, StepOutput


@dataclass
class LRFRConfig:
    """The ``method:`` block of the lrfr recipe."""

    RANGES = {
        "p": "(0, inf)",
        "lambda_dist": "[0, inf)",
        "cls_weight_hr": "[0, inf)",
        "cls_weight_lr": "[0, inf)",
    }  # (check_ranges)

    distance: str = "logexp"  # logexp (eq. 5) | l1 (eq. 1) | l2 (eq. 2)
    p: float = 1.0  # LogExp exponent (Table 4: "Ours(1)", "Ours(2)"); ignored by l1/l2
    lambda_dist: float = 1.0  # λ of eq. 7 (Table 5; the paper's main results use 1)
    cls_weight_hr: float = 0.5  # weight of L_cls(f_HR) in eq. 7
    cls_weight_lr: float = 0.5  # weight of L_cls(f_LR) in eq. 7
    normalize: bool = True  # eq. 7: distance between L2-normalised embeddings
    # "paper": eq. 5/7 per sample, batch mean. "released": the authors' code (logexp only): one log over the
    # whole batch, ÷ p·B, on the raw embeddings (set normalize: false for their exact form).
    form: str = "paper"

    def validate(self):
        if self.distance not in DISTANCES:
            raise Invalid("distance", f"unknown distance '{self.distance}' (known: {', '.join(DISTANCES)})")
        if self.distance == "logexp" and not self.p >= 1.0:
            raise Invalid("p", f"LogExp exponent must be >= 1, got {self.p}")
        if self.form not in ("paper", "released"):
            raise Invalid("form", f"must be 'paper' or 'released', got '{self.form}'")
        if self.form == "released" and self.distance != "logexp":
            raise Invalid("form", f"'released' is the authors' LogExp; distance is '{self.distance}'")

    def validate_with(self, cfg):
        if not cfg.data.augment.paired:
            raise Invalid("data.augment.paired", "the lrfr recipe trains on paired HR/LR views; set it to true")


def _mean_of_views(a: dict, b: dict) -> dict:
    return {k: (a[k] + b[k]) / 2 if k in b else a[k] for k in a} | {k: v for k, v in b.items() if k not in a}


class LRFRRecipe(RecipeModel):
    def __init__(self, cfg):
        super().__init__(cfg)
        m: LRFRConfig = cfg.method
        self.distance = m.distance
        self.p = m.p
        self.lambda_dist = m.lambda_dist
        self.cls_weight_hr = m.cls_weight_hr
        self.cls_weight_lr = m.cls_weight_lr
        self.normalize = m.normalize
        self.form = m.form
        aug = cfg.data.augment
        self.buckets = sorted({int(s) for s in aug.multires_sizes}) + ([0] if aug.multires_p < 1.0 else [])

    def forward(self, batch: dict) -> StepOutput:
        if "image_lr" not in batch:
            raise ConfigError(
                "data.augment.paired: the lrfr recipe needs paired batches with 'image_lr' (set data.augment.paired: true)"
            )
        labels = batch["label"]
        # Siamese: the same network (shared weights) on both views; two calls so that each view's
        # BatchNorm statistics are its own, as in a Siamese network and the authors' code.
        hr = self.net(batch["image"])
        lr = self.net(batch["image_lr"])
        f_hr, f_lr = hr.embedding, lr.embedding
        per_sample = feature_distance(self.distance, f_hr, f_lr, p=self.p, normalize=self.normalize, reduction="none")
        if self.form == "released":  # the authors' code: one log over the batch (per_sample stays for monitors)
            fx, fy = (
                (F.normalize(f_hr.float(), dim=1), F.normalize(f_lr.float(), dim=1)) if self.normalize else (f_hr, f_lr)
            )
            l_dist = logexp_distance_released(fx, fy, p=self.p)
        else:
            l_dist = per_sample.mean()  # eq. 7's L_dist (batch mean of the per-sample distance)

        scalars: dict[str, torch.Tensor] = _mean_of_views(hr.monitors, lr.monitors)
        scalars["dist"] = l_dist.detach()
        with torch.no_grad():
            sizes = batch.get("lr_size")
            d = per_sample.detach().float()
            for s in self.buckets:
                name = "dist_clean" if s == 0 else f"dist_{s}px"
                if sizes is None:
                    scalars[name] = torch.full((), float("nan"), device=d.device)
                    continue
                mask = (sizes.to(d.device) == s).float()
                # bucket mean as sum / count on the device (no host sync); an empty bucket is 0/0 = NaN,
                # not absent: the keys must match across ranks
                scalars[name] = (d * mask).sum() / mask.sum()
            n_hr = F.normalize(f_hr.detach().float(), dim=1)
            n_lr = F.normalize(f_lr.detach().float(), dim=1)
            scalars["cos_hr_lr"] = (n_hr * n_lr).sum(dim=1).mean()
            # to the host only when histograms are written; the network's own per view
            hists = {f"hr/{k}": v for k, v in hr.histograms.items()} | {f"lr/{k}": v for k, v in lr.histograms.items()}
            hists["lrfr/dim_abs_error"] = (n_hr - n_lr).abs().mean(dim=0)

        aux = _mean_of_views(hr.aux_losses, lr.aux_losses)
        aux["dist"] = self.lambda_dist * l_dist
        return StepOutput(
            heads={
                "hr": ClassifierInput(f_hr, labels, self.cls_weight_hr),
                "lr": ClassifierInput(f_lr, labels, self.cls_weight_lr),
            },
            aux_losses=aux,
            scalars=scalars,
            histograms=hists,
            watched=_merge_watched(hr.watched, lr.watched),
        )


def _merge_watched(hr: dict[str, torch.Tensor], lr: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One entry per watched tensor: a parameter both views watch (LCD's conv kernel) is one leaf whose gradient
    sums both passes, reported once under its own name; per-view activations keep an ``hr/`` / ``lr/`` prefix."""
    shared = {k for k in hr.keys() & lr.keys() if hr[k] is lr[k]}
    out = {k: hr[k] for k in sorted(shared)}
    out |= {f"hr/{k}": v for k, v in hr.items() if k not in shared}
    out |= {f"lr/{k}": v for k, v in lr.items() if k not in shared}
    return out


@registry.register_recipe("lrfr", LRFRConfig)
def build(cfg) -> LRFRRecipe:
    return LRFRRecipe(cfg)
