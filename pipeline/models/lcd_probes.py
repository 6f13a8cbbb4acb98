"""LCD's analysis probes: measurements of a trained network, with or without LCD, that the insert's validation
monitors and the ablation runner's diagnostics share (spec ``../shared/specs/lcd.md`` §7.1, §8; eq. 8 of the paper).

Every probe finds the modules around its point through the trunk (:func:`pipeline.models.network.point_modules`),
so it works on any trunk that names them (iresnet: ``layerK``, ``layerK.branch``, ``stem``, ``out``).

**On a fixed batch of clean validation faces, at every evaluation** (:func:`insert_validation_monitors`, an LCD
insert's ``validation_monitors``, logged as ``monitor/<name>``; spec §8's locality, occlusion and shift
measurements): ``lcd/spatial_entropy_val`` and ``lcd/top10_energy_val``
(:func:`~pipeline.models.lcd_parts.locality_stats` on those faces); ``lcd/occlusion_concentration`` (and ``/eyes``,
``/mask``): each face's eye band and lower face (:func:`occlude_faces`, the geometry of ``data_prep.bin degrade
--occlude eyes mask``) are occluded, each channel's relative change ‖F_i(occluded) − F_i‖ / ‖F_i‖ of the feature LCD reads is measured, and the share of the summed
change carried by the top 10 % of channels is reported (0.1 = spread evenly; the paper's claim is that SR raises it,
:func:`occlusion_concentration`); with SAM, ``sam/theta_clean_vs_occluded`` (and per band): mean θ of the occluded
face on its 10 % most-changed channels minus mean θ on the rest (< 0: SAM turns down what the occlusion corrupted)
and ``sam/theta_shift_on_changed``: θ(occluded) − θ(clean) on those channels; ``lcd/next_bn_mean_gap`` /
``lcd/next_bn_logvar_gap``: for the first BatchNorm that runs after LCD, mean over channels of
|μ_batch − μ_running| / σ_running and |log(σ²_batch / σ²_running)| on those faces (the train/eval shift LCD's
dropping may cause, spec §8 "escape and shift"); ``lcd/eq8_mse@0.3``: eq. 8 on the final unit-norm embeddings with
30 % of the channels dropped at LCD's point (:func:`eq8_mse`, seed 0).

**Ablation diagnostics** (``diagnostics:`` of an ablation spec, registered here): ``eq8_mse``, ``eq8_mse_thetabar``,
``occlusion_locality``, ``validation_monitors``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.lcd_parts import SpatialAttention, channel_keep_mask, constant_gate, drop_count, locality_stats
from pipeline.models.network import point_modules, to_model_input
from pipeline.registry import DiagnosticContext, register_diagnostic

__all__ = [
    "OCCLUSION_BANDS",
    "eq8_mse",
    "freeze_sam_to_mean",
    "insert_validation_monitors",
    "occlude_faces",
    "occlusion_concentration",
    "occlusion_locality",
    "point_features",
    "point_source",
]

OCCLUSION_BANDS = ("eyes", "mask")  # spec §8: "occlude a band (eyes or lower face)"


# --------------------------------------------------------------------------- occlusion and locality (spec §8)


def occlude_faces(faces: torch.Tensor, kind: str) -> torch.Tensor:
    """A copy of ``faces`` ((N,3,H,W) in [-1, 1], insightface-aligned) with ``kind``'s band filled as
    ``data_prep.bin degrade --occlude`` fills it: ``eyes`` black over both eyes, ``mask`` a flat surgical-mask
    blue from just below the nose tip to the chin (default :class:`~pipeline.faces.degrade.OcclusionParams`)."""
    from pipeline.faces.degrade import OcclusionParams, occlusion_box

    if kind not in ("eyes", "mask"):
        raise ValueError(f"occlude_faces: kind must be 'eyes' or 'mask', got {kind!r}")
    params = OcclusionParams()
    top, bottom, left, right = occlusion_box(tuple(faces.shape[-2:]), kind, params)
    rgb = (0, 0, 0) if kind == "eyes" else params.mask_color
    fill = torch.tensor(rgb, dtype=faces.dtype, device=faces.device) / 127.5 - 1.0
    out = faces.clone()
    out[:, :, top:bottom, left:right] = fill[:, None, None]
    return out


def occlusion_concentration(
    clean: torch.Tensor, occluded: torch.Tensor, top_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec §8: per sample, the share of the summed relative channel change r_i = ‖F_i(occluded) − F_i‖ / ‖F_i‖
    (norms over h×w) carried by the ⌈top_fraction·c⌉ most-changed channels (top_fraction = spread evenly, 1 = all
    the change in those channels), and the (N, c) bool mask of those channels. Float32, no gradient."""
    with torch.no_grad():
        c, o = clean.detach().float().flatten(2), occluded.detach().float().flatten(2)
        change = (o - c).norm(dim=-1) / c.norm(dim=-1).clamp_min(1e-12)  # (N, c)
        k = max(1, math.ceil(top_fraction * change.shape[1]))
        top = change.topk(k, dim=1)
        share = top.values.sum(1) / change.sum(1).clamp_min(1e-30)
        changed = torch.zeros_like(change, dtype=torch.bool).scatter_(1, top.indices, True)
    return share, changed


