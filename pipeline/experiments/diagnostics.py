"""The ablation runner's generic diagnostics (``train_loss``, ``embedding_norm``, ``conv_monitors``, ``sample_values``)
and how a cell runs them.

A diagnostic is ``@register_diagnostic(name)`` on ``fn(net, cfg, ctx) -> {column: float}``, run on a cell's final
network. The table and :class:`DiagnosticContext` live in :mod:`pipeline.registry` (re-exported here and by
:mod:`pipeline.ablate`), so that a model registers its own diagnostics next to its code: LCD's ``eq8_mse``,
``eq8_mse_thetabar``, ``occlusion_locality``, ``validation_monitors`` in :mod:`pipeline.models.lcd_probes`, SCAN's
``kernel_dc_share`` in :mod:`pipeline.models.scan_kind` (re-exported here); a lab's own in a module named in the
config's ``plugins:``.
"""

from __future__ import annotations

from data_prep.manifest import DataError
from pipeline.config import Config, ConfigError
from pipeline.experiments.spec import EVAL_BATCH
from pipeline.models.lcd_probes import (
    eq8_mse_diagnostic,
    eq8_mse_thetabar_diagnostic,
    occlusion_locality_diagnostic,
    validation_monitors_diagnostic,
)
from pipeline.models.scan_kind import dc_share, kernel_dc_share
from pipeline.registry import DiagnosticContext, diagnostics, register_diagnostic

__all__ = [
    "DiagnosticContext",
    "conv_monitors",
    "dc_share",
    "diagnostics",
    "embedding_norm",
    "eq8_mse_diagnostic",
    "eq8_mse_thetabar_diagnostic",
    "kernel_dc_share",
    "occlusion_locality_diagnostic",
    "register_diagnostic",
    "run_diagnostics",
    "sample_values",
    "train_loss",
    "validation_monitors_diagnostic",
]


def run_diagnostics(names: list[str], net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    table = diagnostics()
    out: dict[str, float] = {}
    for name in names:
        for column, value in table[name](net, cfg, ctx).items():
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
