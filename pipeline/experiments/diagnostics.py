"""Diagnostics: ``@register_diagnostic(name)`` on ``fn(net, cfg, ctx) -> {column: float}``, run on a cell's final network (registered here or in a module named in the config's ``plugins:``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.manifest import DataError
from pipeline.config import Config, ConfigError
from pipeline.eval.sets import EvalSet
from pipeline.experiments.spec import EVAL_BATCH


@dataclass(frozen=True)
class DiagnosticContext:
    """What a diagnostic may read besides the network and its config."""

    run_dir: Path  # the cell's trainer output.dir (tb/, checkpoints/)
    eval_sets: list[EvalSet]  # the spec's evaluation sets, in order (``.load(input_size)`` → images, target)
    device: Any  # torch.device the network is on
    input_size: int
    embeddings: dict  # set name → float32 (2P, D) embeddings of its images, no flip, not normalised (numpy)


DiagnosticFn = Callable[[Any, Config, DiagnosticContext], dict[str, float]]
DIAGNOSTICS: dict[str, DiagnosticFn] = {}


def register_diagnostic(name: str) -> Callable[[DiagnosticFn], DiagnosticFn]:
    """``@register_diagnostic("name")`` on ``fn(net, cfg, ctx) -> {column: float}``; a spec lists it by name."""

    def register(fn: DiagnosticFn) -> DiagnosticFn:
        if name in DIAGNOSTICS and DIAGNOSTICS[name] is not fn:
            raise ValueError(f"diagnostic '{name}' is registered twice")
        DIAGNOSTICS[name] = fn
        return fn

    return register


def run_diagnostics(names: list[str], net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        for column, value in DIAGNOSTICS[name](net, cfg, ctx).items():
            if column in out:
                raise ConfigError(f"diagnostics: '{name}' returns the column '{column}' another diagnostic returned")
            out[column] = float(value)
    return out


@register_diagnostic("train_loss")
def train_loss(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """The last logged value of each ``loss/*`` TensorBoard scalar: ``train_loss`` (loss/total) and
    ``train_loss/<term>`` (cls_main, rmo, dist, ...)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(ctx.run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        if tag.startswith("loss/"):
            last = max(acc.Scalars(tag), key=lambda e: (e.step, e.wall_time))
            out["train_loss" if tag == "loss/total" else f"train_loss/{tag[5:]}"] = float(last.value)
    if "train_loss" not in out:
        raise DataError(f"{ctx.run_dir / 'tb'}: no loss/total scalar logged")
    return out


@register_diagnostic("embedding_norm")
def embedding_norm(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """Mean L2 norm of the un-normalised embeddings of the first evaluation set's images (no flip)."""
    import numpy as np

    emb = ctx.embeddings[ctx.eval_sets[0].name]
    return {"embedding_norm": float(np.linalg.norm(emb, axis=1).mean())}


@register_diagnostic("conv_monitors")
def conv_monitors(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """The conv kind's own end-of-training monitors (SCAN: ``t_mean``, ``t_min``, ``t_max``, ``t_std``,
    ``t_frac_below_0.1`` of the scales t over every filter); nothing for plain convs."""
    return {name.rsplit("/", 1)[-1]: float(v) for name, v in net.conv_kind.monitors(net).items()}


@register_diagnostic("sample_values")
def sample_values(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """Mean over each evaluation set's images of every per-sample value the network's modules report on a probe
    forward (``trace.sample_value``): ``<value>/<set>``, e.g. LGAF's ``gamma_l/clean`` vs ``gamma_l/occ_eyes``
    (does the local branch gain weight on degraded faces?) or CQA-Face's ``q0/…`` … ``q3/…`` (do the quality
    scores fall on occluded faces?); nothing for a network without such values (the fc head)."""

    from pipeline.eval.embed import to_model_input

    out: dict[str, float] = {}
    for eval_set in ctx.eval_sets:
        images, _ = eval_set.load(ctx.input_size)
        means = net.sample_value_means(images, EVAL_BATCH, to_model_input)
        out.update({f"{name}/{eval_set.name}": v for name, v in means.items()})
    return out


EQ8_FRACTIONS = (0.1, 0.3, 0.5)  # of the channels dropped at test time (the paper's Fig. 3/4 sweep)
EQ8_IMAGES = 256  # the first images of the first evaluation set


@register_diagnostic("eq8_mse")
def eq8_mse_diagnostic(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """LCD's eq. 8 (Sec. V-C): mean squared difference between the L2-normalised embeddings of the first
    evaluation set's first 256 images without and with 10 / 30 / 50 % of the channels dropped at test time at
    ``layer3.branch`` (the same seeded masks for every network of one width): ``eq8_mse@0.1`` … — low = the
    network tolerates losing channels there, the paper's claim for LCD. Any iresnet network (the baseline too)."""
    return eq8_sweep(net, ctx, "eq8_mse")


def eq8_sweep(net, ctx: DiagnosticContext, name: str) -> dict[str, float]:
    """Eq. 8 at every EQ8_FRACTIONS on the first evaluation set's first EQ8_IMAGES images, ``{name@frac: mse}``
    (L2-normalised embeddings; the same seeded masks for every network of one width)."""
    import torch

    from pipeline.eval.embed import to_model_input
    from pipeline.models.lcd import eq8_mse

    images, _ = ctx.eval_sets[0].load(ctx.input_size)
    batch = to_model_input(images[:EQ8_IMAGES]).to(ctx.device)
    out = {}
    for frac in EQ8_FRACTIONS:
        res = eq8_mse(net, batch, frac, "layer3.branch", torch.Generator(device=ctx.device).manual_seed(0))
        out[f"{name}@{frac}"] = float(res["mse_unit"])
    return out


@register_diagnostic("eq8_mse_thetabar")
def eq8_mse_thetabar_diagnostic(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """The SAM control of LCD's eq. 8 (spec §7.1): every LCD insert's SAM replaced by its own per-channel mean θ̄
    over the first evaluation set's first 256 distinct faces (:func:`pipeline.models.lcd.freeze_sam_to_mean`),
    then eq. 8 as ``eq8_mse`` (``eq8_mse_thetabar@0.1`` …). Equal to ``eq8_mse`` = SAM's effect on eq. 8 is its
    mean scale of the branch, not its reading of the dropped channels. Nothing for a network without SAM."""
    import copy

    from pipeline.models.lcd import freeze_sam_to_mean

    frozen = copy.deepcopy(net)
    if not freeze_sam_to_mean(frozen, fixed_faces(ctx)):
        return {}
    return eq8_sweep(frozen, ctx, "eq8_mse_thetabar")


FIXED_FACES = 256  # occlusion_locality / validation_monitors: distinct faces of the first evaluation set


def fixed_faces(ctx: DiagnosticContext, n: int = FIXED_FACES):
    """(n, 3, S, S) model input on ``ctx.device``: the first image of each of the first n pairs of the first
    evaluation set (distinct faces; for an ``images`` set every other image)."""
    from pipeline.eval.embed import to_model_input

    images, _ = ctx.eval_sets[0].load(ctx.input_size)
    return to_model_input(images[0 : 2 * n : 2]).to(ctx.device)


@register_diagnostic("occlusion_locality")
def occlusion_locality_diagnostic(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """LCD's spec §8 locality at ``layer3.branch`` (the feature an LCD insert there reads), on the first evaluation
    set's first 256 distinct faces, clean: ``spatial_entropy`` / ``top10_energy`` of the channels, and
    ``occlusion_concentration`` (``/eyes``, ``/mask``): with the eye band or the lower face occluded
    (:func:`pipeline.models.lcd.occlude_faces`), the share of the summed relative channel change carried by the
    10 % most-changed channels (⌈0.1·c⌉/c = spread evenly; the paper: SR raises it). Any iresnet network."""
    from pipeline.models.lcd import OCCLUSION_BANDS, occlude_faces, occlusion_locality, point_features

    faces = fixed_faces(ctx)
    feats = point_features(net, [faces] + [occlude_faces(faces, kind) for kind in OCCLUSION_BANDS], "layer3.branch")
    return occlusion_locality(feats[0], dict(zip(OCCLUSION_BANDS, feats[1:])))


@register_diagnostic("validation_monitors")
def validation_monitors_diagnostic(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """What the network's modules measure on fixed clean faces at every in-training evaluation
    (:meth:`FaceNetwork.validation_monitors`; LCD: the occlusion concentration at its own point, θ on the channels
    an occlusion changes most, the next BatchNorm's running-vs-batch gap, eq. 8 at 30 %), on the first evaluation
    set's first 256 distinct faces; nothing for a network whose modules measure nothing there."""
    return net.validation_monitors(fixed_faces(ctx))


def dc_share(weight) -> float:
    """Share of a K×K conv weight's energy in its DC part: Σ_(o,i) (Σ_taps k)² / K² over Σ k² — the squared
    projection onto the constant kernel. 1: every kernel a (scaled) box blur; a zero-sum kernel: 0; i.i.d. random
    taps: 1/K² on average."""
    k = weight.detach().double().flatten(2)
    return float((k.sum(dim=2) ** 2 / k.shape[2]).sum() / (k**2).sum())


@register_diagnostic("kernel_dc_share")
def kernel_dc_share(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """Mean over the 3×3 convolutions of the folded network (what inference applies: SCAN's k_u) of
    :func:`dc_share`: a network that froze as "blur + 1×1" (SAC without LSC, issue 11) is near 1."""
    from torch import nn

    folded, _ = net.folded()
    shares = [dc_share(m.weight) for m in folded.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    return {"dc_share": sum(shares) / len(shares)} if shares else {}