def occlusion_locality(clean: torch.Tensor, occluded: dict[str, torch.Tensor]) -> dict[str, float]:
    """Spec §8's locality of a feature map: ``spatial_entropy`` / ``top10_energy`` of the clean ``(N, c, h, w)``
    feature (:func:`locality_stats`, means over samples and channels) and, for each occluded version of it,
    ``occlusion_concentration/<kind>`` (:func:`occlusion_concentration`, mean over samples) and their mean
    ``occlusion_concentration``."""
    entropy, top = locality_stats(clean)
    out = {"spatial_entropy": float(entropy.nanmean()), "top10_energy": float(top.mean())}
    shares = {kind: float(occlusion_concentration(clean, feat)[0].mean()) for kind, feat in occluded.items()}
    out.update({f"occlusion_concentration/{kind}": v for kind, v in shares.items()})
    if shares:
        out["occlusion_concentration"] = sum(shares.values()) / len(shares)
    return out


# --------------------------------------------------------------------------- the feature at a point, eq. 8


def point_source(net: nn.Module, at: str, caller: str) -> nn.Module:
    """The module whose output is the feature at point ``at`` (what an LCD insert there reads): the trunk's
    :attr:`~pipeline.models.network.PointModules.source` (iresnet: ``bn3`` of stage K's last block for
    ``layerK.branch``, that block for ``layerK``)."""
    where = point_modules(net.trunk, at)
    if where is None:
        raise ValueError(
            f"{caller}: at must be a point whose modules the trunk names (layerK, layerK.branch), got {at!r}"
        )
    return net.trunk.get_submodule(where.source)


@torch.no_grad()
def point_features(net: nn.Module, batches: list[torch.Tensor], at: str = "layer3.branch") -> list[torch.Tensor]:
    """The feature at ``at`` (what an LCD insert there reads, :func:`point_source`) for each image batch, the
    network in eval mode; any FaceNetwork whose trunk names its points' modules (iresnet), with LCD or not."""
    target = point_source(net, at, "point_features")
    seen: list[torch.Tensor] = []
    handle = target.register_forward_hook(lambda module, args, output: seen.append(output.detach()))
    was_training = net.training
    net.eval()
    try:
        for images in batches:
            net.embed(images)
    finally:
        handle.remove()
        net.train(was_training)
    return seen


