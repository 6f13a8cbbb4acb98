"""LCD: locality-aware channel-wise dropout + spatial regularisation (SR) + spatial attention module (SAM).

Source: He, Zhang, Shan, Liu, Wu, Chen, "Locality-aware Channel-wise Dropout for Occluded Face Recognition",
IEEE TIP (seed ``../shared/seeds/lcd_channel_dropout.md``); implementation spec ``../shared/specs/lcd.md``
(its section numbers are cited as "spec §"). The SR losses are AnchorNet's (Novotny et al., CVPR 2017).

``model.inserts: [{kind: lcd, at: layer3.branch, ...}]`` (:class:`LCDOptions`). One insert does, in order
(Algorithm 1, per mini-batch)::

    F                                    the insert's input, n×c×h×w
    L_SR^filter(W)                       eq. 1 on the weights W of the last 3×3 conv before the insert
    L_SR^response(F)                     eq. 2 on F *before* dropping (a dropped map would give 0/0)
    F ← F ∘ M                            eqs. 3-4, training only: γ_t whole channels per sample zeroed
    θ = SAM(F);  F ← F · θ               eq. 7, training and inference

**Placement.** ``at: layerK.branch`` (default in the configs: ``layer3.branch``) is inside the residual branch of
stage K's last block, right after ``bn3``, the BN of that block's last 3×3 conv (``conv2``), before SE and the
shortcut addition: "the outputs of the last 3×3 convolution layer in the stage" (Sec. V-C), "after the
conventional BN layer" (Sec. III-B), and F is the response of that conv's filters as eq. 2 requires (spec §1.1).
``at: layerK`` (the stage output, after ``+ identity``) also works (spec §1.1's alternative); the SR filter term
then still reads ``layerK[-1].conv2`` and f_i of eq. 2 is no longer a single filter's response.

**BN statistics (eqs. 5-6).** At ``layerK.branch`` the BN before LCD (``bn3``) sees every sample, i.e. eq. 5 is
the right statistic and eq. 6 (BN over the non-dropped samples only) is not needed: the paper's own choice
(Sec. III-B). At ``layerK`` the next BN (the trunk's ``next_norm``: ``layer{K+1}[0].bn1``) sees zeroed channels,
the "LCD before BN" case eqs. 5-6 warn about; ``masked_next_bn: true`` swaps it for :class:`MaskedBatchNorm2d`,
eq. 6: its training statistics run over the samples whose channel was not dropped (the downsample branch's BN reads
a 1×1 conv of the dropped tensor, whose channels mix kept and dropped ones: eq. 6 does not apply there and it is
left as it is).

**Choices not from the paper** (each a config value, marked [C] in :class:`LCDOptions`):

- γ_min: the paper never states it; ``drop_min: 0.0`` (spec §1.3). γ is an *integer channel count*, drawn
  uniformly from {⌊drop_min·c⌋, …, ⌊drop_max·c⌋} per sample (``drop_max: 0.6`` is the paper's γ_max = 0.6·c);
  the γ channels are a uniform random subset (exact sampler: a random permutation per row, spec §1.3). Masks use
  torch's global RNG, which the trainer reseeds per step and rank (different masks per rank, the same on resume).
- No rescaling of the kept channels (eq. 4 is a pure mask; ``rescale: true`` multiplies them by c/(c-γ_t), an
  ablation only).
- SR reduction: the paper prints both losses as raw sums over the c(c-1) ordered pairs, with which α = 100 would
  be ~5·10⁴× ArcFace's gradient on that conv (spec §2.3, measured). Default ``sr_reduction: pair_mean`` (each sum
  divided by c(c-1); eq. 2 averaged over the batch); ``sum`` gives the printed form. α = 100 and β = 1 as printed.
- Eq. 1's w_i^p is filter i's column at spatial tap p (∈ R^{c_in}, AnchorNet eq. 3); |·| around the sum over taps.
  Eq. 2 per sample then the batch mean; ``sr_response_fn: identity`` (literal; ``relu`` / ``softplus`` =
  AnchorNet's non-negative responses, an ablation). Both in float32 with autocast off, norms clamped at
  ``sr_eps`` (1e-6).
- With a SCAN trunk (``model.conv: {kind: scan}``) the conv is a ScaleAttentionConv: eq. 1 reads its effective
  kernel ``k_u = k_s + k_i`` (``conv.kernel()``, SCAN-CNN eqs. 4 and 8), the kernel actually applied, so the SR
  gradient reaches k, t and k_i. A conv with neither ``kernel()`` nor a 4-d ``weight`` is a ConfigError when SR
  is on.
- SAM sizes and activations (spec §3): Conv1×1(c→``sam_channels``=16, no bias) → BN → PReLU → flatten →
  Linear(16·h·w → d = round(``sam_hidden_ratio``·c) = c/4) → PReLU → Linear(d → c) → ``sam_gate`` (sigmoid, as SE;
  ``2sigmoid`` is centred on 1 at initialisation; ``constant`` is the control of spec §7.1: a frozen per-channel θ̄,
0.5 at initialisation, that scales the branch like the gate without seeing the input — :func:`freeze_sam_to_mean`
turns a trained gate into its own θ̄ for the eq. 8 table). No global pooling anywhere (Sec. III-C), so FC1's input size
  follows the point's spatial size (``PointInfo``: 14×14 at 112 px, 18×18 at 144 px) and a checkpoint is tied to
  its input size, like iresnet's ``fc``. Inside the trunk, SAM's 1×1 conv and BN get arcface_torch's trunk
  initialisation (N(0, 0.1), γ = 1, β = 0); the Linear layers keep PyTorch's default.

**Monitors** (training forward with a trace; all detached): ``sr/filter_raw``, ``sr/response_raw`` (unweighted,
under the chosen reduction; computed even with ``sr: false``, so a CD-only run still logs them),
``sr/filter_weighted``, ``sr/response_weighted``; ``lcd/drop_frac_mean``; ``lcd/spatial_entropy`` and
``lcd/top10_energy`` (channel locality of the clean F, spec §8: the normalised entropy of relu(F_i)/Σrelu(F_i) over
h×w, and the share of a channel's energy F_i² in its top 10 % positions; on the current batch, not on a fixed
validation batch); ``lcd/eq8_mse_insert``: eq. 8's mean squared difference between the insert's output with and
without the dropout on the current batch (SAM applied to both, batch-statistics BN without running-stat updates),
per element — the insert-level version; the paper's eq. 8 on the final embedding is :func:`eq8_mse` (it needs the
layers after the insert and the head, which an insert cannot run); ``lcd/branch_to_identity`` (‖branch‖/‖identity‖
of the LCD block per sample, batch mean, via a forward hook on the block set up by :meth:`LCD.bind`; for
``layerK.branch`` the branch is what is actually added, i.e. after LCD and SAM) and ``lcd/bn3_gamma_absmean``
(a network escaping LCD shrinks both); ``sam/theta_mean``, ``sam/theta_std_over_channels``,
``sam/theta_std_over_samples`` and ``sam/theta_var_over_samples`` (→ 0: SAM collapsed to a static scale).
Histograms: ``lcd/gamma_frac`` (γ_t/c), ``lcd/channel_drop_freq`` (per channel, over the batch),
``lcd/spatial_entropy`` (per channel), ``sam/theta``, ``sr/filter_cos`` (off-diagonal S_ij/k²), ``sr/response_cos``
(off-diagonal cosines of the batch's first sample). Probe traces (``attention_maps.png``): relu(F) of ``maps``
evenly spaced channels (Fig. 1 style). Monitor names carry no point: one LCD insert per network is assumed.

The conv's kernel is watched (``trace.watch("lcd_conv", …)``): at every log step the trainer writes each loss
term's gradient norm on it and its ratio to the classification term's, ``grad_norm/lcd_conv/<term>`` and
``grad_ratio/lcd_conv/<term>`` (spec §8: SR's share of the conv's gradient).

**On a fixed batch of clean validation faces, at every evaluation** (:meth:`LCD.validation_monitors`, logged as
``monitor/<name>``; spec §8's locality, occlusion and shift measurements, computed by
:func:`pipeline.models.lcd_probes.insert_validation_monitors`, whose module docstring lists them).

**Where the parts live.** This module: the insert (options, the module, its SR losses, its binding to the trunk,
its registration). :mod:`pipeline.models.lcd_parts`: the channel mask, channel locality, SAM and the masked BN.
:mod:`pipeline.models.lcd_probes`: the analysis probes (eq. 8 on the final embedding, occlusion locality, SAM's
constant control) and LCD's ablation diagnostics. The modules around the point (the block, its last conv, the next
BN) are named by the trunk (:func:`pipeline.models.network.point_modules`), never spelled here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import registry
from pipeline.config import ConfigError, InsertOptions, Invalid
from pipeline.models.lcd_parts import (
    GATES,
    MaskedBatchNorm2d,
    SpatialAttention,
    channel_keep_mask,
    drop_count,
    locality_stats,
)
from pipeline.models.lcd_probes import (
    eq8_mse,
    freeze_sam_to_mean,
    insert_validation_monitors,
    occlude_faces,
    occlusion_concentration,
    occlusion_locality,
    point_features,
)
from pipeline.models.network import Insert, PointInfo, PointModules, Trace, point_modules

__all__ = [
    "LCDOptions",
    "LCD",
    "MaskedBatchNorm2d",
    "SpatialAttention",
    "channel_keep_mask",
    "filter_orthogonality",
    "response_orthogonality",
    "locality_stats",
    "eq8_mse",
    "drop_count",
    "freeze_sam_to_mean",
    "occlude_faces",
    "occlusion_concentration",
    "occlusion_locality",
    "point_features",
]

REDUCTIONS = ("pair_mean", "sum")
RESPONSE_FNS = ("identity", "relu", "softplus")


# --------------------------------------------------------------------------- eqs. 1-2: spatial regularisation


def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


def filter_orthogonality(
    weight: torch.Tensor, eps: float = 1e-6, reduction: str = "pair_mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1: L = Σ_{i≠j} |Σ_p ⟨w_i^p, w_j^p⟩ / (‖w_i^p‖ ‖w_j^p‖)|, w_i^p = weight[i, :, a, b] (tap p = (a, b)).

    Returns (L, S) with S[i, j] = Σ_p cos(w_i^p, w_j^p) (c_out × c_out; S_ii = k² for non-zero taps), in float32 (or
    float64 for a float64 weight). ``reduction``: ``pair_mean`` divides by c_out(c_out-1) (not from the paper, spec
    §2.3), ``sum`` is eq. 1 as printed. Vectorised as one matmul: with every tap column normalised, Σ_p ⟨·,·⟩ is
    the inner product of the concatenated columns."""
    with _no_autocast(weight):
        w = weight if weight.dtype == torch.float64 else weight.float()
        c_out, c_in, kh, kw = w.shape
        taps = w.permute(0, 2, 3, 1).reshape(c_out, kh * kw, c_in)  # [i, p] = w_i^p
        unit = taps / torch.linalg.vector_norm(taps, dim=2, keepdim=True).clamp_min(eps)
        flat = unit.reshape(c_out, kh * kw * c_in)
        s = flat @ flat.t()  # Σ_p cos(w_i^p, w_j^p)
        diagonal = torch.eye(c_out, dtype=torch.bool, device=w.device)
        loss = s.abs().masked_fill(diagonal, 0).sum()  # Σ_{i≠j} |·| (eq. 1)
        if reduction == "pair_mean":
            loss = loss / (c_out * (c_out - 1))
        elif reduction != "sum":
            raise ValueError(f"filter_orthogonality: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return loss, s


def response_orthogonality(
    features: torch.Tensor, eps: float = 1e-6, reduction: str = "pair_mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 per sample t: L_t = Σ_{i≠j} (⟨f_i, f_j⟩ / (‖f_i‖ ‖f_j‖))², f_i = features[t, i] (h×w); batch mean.

    Returns (L, G) with G[t, i, j] the cosines (n × c × c), float32 (float64 for float64 input). A zero channel
    gives cosines 0 (its norm is clamped at ``eps``), never NaN. ``reduction`` as :func:`filter_orthogonality`."""
    with _no_autocast(features):
        x = features if features.dtype == torch.float64 else features.float()
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        unit = flat / torch.linalg.vector_norm(flat, dim=2, keepdim=True).clamp_min(eps)
        g = unit @ unit.transpose(1, 2)
        diagonal = torch.eye(c, dtype=torch.bool, device=x.device)
        per_sample = g.pow(2).masked_fill(diagonal, 0).sum(dim=(1, 2))  # Σ_{i≠j} cos² (eq. 2)
        loss = per_sample.mean()
        if reduction == "pair_mean":
            loss = loss / (c * (c - 1))
        elif reduction != "sum":
            raise ValueError(f"response_orthogonality: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return loss, g


# --------------------------------------------------------------------------- the insert


@dataclass
class LCDOptions(InsertOptions):
    """``model.inserts: [{kind: lcd, ...}]``. [P]: from the paper; [C]: not from the paper (spec's choice)."""

    RANGES = {
        "drop_min": "[0, 1]",
        "drop_max": "[0, 1]",
        "sr_filter_weight": "[0, inf)",
        "sr_response_weight": "[0, inf)",
        "sr_eps": "(0, inf)",
        "sam_channels": "[1, inf)",
        "sam_hidden_ratio": "(0, inf)",
        "maps": "[0, inf)",
    }  # field → valid interval (pipeline.config.check_ranges)

    at: str = "layer3.branch"  # stage 3 (Table I), inside the last block after bn3 [P: stage; C: exact slot]
    drop: bool = True  # channel-wise dropout (CD), eqs. 3-4; false: SR / SAM only (Table II rows)
    drop_min: float = 0.0  # γ_min = ⌊drop_min·c⌋ [C: the paper gives no γ_min]
    drop_max: float = 0.6  # γ_max = ⌊drop_max·c⌋ [P: "γ_max = 0.6·c is recommended"]
    rescale: bool = False  # kept channels × c/(c-γ_t) [C: ablation; the paper (eq. 4) does not rescale]
    sr: bool = True  # add the SR losses (eqs. 1-2); false: their raw values are still logged
    sr_filter_weight: float = 100.0  # α [P]
    sr_response_weight: float = 1.0  # β [P]
    sr_reduction: str = "pair_mean"  # pair_mean | sum [C: pair_mean; sum = eqs. 1-2 as printed]
    sr_response_fn: str = "identity"  # identity | relu | softplus, applied to F in eq. 2 [C: ablation values]
    sr_eps: float = 1e-6  # norm clamp in eqs. 1-2 [C]
    sam: bool = True  # spatial attention module (eq. 7), kept at inference
    sam_channels: int = 16  # c_r of SAM's 1×1 conv [C]
    sam_hidden_ratio: float = 0.25  # SAM's hidden FC width d = round(ratio·c) [C]
    sam_gate: str = "sigmoid"  # sigmoid | 2sigmoid | constant (a frozen per-channel θ̄ = 0.5: the control) [C]
    maps: int = 3  # channels of relu(F) drawn in attention_maps.png (Fig. 1 style); 0 = none [C]
    # eq. 6 [P] for the BN that reads the dropped tensor: only at a stage output ("layerK"), whose next stage's
    # first BN (layerK+1[0].bn1) sees zeroed channels; its training statistics then skip them (MaskedBatchNorm2d)
    masked_next_bn: bool = False

    def validate(self):
        if self.drop_max < self.drop_min:
            raise Invalid("drop_max", f"must be in [drop_min ({self.drop_min}), 1], got {self.drop_max}")
        if self.sr_reduction not in REDUCTIONS:
            raise Invalid("sr_reduction", f"must be one of {', '.join(REDUCTIONS)}, got {self.sr_reduction!r}")
        if self.sr_response_fn not in RESPONSE_FNS:
            raise Invalid("sr_response_fn", f"must be one of {', '.join(RESPONSE_FNS)}, got {self.sr_response_fn!r}")
        if self.sam_gate not in GATES:
            raise Invalid("sam_gate", f"must be one of {', '.join(GATES)}, got {self.sam_gate!r}")
        if self.masked_next_bn and not re.fullmatch(r"layer\d+", self.at):
            raise Invalid(
                "masked_next_bn",
                f"needs a stage-output point 'layerK' (at '{self.at}' the dropped channels are added to the shortcut "
                "before any BN reads them, so no BN sees zeroed channels)",
            )


class LCD(Insert):
    """Channel-wise dropout (eqs. 3-4) with the SR losses (eqs. 1-2) and SAM (eq. 7); see the module docstring."""

    def __init__(self, channels: int, spatial: int, opts: LCDOptions):
        super().__init__()
        if channels < 2:
            raise ConfigError(f"model.inserts: lcd at '{opts.at}' needs >= 2 channels, got {channels}")
        self.channels, self.spatial, self.at = channels, spatial, opts.at
        self.drop, self.rescale = opts.drop, opts.rescale
        self.gamma_min = drop_count(opts.drop_min, channels)
        self.gamma_max = drop_count(opts.drop_max, channels)
        self.sr = opts.sr
        self.alpha, self.beta = opts.sr_filter_weight, opts.sr_response_weight
        self.sr_reduction, self.sr_response_fn, self.sr_eps = opts.sr_reduction, opts.sr_response_fn, opts.sr_eps
        self.sam = (
            SpatialAttention(
                channels,
                spatial,
                reduced=opts.sam_channels,
                hidden=max(1, int(round(opts.sam_hidden_ratio * channels))),
                gate=opts.sam_gate,
            )
            if opts.sam
            else None
        )
        n_maps = min(opts.maps, channels)
        self.map_channels = [int(i) for i in torch.linspace(0, channels - 1, n_maps).round().tolist()] if n_maps else []
        # The block holding the conv before the insert: set by bind(), deliberately NOT a registered submodule
        # (its parameters belong to the trunk; registering it would list them twice in the state dict).
        object.__setattr__(self, "_block", None)
        self._conv_path = self._norm_path = None  # inside the block, named by the trunk (bind)
        self._identity_shortcut = True
        self.masked_next_bn = opts.masked_next_bn

    def extra_repr(self) -> str:
        return (
            f"at={self.at}, channels={self.channels}, drop={self.drop}, gamma=[{self.gamma_min}, {self.gamma_max}], "
            f"rescale={self.rescale}, sr={self.sr}, alpha={self.alpha}, beta={self.beta}, "
            f"sr_reduction={self.sr_reduction}, sr_response_fn={self.sr_response_fn}"
        )

    # ------------------------------------------------------------------ binding to the trunk
    def bind(self, trunk: nn.Module, at: str) -> None:
        """Find the residual block the point lies in or ends (the trunk's :func:`point_modules`; its last conv is
        "the last 3×3 convolution layer in the stage"); keep it as an unregistered reference and hook its output for
        ``lcd/branch_to_identity``."""
        where = point_modules(trunk, at)
        if self.masked_next_bn:
            _mask_next_bn(trunk, at, where)
        block = trunk.get_submodule(where.block) if where is not None and where.block is not None else None
        conv = trunk.get_submodule(where.conv) if block is not None and where.conv is not None else None
        if conv is None or _kernel_reader(conv) is None:
            if self.sr:
                raise ConfigError(
                    f"model.inserts: lcd at '{at}': the SR filter loss (eq. 1) needs the last 3×3 conv of a stage "
                    "(a point layerK.branch or layerK of an iresnet trunk, whose block's last conv has a 4-d weight "
                    "or a kernel()); set sr: false to use LCD without SR here"
                )
            return
        object.__setattr__(self, "_block", block)
        self._conv_path, self._norm_path = _inside(where.conv, where.block), _inside(where.norm, where.block)
        self._identity_shortcut = where.shortcut is None
        block.register_forward_hook(self._block_output_hook)

    def conv_kernel(self) -> torch.Tensor | None:
        """The weight eq. 1 regularises: the bound conv's effective kernel (SCAN: k_u), or None if unbound."""
        if self._block is None:
            return None
        return _kernel_reader(_child(self._block, self._conv_path))()

    def _block_output_hook(self, block: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """After the LCD block: ‖output - x‖ / ‖x‖ per sample (the block's branch over its identity shortcut)."""
        trace = args[1] if len(args) > 1 else None
        if not isinstance(trace, Trace) or trace.probing or not self.training or not self._identity_shortcut:
            return  # (a projection shortcut would have to be re-run, updating its BN: not measured)
        with torch.no_grad():
            identity = args[0].detach().float().flatten(1)
            branch = output.detach().float().flatten(1) - identity
            ratio = branch.norm(dim=1) / identity.norm(dim=1).clamp_min(1e-12)
            trace.monitor("lcd/branch_to_identity", ratio.mean())
            if self._norm_path is not None:
                norm = _child(block, self._norm_path)
                trace.monitor("lcd/bn3_gamma_absmean", norm.weight.detach().float().abs().mean())

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        training_trace = trace is not None and self.training and not trace.probing
        if training_trace:
            self._spatial_regularisation(x, trace)
        if trace is not None and trace.probing and self.map_channels:
            positive = x.detach().float().clamp_min(0)
            for i in self.map_channels:
                trace.spatial_map(f"lcd/ch{i}", positive[:, i : i + 1])
        clean = x
        keep = gamma = None
        if self.drop and self.training:
            keep, gamma = channel_keep_mask(x.shape[0], self.channels, self.gamma_min, self.gamma_max, x.device)
            factor = keep.to(x.dtype)
            if self.rescale:
                factor = factor * (self.channels / (self.channels - gamma).clamp_min(1)).to(x.dtype)[:, None]
            x = x * factor[:, :, None, None]  # eq. 4: F_drop = F ∘ M
        theta = None
        if self.sam is not None:
            theta = self.sam(x)
            x = x * theta.to(x.dtype)[:, :, None, None]  # eq. 7: F̃ = F · θ
        if training_trace:
            self._report(trace, clean, x, keep, gamma, theta)
        return x

    def _spatial_regularisation(self, features: torch.Tensor, trace: Trace) -> None:
        """Eqs. 1-2 as weighted aux losses ``sr_filter`` / ``sr_response`` (if ``sr``) and as raw monitors."""
        with torch.set_grad_enabled(self.sr and torch.is_grad_enabled()):
            kernel = self.conv_kernel()
            if kernel is not None:
                trace.watch("lcd_conv", kernel)  # the trainer logs each loss term's gradient norm on it (spec §8)
                l_filter, s = filter_orthogonality(kernel, self.sr_eps, self.sr_reduction)
                if self.sr:
                    trace.add_loss("sr_filter", self.alpha * l_filter)
                trace.monitor("sr/filter_raw", l_filter.detach())
                trace.monitor("sr/filter_weighted", self.alpha * l_filter.detach())
                taps = kernel.shape[-1] * kernel.shape[-2]
                upper = torch.triu_indices(s.shape[0], s.shape[0], offset=1, device=s.device)
                trace.histogram("sr/filter_cos", s.detach()[upper[0], upper[1]] / taps)
            responses = features
            if self.sr_response_fn == "relu":
                responses = F.relu(features)
            elif self.sr_response_fn == "softplus":
                responses = F.softplus(features)
            l_response, g = response_orthogonality(responses, self.sr_eps, self.sr_reduction)  # on F before LCD
            if self.sr:
                trace.add_loss("sr_response", self.beta * l_response)
            trace.monitor("sr/response_raw", l_response.detach())
            trace.monitor("sr/response_weighted", self.beta * l_response.detach())
            upper = torch.triu_indices(self.channels, self.channels, offset=1, device=g.device)
            trace.histogram("sr/response_cos", g.detach()[0, upper[0], upper[1]])

    def _report(self, trace: Trace, clean, out, keep, gamma, theta) -> None:
        with torch.no_grad():
            entropy, top = locality_stats(clean)
            trace.monitor("lcd/spatial_entropy", entropy.nanmean())
            trace.monitor("lcd/top10_energy", top.mean())
            trace.histogram("lcd/spatial_entropy", entropy.nanmean(dim=0))
            if keep is not None:
                trace.monitor("lcd/drop_frac_mean", (gamma.float() / self.channels).mean())
                trace.histogram("lcd/gamma_frac", gamma.float() / self.channels)
                trace.histogram("lcd/channel_drop_freq", (~keep).float().mean(dim=0))
                clean_out = clean
                if self.sam is not None:
                    clean_out = clean * self.sam(clean, update_stats=False).to(clean.dtype)[:, :, None, None]
                diff = (clean_out.detach().float() - out.detach().float()).pow(2).flatten(1).mean(dim=1)
                trace.monitor("lcd/eq8_mse_insert", diff.mean())  # eq. 8 at the insert (1/L Σ (·)², L = c·h·w)
            if theta is not None:
                t = theta.detach().float()
                trace.histogram("sam/theta", t.flatten())
                trace.monitor("sam/theta_mean", t.mean())
                trace.monitor("sam/theta_std_over_channels", t.std(dim=1, correction=0).mean())
                over_samples = t.var(dim=0, correction=0)
                trace.monitor("sam/theta_std_over_samples", over_samples.sqrt().mean())
                trace.monitor("sam/theta_var_over_samples", over_samples.mean())

    # ------------------------------------------------------------------ at every evaluation (spec §8)
    def validation_monitors(self, net: nn.Module, faces: torch.Tensor) -> dict[str, float]:
        """Spec §8's locality, occlusion-concentration, θ and BN-shift values on ``faces`` ((N,3,H,W) in [-1, 1],
        a fixed batch of clean validation faces), the network in eval mode
        (:func:`pipeline.models.lcd_probes.insert_validation_monitors`)."""
        return insert_validation_monitors(self, net, faces)


# --------------------------------------------------------------------------- the modules around the point


def _inside(name: str | None, block: str) -> str | None:
    """The trunk's qualified ``name`` of a module inside ``block``, relative to the block (the LCD keeps the block
    and reads the module through it at every call: folding replaces the conv, so no module is kept)."""
    return None if name is None else name.removeprefix(f"{block}.")


def _child(module: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _mask_next_bn(trunk: nn.Module, at: str, where: PointModules | None) -> None:
    """Swap the BatchNorm the trunk names after ``at`` (= "layerK"; :attr:`PointModules.next_norm`, the first BN of
    the next stage's first block) for a :class:`MaskedBatchNorm2d` holding the same parameters and buffers;
    ConfigError when there is none."""
    name = where.next_norm if where is not None else None
    bn = trunk.get_submodule(name) if name is not None else None
    if not isinstance(bn, nn.BatchNorm2d):
        k = int(re.fullmatch(r"layer(\d+)", at).group(1))
        raise ConfigError(
            f"model.inserts: lcd at '{at}' with masked_next_bn: there is no next stage layer{k + 1} whose first "
            "block starts with a BatchNorm2d to apply eq. 6 to"
        )
    masked = MaskedBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    masked.load_state_dict(bn.state_dict())
    parent, _, leaf = name.rpartition(".")
    setattr(trunk.get_submodule(parent), leaf, masked)


def _kernel_reader(conv: nn.Module):
    """A callable returning ``conv``'s effective (out, in, k, k) kernel, or None: ``kernel()`` where the conv
    defines it (SCAN's ScaleAttentionConv: k_u), else a 4-d ``weight`` (nn.Conv2d)."""
    kernel = getattr(conv, "kernel", None)
    if callable(kernel):
        return kernel
    weight = getattr(conv, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 4:
        return lambda: conv.weight
    return None


@registry.register("insert", "lcd", LCDOptions)
def build_lcd(opts: LCDOptions, point: PointInfo) -> LCD:
    return LCD(point.channels, point.spatial, opts)
