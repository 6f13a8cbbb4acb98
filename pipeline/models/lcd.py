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
(Sec. III-B). At ``layerK`` the next BN (``layer{K+1}[0].bn1``) sees zeroed channels, the "LCD before BN" case
eqs. 5-6 warn about; ``masked_next_bn: true`` swaps it for :class:`MaskedBatchNorm2d`, eq. 6: its training
statistics run over the samples whose channel was not dropped (the downsample branch's BN reads a 1×1 conv of the
dropped tensor, whose channels mix kept and dropped ones: eq. 6 does not apply there and it is left as it is).

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
``monitor/<name>``; spec §8's locality, occlusion and shift measurements): ``lcd/spatial_entropy_val`` and
``lcd/top10_energy_val`` (the locality above, on those faces); ``lcd/occlusion_concentration`` (and ``/eyes``,
``/mask``): each face's eye band and lower face (:func:`occlude_faces`, the geometry of ``data_prep.bin degrade
--occlude eyes mask``) are occluded, each channel's relative change ‖F_i(occluded) − F_i‖ / ‖F_i‖ of the feature LCD
reads is measured, and the share of the summed change carried by the top 10 % of channels is reported (0.1 = spread
evenly; the paper's claim is that SR raises it, :func:`occlusion_concentration`); with SAM,
``sam/theta_clean_vs_occluded`` (and per band): mean θ of the occluded face on its 10 % most-changed channels minus
mean θ on the rest (< 0: SAM turns down what the occlusion corrupted) and ``sam/theta_shift_on_changed``: θ(occluded)
− θ(clean) on those channels; ``lcd/next_bn_mean_gap`` / ``lcd/next_bn_logvar_gap``: for the first BatchNorm that
runs after LCD, mean over channels of |μ_batch − μ_running| / σ_running and |log(σ²_batch / σ²_running)| on those
faces (the train/eval shift LCD's dropping may cause, spec §8 "escape and shift"); ``lcd/eq8_mse@0.3``: eq. 8 on
the final unit-norm embeddings with 30 % of the channels dropped at LCD's point (:func:`eq8_mse`, seed 0).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import registry
from pipeline.config import ConfigError, InsertOptions, Invalid
from pipeline.models.network import Insert, PointInfo, Trace

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
    "occlude_faces",
    "occlusion_concentration",
    "occlusion_locality",
    "point_features",
]

REDUCTIONS = ("pair_mean", "sum")
RESPONSE_FNS = ("identity", "relu", "softplus")
GATES = ("sigmoid", "2sigmoid", "constant")
THETA_BAR_INIT = 0.5  # sam_gate: constant at initialisation: sigmoid's centre (trained sigmoid gates: 0.41–0.46)


def drop_count(fraction: float, channels: int) -> int:
    """⌊fraction·c⌋ (γ as a channel count, spec §1.3), robust to float round-off (0.29·100 → 29, not 28)."""
    return int(math.floor(fraction * channels + 1e-9))


# --------------------------------------------------------------------------- eqs. 3-4: the channel mask


def channel_keep_mask(
    n: int,
    channels: int,
    gamma_min: int,
    gamma_max: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 3-4's mask M per sample: (keep (n, c) bool, γ (n,) int64).

    γ_t ~ U{gamma_min, …, gamma_max} (integers, inclusive); exactly γ_t channels of row t are dropped, every
    γ_t-subset equally likely (the ranks of i.i.d. uniforms are a uniform random permutation; drop the ranks < γ_t).
    Draws from ``generator`` (on its device) or torch's global RNG, then moves to ``device``."""
    if not 0 <= gamma_min <= gamma_max <= channels:
        raise ValueError(
            f"channel_keep_mask: need 0 <= gamma_min <= gamma_max <= c, got {gamma_min}, {gamma_max}, {channels}"
        )
    where = generator.device if generator is not None else device
    gamma = torch.randint(gamma_min, gamma_max + 1, (n,), device=where, generator=generator)
    rank = torch.rand(n, channels, device=where, generator=generator).argsort(dim=1).argsort(dim=1)
    keep = rank >= gamma[:, None]
    return keep.to(device), gamma.to(device)


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


def locality_stats(features: torch.Tensor, top_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel locality (spec §8), per (sample, channel), float32, no gradient:

    - normalised spatial entropy of p = relu(f)/Σ relu(f) over the h·w positions (1 = spread evenly, 0 = one
      position); NaN where a channel has no positive response;
    - the share of the channel's energy f² in its top ``top_fraction`` positions (at least one)."""
    with torch.no_grad():
        x = features.detach().float().flatten(2)
        hw = x.shape[-1]
        positive = x.clamp_min(0)
        mass = positive.sum(-1, keepdim=True)
        p = positive / mass.clamp_min(1e-30)
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1) / math.log(max(hw, 2))
        entropy = entropy.masked_fill(mass.squeeze(-1) <= 0, float("nan"))
        energy = x.pow(2)
        k = max(1, math.ceil(top_fraction * hw))
        top = energy.topk(k, dim=-1).values.sum(-1) / energy.sum(-1).clamp_min(1e-30)
    return entropy, top


# --------------------------------------------------------------------------- eq. 7: SAM


class SpatialAttention(nn.Module):
    """θ ∈ R^c per sample (eq. 7): 1×1 conv → BN → PReLU → flatten → FC → PReLU → FC → gate (sizes: [C]).

    No global pooling: FC1 reads the whole flattened c_r×h×w map, so θ depends on *where* the response is.
    ``forward(x, update_stats=False)`` in training mode uses batch statistics without updating the running ones
    (the clean-feature pass of the ``lcd/eq8_mse_insert`` monitor)."""

    def __init__(self, channels: int, spatial: int, reduced: int = 16, hidden: int = 64, gate: str = "sigmoid"):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"SpatialAttention: gate must be one of {GATES}, got {gate!r}")
        self.channels, self.spatial, self.gate = channels, spatial, gate
        if gate == "constant":
            # The control of spec §7.1: a per-channel θ̄ that ignores the input (frozen: a buffer, no gradient).
            # It scales the branch as a sigmoid gate does, without seeing which channels were dropped.
            self.register_buffer("theta_bar", torch.full((channels,), THETA_BAR_INIT))
            return
        self.reduce = nn.Conv2d(channels, reduced, kernel_size=1, bias=False)
        self.reduce_bn = nn.BatchNorm2d(reduced, eps=1e-05)
        self.reduce_act = nn.PReLU(reduced)
        self.fc1 = nn.Linear(reduced * spatial * spatial, hidden)
        self.fc1_act = nn.PReLU(hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor, update_stats: bool = True) -> torch.Tensor:
        if not torch.jit.is_tracing() and x.shape[-2:] != (self.spatial, self.spatial):  # (ONNX export traces)
            raise ValueError(
                f"SAM was built for {self.spatial}×{self.spatial} maps (model.input_size), got {tuple(x.shape[-2:])}"
            )
        if self.gate == "constant":
            return self.theta_bar.to(x.dtype).expand(x.shape[0], -1)
        y = self.reduce(x)
        if update_stats or not self.training:
            y = self.reduce_bn(y)
        else:
            bn = self.reduce_bn
            y = F.batch_norm(y, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        y = self.reduce_act(y)
        z = self.fc2(self.fc1_act(self.fc1(torch.flatten(y, 1))))
        theta = torch.sigmoid(z)
        return 2 * theta if self.gate == "2sigmoid" else theta


def constant_gate(sam: SpatialAttention, theta_bar: torch.Tensor) -> SpatialAttention:
    """A ``constant`` SAM applying ``theta_bar`` (C,) to every sample: the post-hoc control of a trained gate
    (θ̄ = its per-channel mean θ over a set of faces, see :func:`freeze_sam_to_mean`)."""
    frozen = SpatialAttention(sam.channels, sam.spatial, gate="constant").to(theta_bar.device)
    frozen.theta_bar.copy_(theta_bar.detach().float())
    return frozen


@torch.no_grad()
def freeze_sam_to_mean(net: nn.Module, images: torch.Tensor) -> int:
    """Replace every LCD insert's input-dependent SAM by a ``constant`` gate holding its per-channel mean θ̄ over
    ``images`` (eval mode). Returns how many SAMs were frozen. If eq. 8 barely changes, SAM's benefit there is its
    mean scale on the branch (spec §7.1's escape route), not its reading of which channels were dropped."""
    lcds = [m for m in net.modules() if isinstance(m, LCD) and m.sam is not None and m.sam.gate != "constant"]
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


# --------------------------------------------------------------------------- the insert


_STAGE_POINT = re.compile(r"^(layer\d+)(\.branch)?$")


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
        self.masked_next_bn = opts.masked_next_bn

    def extra_repr(self) -> str:
        return (
            f"at={self.at}, channels={self.channels}, drop={self.drop}, gamma=[{self.gamma_min}, {self.gamma_max}], "
            f"rescale={self.rescale}, sr={self.sr}, alpha={self.alpha}, beta={self.beta}, "
            f"sr_reduction={self.sr_reduction}, sr_response_fn={self.sr_response_fn}"
        )

    # ------------------------------------------------------------------ binding to the trunk
    def bind(self, trunk: nn.Module, at: str) -> None:
        """Find the last block of the insert's stage (its ``conv2`` is "the last 3×3 convolution layer in the
        stage"); keep it as an unregistered reference and hook its output for ``lcd/branch_to_identity``."""
        match = _STAGE_POINT.match(at)
        layer = getattr(trunk, match.group(1), None) if match else None
        if self.masked_next_bn:
            _mask_next_bn(trunk, at)
        block = layer[-1] if isinstance(layer, nn.Sequential) and len(layer) else None
        conv = getattr(block, "conv2", None) if block is not None else None
        if conv is None or _kernel_reader(conv) is None:
            if self.sr:
                raise ConfigError(
                    f"model.inserts: lcd at '{at}': the SR filter loss (eq. 1) needs the last 3×3 conv of a stage "
                    "(a point layerK.branch or layerK of an iresnet trunk, whose layerK[-1].conv2 has a 4-d weight or "
                    "a kernel()); set sr: false to use LCD without SR here"
                )
            return
        object.__setattr__(self, "_block", block)
        block.register_forward_hook(self._block_output_hook)

    def conv_kernel(self) -> torch.Tensor | None:
        """The weight eq. 1 regularises: the bound conv's effective kernel (SCAN: k_u), or None if unbound."""
        if self._block is None:
            return None
        return _kernel_reader(self._block.conv2)()

    def _block_output_hook(self, block: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """After the LCD block: ‖output - x‖ / ‖x‖ per sample (the block's branch over its identity shortcut)."""
        trace = args[1] if len(args) > 1 else None
        if not isinstance(trace, Trace) or trace.probing or not self.training or block.downsample is not None:
            return  # (a projection shortcut would have to be re-run, updating its BN: not measured)
        with torch.no_grad():
            identity = args[0].detach().float().flatten(1)
            branch = output.detach().float().flatten(1) - identity
            ratio = branch.norm(dim=1) / identity.norm(dim=1).clamp_min(1e-12)
            trace.monitor("lcd/branch_to_identity", ratio.mean())
            trace.monitor("lcd/bn3_gamma_absmean", block.bn3.weight.detach().float().abs().mean())

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
    @torch.no_grad()
    def validation_monitors(self, net: nn.Module, faces: torch.Tensor) -> dict[str, float]:
        """Spec §8's locality, occlusion-concentration, θ and BN-shift values on ``faces`` ((N,3,H,W) in [-1, 1],
        a fixed batch of clean validation faces), the network in eval mode (see the module docstring)."""
        seen: list[torch.Tensor] = []
        bn_inputs: list[tuple[nn.Module, torch.Tensor]] = []
        after = []  # [index into bn_inputs at which LCD ran]
        own = {id(m) for m in self.modules()}

        def read_input(module, args):
            seen.append(args[0].detach())  # the network's dtype (SAM runs on it below)

        def mark(module, args, output):
            after.append(len(bn_inputs))

        def record_bn(module, args):
            bn_inputs.append((module, args[0].detach().float()))

        handles = [self.register_forward_pre_hook(read_input), self.register_forward_hook(mark)]
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
        clean, by_kind = seen[0], dict(zip(OCCLUSION_BANDS, seen[1:]))
        locality = occlusion_locality(clean, by_kind)
        out = {f"lcd/{k}": v for k, v in locality.items() if k.startswith("occlusion_concentration")}
        out["lcd/spatial_entropy_val"], out["lcd/top10_energy_val"] = (
            locality["spatial_entropy"],
            locality["top10_energy"],
        )
        if self.sam is not None:
            theta_clean = self.sam(clean).float()
            for kind, feat in by_kind.items():
                changed = occlusion_concentration(clean, feat)[1]
                theta = self.sam(feat).float()
                on = (theta * changed).sum(1) / changed.sum(1)
                rest = (theta * ~changed).sum(1) / (~changed).sum(1).clamp_min(1)
                out[f"sam/theta_clean_vs_occluded/{kind}"] = float((on - rest).mean())
                shift = ((theta - theta_clean) * changed).sum(1) / changed.sum(1)
                out[f"sam/theta_shift_on_changed/{kind}"] = float(shift.mean())
            for name in ("sam/theta_clean_vs_occluded", "sam/theta_shift_on_changed"):
                out[name] = sum(out[f"{name}/{kind}"] for kind in by_kind) / len(by_kind)
        if after and after[0] < len(bn_inputs):
            bn, x = bn_inputs[after[0]]
            if bn.running_mean is not None and bn.running_var is not None:
                dims = [0] + list(range(2, x.dim()))
                mean, var = x.mean(dim=dims), x.var(dim=dims, correction=0)
                run_mean, run_var = bn.running_mean.float(), bn.running_var.float()
                out["lcd/next_bn_mean_gap"] = float(((mean - run_mean).abs() / (run_var + bn.eps).sqrt()).mean())
                out["lcd/next_bn_logvar_gap"] = float(((var + bn.eps) / (run_var + bn.eps)).log().abs().mean())
        if _STAGE_POINT.match(self.at):
            gen = torch.Generator(device=faces.device).manual_seed(0)
            out["lcd/eq8_mse@0.3"] = float(eq8_mse(net, faces, 0.3, self.at, gen)["mse_unit"])
        return out


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


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics skip dropped channels: LCD's eq. 6 (spec §1.2). For channel i the mean
    and the variance run over the (n − η_i)·h·w values of the samples whose channel i is not all zero (η_i = the
    samples whose channel i was dropped); the running statistics are updated from them (the variance unbiased, as
    ``nn.BatchNorm2d``), a channel dropped in every sample is normalised with its running statistics and leaves
    them unchanged. Every value is then normalised with those statistics (a dropped channel's zeros too: eq. 6
    corrects the statistics only). Eval mode, parameters and buffers: ``nn.BatchNorm2d``'s (checkpoints and ONNX
    export are unchanged). A channel that is exactly zero over a whole map without dropout is taken as dropped."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.track_running_stats:
            return super().forward(x)
        xf = x.float()
        kept = xf.flatten(2).ne(0).any(dim=2)  # (n, c): channel i of sample t was not dropped
        weight = kept.to(xf.dtype)[:, :, None, None]
        count = kept.sum(0).to(xf.dtype) * (x.shape[2] * x.shape[3])  # (n - η_i)·h·w
        seen = count > 0
        mean = (xf * weight).sum((0, 2, 3)) / count.clamp_min(1)
        var = ((xf - mean[None, :, None, None]).pow(2) * weight).sum((0, 2, 3)) / count.clamp_min(1)
        mean = torch.where(seen, mean, self.running_mean.float())
        var = torch.where(seen, var, self.running_var.float())
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.float()
            unbiased = var * count / (count - 1).clamp_min(1)
            self.running_mean.copy_(
                torch.where(seen, torch.lerp(self.running_mean.float(), mean, factor), self.running_mean.float())
            )
            self.running_var.copy_(
                torch.where(seen, torch.lerp(self.running_var.float(), unbiased, factor), self.running_var.float())
            )
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight.float()[None, :, None, None] + self.bias.float()[None, :, None, None]
        return y.to(x.dtype)


def _mask_next_bn(trunk: nn.Module, at: str) -> None:
    """Swap the first BN of the stage after ``at`` (= "layerK") for a :class:`MaskedBatchNorm2d` holding the same
    parameters and buffers; ConfigError when no such stage exists."""
    k = int(re.fullmatch(r"layer(\d+)", at).group(1))
    stage = getattr(trunk, f"layer{k + 1}", None)
    bn = getattr(stage[0], "bn1", None) if isinstance(stage, nn.Sequential) and len(stage) else None
    if not isinstance(bn, nn.BatchNorm2d):
        raise ConfigError(
            f"model.inserts: lcd at '{at}' with masked_next_bn: there is no next stage layer{k + 1} whose first "
            "block starts with a BatchNorm2d (bn1) to apply eq. 6 to"
        )
    masked = MaskedBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    masked.load_state_dict(bn.state_dict())
    stage[0].bn1 = masked


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


# --------------------------------------------------------------------------- eq. 8 on the final feature


def _point_target(net: nn.Module, at: str, caller: str) -> nn.Module:
    """The module whose output is the feature an LCD insert at ``at`` reads: ``layerK[-1].bn3`` for
    ``layerK.branch`` (the branch before "+ identity"), the last block of stage K for ``layerK``."""
    match = _STAGE_POINT.match(at)
    if match is None:
        raise ValueError(f"{caller}: at must be layerK or layerK.branch, got {at!r}")
    block = getattr(net.trunk, match.group(1))[-1]
    return block.bn3 if match.group(2) else block


@torch.no_grad()
def point_features(net: nn.Module, batches: list[torch.Tensor], at: str = "layer3.branch") -> list[torch.Tensor]:
    """The feature at ``at`` (what an LCD insert there reads, :func:`_point_target`) for each image batch, the
    network in eval mode; any iresnet FaceNetwork, with LCD or not."""
    target = _point_target(net, at, "point_features")
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


OCCLUSION_BANDS = ("eyes", "mask")  # spec §8: "occlude a band (eyes or lower face)"


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
    statistics), averaged over the images. Works for any iresnet FaceNetwork, with LCD or not (the baseline): the
    mask is applied by a temporary hook on the feature LCD reads (``layerK[-1].bn3`` output for
    ``layerK.branch``, the last block's output for ``layerK``), so an LCD insert there sees the dropped feature
    (its SAM included). The same ``generator`` seed gives the same masks for two models of equal width.

    Returns ``mse`` (raw embeddings) and ``mse_unit`` (L2-normalised embeddings, comparable across models)."""
    target = _point_target(net, at, "eq8_mse")

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