@torch.no_grad()
def eq8_mse(
    net: nn.Module,
    images: torch.Tensor,
    drop_fraction: float,
    at: str = "layer3.branch",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Eq. 8 (Sec. V-C, Fig. 3/4): MSE = 1/L Σ_i (f_i^original - f_i^dropped)² between the final embeddings of
    ``images`` without and with ⌊drop_fraction·c⌋ channels dropped per sample at ``at``, in eval mode (BN running
    statistics), averaged over the images. Works for any FaceNetwork whose trunk names its points' modules
    (iresnet), with LCD or not (the baseline): the mask is applied by a temporary hook on the feature LCD reads
    (:func:`point_source`: ``bn3``'s output for ``layerK.branch``, the last block's output for ``layerK``), so an LCD
    insert there sees the dropped feature (its SAM included). The same ``generator`` seed gives the same masks for
    two models of equal width.

    Returns ``mse`` (raw embeddings) and ``mse_unit`` (L2-normalised embeddings, comparable across models)."""
    target = point_source(net, at, "eq8_mse")

    def drop_channels(module, args, output):
        n, c = output.shape[:2]
        gamma = drop_count(drop_fraction, c)
        keep, _ = channel_keep_mask(n, c, gamma, gamma, output.device, generator)
        return output * keep.to(output.dtype)[:, :, None, None]

    was_training = net.training
    net.eval()
    try:
        original = net.embed(images).float()
        handle = target.register_forward_hook(drop_channels)
        try:
            dropped = net.embed(images).float()
        finally:
            handle.remove()
    finally:
        net.train(was_training)
    mse = (original - dropped).pow(2).mean(dim=1)
    unit = (F.normalize(original, dim=1) - F.normalize(dropped, dim=1)).pow(2).mean(dim=1)
    return {"mse": mse.mean(), "mse_unit": unit.mean()}


# --------------------------------------------------------------------------- SAM's control (spec §7.1)


@torch.no_grad()
def freeze_sam_to_mean(net: nn.Module, images: torch.Tensor) -> int:
    """Replace every input-dependent SAM of the network (the ``sam`` of each LCD insert) by a ``constant`` gate
    holding its per-channel mean θ̄ over ``images`` (eval mode). Returns how many SAMs were frozen. If eq. 8 barely
    changes, SAM's benefit there is its mean scale on the branch (spec §7.1's escape route), not its reading of which
    channels were dropped."""
    lcds = [
        m for m in net.modules() if isinstance(getattr(m, "sam", None), SpatialAttention) and m.sam.gate != "constant"
    ]
    sums: dict[int, torch.Tensor] = {}
    handles = [
        m.sam.register_forward_hook(lambda mod, a, out, i=i: sums.__setitem__(i, out.float().mean(0)))
        for i, m in enumerate(lcds)
    ]
    was_training = net.training
    net.eval()
    try:
        net.embed(images)
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    for i, m in enumerate(lcds):
        m.sam = constant_gate(m.sam, sums[i])
    return len(lcds)


# --------------------------------------------------------------------------- an insert's validation monitors


def record_insert_passes(insert: nn.Module, net: nn.Module, faces: torch.Tensor):
    """Eval-mode passes of ``net`` over ``faces`` and their :data:`OCCLUSION_BANDS` occlusions, recording what
    ``insert`` reads: (its input on the clean faces, {band: its input on the occluded faces}, (module, float input)
    of the first BatchNorm outside the insert that ran after it on the clean faces, or None)."""
    seen: list[torch.Tensor] = []
    bn_inputs: list[tuple[nn.Module, torch.Tensor]] = []
    after = []  # [index into bn_inputs at which the insert ran]
    own = {id(m) for m in insert.modules()}

    def read_input(module, args):
        seen.append(args[0].detach())  # the network's dtype (SAM runs on it later)

    def mark(module, args, output):
        after.append(len(bn_inputs))

    def record_bn(module, args):
        bn_inputs.append((module, args[0].detach().float()))

    handles = [insert.register_forward_pre_hook(read_input), insert.register_forward_hook(mark)]
    handles += [
        m.register_forward_pre_hook(record_bn)
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in own
    ]
    try:
        net.embed(faces)
        for h in handles[2:]:
            h.remove()
        del handles[2:]
        for kind in OCCLUSION_BANDS:
            net.embed(occlude_faces(faces, kind))
    finally:
        for h in handles:
            h.remove()
    next_bn = bn_inputs[after[0]] if after and after[0] < len(bn_inputs) else None
    return seen[0], dict(zip(OCCLUSION_BANDS, seen[1:])), next_bn


def sam_occlusion_monitors(sam: nn.Module, clean: torch.Tensor, by_kind: dict[str, torch.Tensor]) -> dict[str, float]:
    """``sam/theta_clean_vs_occluded`` and ``sam/theta_shift_on_changed`` per band and their means over the bands
    (see the module docstring): θ on the channels each occlusion changes most."""
    out = {}
    theta_clean = sam(clean).float()
    for kind, feat in by_kind.items():
        changed = occlusion_concentration(clean, feat)[1]
        theta = sam(feat).float()
        on = (theta * changed).sum(1) / changed.sum(1)
        rest = (theta * ~changed).sum(1) / (~changed).sum(1).clamp_min(1)
        out[f"sam/theta_clean_vs_occluded/{kind}"] = float((on - rest).mean())
        shift = ((theta - theta_clean) * changed).sum(1) / changed.sum(1)
        out[f"sam/theta_shift_on_changed/{kind}"] = float(shift.mean())
    for name in ("sam/theta_clean_vs_occluded", "sam/theta_shift_on_changed"):
        out[name] = sum(out[f"{name}/{kind}"] for kind in by_kind) / len(by_kind)
    return out


def next_bn_gap(bn: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """``lcd/next_bn_mean_gap`` / ``lcd/next_bn_logvar_gap`` of BatchNorm ``bn`` on its float input ``x``: batch
    against running statistics; nothing for a BN without running statistics."""
    if bn.running_mean is None or bn.running_var is None:
        return {}
    dims = [0] + list(range(2, x.dim()))
    mean, var = x.mean(dim=dims), x.var(dim=dims, correction=0)
    run_mean, run_var = bn.running_mean.float(), bn.running_var.float()
    return {
        "lcd/next_bn_mean_gap": float(((mean - run_mean).abs() / (run_var + bn.eps).sqrt()).mean()),
        "lcd/next_bn_logvar_gap": float(((var + bn.eps) / (run_var + bn.eps)).log().abs().mean()),
    }


@torch.no_grad()
def insert_validation_monitors(insert: nn.Module, net: nn.Module, faces: torch.Tensor) -> dict[str, float]:
    """Spec §8's locality, occlusion-concentration, θ and BN-shift values of the LCD insert ``insert`` (its ``sam``
    and point ``at``) on ``faces`` ((N,3,H,W) in [-1, 1], a fixed batch of clean validation faces), the network in
    eval mode (see the module docstring)."""
    clean, by_kind, next_bn = record_insert_passes(insert, net, faces)
    locality = occlusion_locality(clean, by_kind)
    out = {f"lcd/{k}": v for k, v in locality.items() if k.startswith("occlusion_concentration")}
    out["lcd/spatial_entropy_val"], out["lcd/top10_energy_val"] = (
        locality["spatial_entropy"],
        locality["top10_energy"],
    )
    if insert.sam is not None:
        out.update(sam_occlusion_monitors(insert.sam, clean, by_kind))
    if next_bn is not None:
        out.update(next_bn_gap(*next_bn))
    where = point_modules(net.trunk, insert.at)
    if where is not None and where.block is not None:  # a stage's point (layerK, layerK.branch)
        gen = torch.Generator(device=faces.device).manual_seed(0)
        out["lcd/eq8_mse@0.3"] = float(eq8_mse(net, faces, 0.3, insert.at, gen)["mse_unit"])
    return out


# --------------------------------------------------------------------------- ablation diagnostics

EQ8_FRACTIONS = (0.1, 0.3, 0.5)  # of the channels dropped at test time (the paper's Fig. 3/4 sweep)
EQ8_IMAGES = 256  # the first images of the first evaluation set
FIXED_FACES = 256  # occlusion_locality / validation_monitors: distinct faces of the first evaluation set


def eq8_sweep(net, ctx: DiagnosticContext, name: str) -> dict[str, float]:
    """Eq. 8 at every EQ8_FRACTIONS on the first evaluation set's first EQ8_IMAGES images, ``{name@frac: mse}``
    (L2-normalised embeddings; the same seeded masks for every network of one width)."""
    images, _ = ctx.eval_sets[0].load(ctx.input_size)
    batch = to_model_input(images[:EQ8_IMAGES]).to(ctx.device)
    out = {}
    for frac in EQ8_FRACTIONS:
        res = eq8_mse(net, batch, frac, "layer3.branch", torch.Generator(device=ctx.device).manual_seed(0))
        out[f"{name}@{frac}"] = float(res["mse_unit"])
    return out


def fixed_faces(ctx: DiagnosticContext, n: int = FIXED_FACES):
    """(n, 3, S, S) model input on ``ctx.device``: the first image of each of the first n pairs of the first
    evaluation set (distinct faces; for an ``images`` set every other image)."""
    images, _ = ctx.eval_sets[0].load(ctx.input_size)
    return to_model_input(images[0 : 2 * n : 2]).to(ctx.device)


@register_diagnostic("eq8_mse")
def eq8_mse_diagnostic(net, cfg, ctx: DiagnosticContext) -> dict[str, float]:
    """LCD's eq. 8 (Sec. V-C): mean squared difference between the L2-normalised embeddings of the first
    evaluation set's first 256 images without and with 10 / 30 / 50 % of the channels dropped at test time at
    ``layer3.branch`` (the same seeded masks for every network of one width): ``eq8_mse@0.1`` … — low = the
    network tolerates losing channels there, the paper's claim for LCD. Any iresnet network (the baseline too)."""
    return eq8_sweep(net, ctx, "eq8_mse")


@register_diagnostic("eq8_mse_thetabar")
def eq8_mse_thetabar_diagnostic(net, cfg, ctx: DiagnosticContext) -> dict[str, float]:
    """The SAM control of LCD's eq. 8 (spec §7.1): every LCD insert's SAM replaced by its own per-channel mean θ̄
    over the first evaluation set's first 256 distinct faces (:func:`freeze_sam_to_mean`), then eq. 8 as
    ``eq8_mse`` (``eq8_mse_thetabar@0.1`` …). Equal to ``eq8_mse`` = SAM's effect on eq. 8 is its mean scale of
    the branch, not its reading of the dropped channels. Nothing for a network without SAM."""
    import copy

    frozen = copy.deepcopy(net)
    if not freeze_sam_to_mean(frozen, fixed_faces(ctx)):
        return {}
    return eq8_sweep(frozen, ctx, "eq8_mse_thetabar")


@register_diagnostic("occlusion_locality")
def occlusion_locality_diagnostic(net, cfg, ctx: DiagnosticContext) -> dict[str, float]:
    """LCD's spec §8 locality at ``layer3.branch`` (the feature an LCD insert there reads), on the first evaluation
    set's first 256 distinct faces, clean: ``spatial_entropy`` / ``top10_energy`` of the channels, and
    ``occlusion_concentration`` (``/eyes``, ``/mask``): with the eye band or the lower face occluded
    (:func:`occlude_faces`), the share of the summed relative channel change carried by the 10 % most-changed
    channels (⌈0.1·c⌉/c = spread evenly; the paper: SR raises it). Any iresnet network."""
    faces = fixed_faces(ctx)
    feats = point_features(net, [faces] + [occlude_faces(faces, kind) for kind in OCCLUSION_BANDS], "layer3.branch")
    return occlusion_locality(feats[0], dict(zip(OCCLUSION_BANDS, feats[1:])))


@register_diagnostic("validation_monitors")
def validation_monitors_diagnostic(net, cfg, ctx: DiagnosticContext) -> dict[str, float]:
    """What the network's modules measure on fixed clean faces at every in-training evaluation
    (:meth:`FaceNetwork.validation_monitors`; LCD: the occlusion concentration at its own point, θ on the channels
    an occlusion changes most, the next BatchNorm's running-vs-batch gap, eq. 8 at 30 %), on the first evaluation
    set's first 256 distinct faces; nothing for a network whose modules measure nothing there."""
    return net.validation_monitors(fixed_faces(ctx))
