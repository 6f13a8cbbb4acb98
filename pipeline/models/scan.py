"""SCAN-CNN: scale attention convolution (SAC), local shortcut (LSC), response maximisation (RMO).

Source: "Scale Attention for Learning Deep Face Representation" (seed text
``../shared/seeds/scan_cnn_scale_attention.md``), Sec. 4, 6.1 and Appendices A, E.

One :class:`ScaleAttentionConv` replaces a 3×3 convolution. Per output filter ``o`` it holds the
kernel ``k[o]`` and a learnable scale ``t[o]``; with LSC also an independent kernel ``k_i[o]``:

- Gaussian (eq. 2, D = 2), sampled at integer offsets ``d ∈ {-(K-1)..K-1}²`` — 5×5 for K = 3,
  as the paper sets it (Sec. 6.1)::

      g(d; t) = 1/(2πt) · exp(-(d1² + d2²) / (2t))

  **Normalisation:** eq. 2 as written, i.e. the continuous density sampled on the grid, *not*
  renormalised to sum 1 (Sec. 4.1: "g is an instance of Eq. 2 in 2D form"). At t = 1 the 5×5
  samples sum to 0.982; for small t the prefactor 1/(2πt) cancels the normalised-derivative
  factor t (γm = 1), so ``k_s → k/(2π)`` as t → 0: the SAC "reduces to the plain convolution",
  exactly the degeneration the paper describes for RMO without LSC (Sec. 6.2, Fig. 3c).
  ``gaussian_sum1=True`` renormalises the 5×5 samples to sum 1 instead (an option, not the paper).
- Scale-attended kernel (eq. 4)::   k_s = t^γm · (k ⊛ g(t))
  **Edge handling:** ``k ⊛ g`` is the full 2-D convolution (7×7 for K = 3) centre-cropped to
  K×K; this is the same thing as a 'same'-size convolution of k (zero padded) with g, i.e.
  ``scipy.signal.convolve2d(k, g, mode="same")``. A 5×5 g is exactly large enough for this: two
  taps of a 3×3 kernel are at most 2 apart, so every entry of g can reach the crop.
  Computed through the separability of eq. 2: ``k_s = t^γm · c(t) · G k Gᵀ`` with the K×K
  Toeplitz matrix ``G[p, q] = exp(-(p-q)² / (2t))`` and ``c(t) = 1/(2πt)``.
- Local shortcut (eq. 8)::   f_out = (k_s + k_i) ⊛ f_in = k_u ⊛ f_in
- Response maximisation (eq. 6), per SAC layer and per sample n, with ``‖·‖₂`` the L2 norm of
  the layer's whole output map f_out[n] (C×H×W) — the norm of "f_out" in eq. 6, H and W its
  height and width — averaged over the mini-batch::

      L_scale = mean_n exp(-λ ‖f_out[n]‖₂ / (H·W))

  Each SAC layer reports ``rmo_weight · L_scale`` as the aux loss ``rmo`` of the network's forward call
  (summed over layers, eq. 7), so the term follows the network into every training procedure.

**What eq. 2 + eq. 4 imply at γm = 1** (worth knowing before reading Table 1). With the Gaussian as written,
``k_s = t · (1/(2πt)) · G k Gᵀ = (1/2π) · G k Gᵀ``: the normalised-derivative factor t cancels the Gaussian's
prefactor exactly, so t acts only through the *shape* of G (its width), never through the kernel's gain. The
map k ↦ k_s is linear with singular values ``σ_i(G) σ_j(G) / 2π``; at the initial t = 1 G's are 1.928, 0.865,
0.207, so the operator's condition number is ``cond(G)² = 86.6`` and its dominant direction is the all-positive
"DC" pattern (top singular vector ∝ [0.27 0.35 0.27; 0.35 0.46 0.35; 0.27 0.35 0.27]). Gradient steps on k
therefore grow the DC share of the effective kernel ~87× faster than its zero-sum (edge) part: SAC *without* LSC
reparametrises every 3×3 conv as an ill-conditioned low-pass, and in short runs the network settles as
"blur + 1×1": in ``configs/ablations/scan_table1.yaml`` (RESULTS.md) 90 % of the folded 3×3 kernels' energy is
DC for SAC and 94 % for SAC + RMO, against 29 % for plain, and both lose ~23 points; LSC's independent k_i
restores a well-conditioned path (SAC + LSC: 38 %, within a point of plain). ``tests/test_scan.py::test_t1_operator_conditioning`` checks the number
against ``numpy.kron(G, G)``. Two switches for readers of the paper: ``t_init`` (the paper: 1) and ``rmo_on``
(``ku``: eq. 6 on the layer's output ``k_u ⊛ f_in``, as written; ``ks``: on the scale-attended branch
``k_s ⊛ f_in`` alone, Fig. 8's reading, at the price of one more convolution per layer in training).

**Keeping t positive.** ``t = t_min + softplus(ρ)`` with ``t_min = 1e-3``; "t initialised as 1"
(Sec. 6.1) maps to ``ρ₀ = softplus⁻¹(1 - t_min) = log(expm1(1 - t_min))`` ≈ 0.5397. Softplus
rather than exp: for t ≳ 1 softplus is nearly the identity (dt/dρ = sigmoid(ρ) → 1), so t moves
like the paper's unconstrained parameter, while exp would scale every step by t itself (and slow
the collapse toward 0 that the ablation is about). The floor keeps ``exp(-d²/(2t))``'s gradient
``d²/(2t²)·exp(…)`` finite (for t → 0 in float32 it becomes inf·0 = NaN).

**Efficient RMO (Appendix E, Fig. 8).** L_scale's gradient reaches only the layer's own
parameters (k, t, k_i): its input is detached for this term, so no gradient of L_scale flows into
earlier layers. ``efficient_rmo=True`` does this at no extra convolution: one autograd Function
computes ``y = conv(x, k_u)`` and L_scale from the same y; in backward, the input gradient uses the
recognition gradient only and the weight gradient uses recognition + RMO gradients (convolution
is linear in its output gradient). ``efficient_rmo=False`` is the naive form: L_scale on y with
plain autograd, so its gradient flows through all earlier layers too.

**Configuration.** ``model.conv: {kind: scan, sac, lsc, rmo, rmo_weight, ...}`` (:class:`ScanConvOptions`);
with sac, lsc and rmo all off the convs are plain ``nn.Conv2d`` (the network *is* the plain IResNet).
Monitoring (:class:`ScanConvKind`): ``scan/t_mean|t_min|t_max|t_std|t_frac_below_0.1`` (``monitor/…``),
histograms ``scan/t/<layer>`` and ``t/all``, ``t_density.png`` (Fig. 3 style) in every checkpoint.

**Which convolutions become SAC:** every 3×3 convolution of the IResNet (the stem and both convs
of every residual block), i.e. every convolution built through iresnet's ``conv3x3`` hook. The
1×1 convolutions of the ``downsample`` shortcuts (and SE's 1×1 fc convs) stay plain: for a 1×1
kernel a K×K-cropped Gaussian is a single number, so scale has no meaning there.

**Inference (eq. 5, 8).** :func:`fold` replaces every SAC by one ``nn.Conv2d`` holding k_u under
the same module name, so a folded SCAN-IResNet has exactly the plain IResNet's parameters and its
``state_dict`` loads into :func:`pipeline.models.iresnet.build_iresnet` with ``strict=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import registry
from pipeline.config import Invalid, PartOptions
from pipeline.models.iresnet import build_iresnet
from pipeline.models.network import ConvKind, Reporter, Trace

__all__ = [
    "ScaleAttentionConv",
    "ScanConvOptions",
    "ScanConvKind",
    "fold",
    "sac_layers",
    "rmo_per_sample",
    "build_scan_iresnet",
    "plot_t_density",
]


def _accurate(y: torch.Tensor) -> torch.Tensor:
    """y in at least float32 (the norm of a half-precision map is accumulated in float32)."""
    return y if y.dtype == torch.float64 else y.float()


def rmo_per_sample(y: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 6 per sample: exp(-λ ‖y[n]‖₂ / (H·W)) for y of shape (N, C, H, W) → (N,), ≥ float32."""
    hw = y.shape[-2] * y.shape[-1]
    norm = torch.linalg.vector_norm(_accurate(y).flatten(1), dim=1)
    return torch.exp(-lam * norm / hw)


class _ConvWithRMO(torch.autograd.Function):
    """y = conv2d(x, w) and eq. 6's per-sample L from the same y; L's gradient reaches w only."""

    @staticmethod
    def forward(ctx, x, w, stride, padding, lam):
        y = F.conv2d(x, w, None, stride, padding)
        hw = y.shape[-2] * y.shape[-1]
        norm = torch.linalg.vector_norm(_accurate(y).flatten(1), dim=1)
        loss = torch.exp(-lam * norm / hw)
        # Save what the convolution actually consumed (autocast may have cast x, w to y's dtype).
        ctx.save_for_backward(x.to(y.dtype), w.to(y.dtype), y, norm, loss)
        ctx.conf = (stride, padding, lam, hw, x.dtype, w.dtype)
        ctx.set_materialize_grads(False)
        return y, loss

    @staticmethod
    def backward(ctx, grad_y, grad_loss):
        x, w, y, norm, loss = ctx.saved_tensors
        stride, padding, lam, hw, x_dtype, w_dtype = ctx.conf
        conv_args = (None, stride, padding, (1, 1), False, (0, 0), 1)
        grad_x = grad_w = None
        if grad_y is not None:
            grad_y = grad_y.to(y.dtype)
        if ctx.needs_input_grad[0] and grad_y is not None:
            # input gradient: recognition path only (the RMO term sees a detached input)
            grad_x = torch.ops.aten.convolution_backward(grad_y, x, w, *conv_args, (True, False, False))[0].to(x_dtype)
        if ctx.needs_input_grad[1]:
            g = grad_y
            if grad_loss is not None:
                # d/dy exp(-λ‖y‖/HW) = -λ/HW · L · y/‖y‖ (per sample; 0 where ‖y‖ = 0)
                coef = grad_loss.to(loss.dtype) * loss * (-lam / hw) / norm.clamp_min(1e-12)
                g_rmo = coef.to(y.dtype).view(-1, *([1] * (y.dim() - 1))) * y
                g = g_rmo if g is None else g + g_rmo
            if g is not None:
                grad_w = torch.ops.aten.convolution_backward(g, x, w, *conv_args, (False, True, False))[1].to(w_dtype)
        return grad_x, grad_w, None, None, None


def _inv_softplus(v: float) -> float:
    return math.log(math.expm1(v))


class ScaleAttentionConv(Reporter):
    """A K×K convolution with per-filter scale attention (eq. 4), LSC (eq. 8) and RMO (eq. 6).

    Parameters (names kept stable for checkpoints): ``weight`` = k (out, in, K, K);
    ``scale_raw`` = ρ (out,) with t = t_min + softplus(ρ) (only if ``sac``); ``weight_i`` = k_i
    (only if ``lsc``). ``sac=False`` drops t and the Gaussian (k_s = k, a plain kernel), so the
    three switches of Table 1 are independent. A training-mode forward with ``rmo`` and a trace reports
    ``rmo_weight · L_scale`` (batch mean, eq. 6) as the trace's aux loss ``rmo``.
    """

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        *,
        sac: bool = True,
        lsc: bool = True,
        rmo: bool = True,
        gamma_m: float = 1.0,
        rmo_lambda: float = 1.0,
        efficient_rmo: bool = True,
        t_min: float = 1e-3,
        gaussian_sum1: bool = False,
        init_std: float = 0.1,
        rmo_weight: float = 1.0,
        t_init: float = 1.0,
        rmo_on: str = "ku",
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"ScaleAttentionConv: kernel_size must be odd, got {kernel_size}")
        if not 0.0 < t_min < 1.0:
            raise ValueError(f"ScaleAttentionConv: t_min must be in (0, 1), got {t_min}")
        if t_init <= t_min:
            raise ValueError(f"ScaleAttentionConv: t_init must be > t_min ({t_min}), got {t_init}")
        if rmo_on not in ("ku", "ks"):
            raise ValueError(f"ScaleAttentionConv: rmo_on must be 'ku' or 'ks', got {rmo_on!r}")
        self.in_planes, self.out_planes = in_planes, out_planes
        self.kernel_size, self.stride = kernel_size, stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.sac, self.lsc, self.rmo = sac, lsc, rmo
        self.gamma_m, self.rmo_lambda, self.efficient_rmo = gamma_m, rmo_lambda, efficient_rmo
        self.rmo_weight = rmo_weight
        # RMO on k_s alone only differs from k_u when LSC adds k_i (without LSC, k_u = k_s)
        self.rmo_on = rmo_on if (lsc and sac) else "ku"
        self.t_min, self.gaussian_sum1 = t_min, gaussian_sum1
        shape = (out_planes, in_planes, kernel_size, kernel_size)
        # arcface_torch initialises every conv weight with N(0, 0.1); k and k_i follow it.
        self.weight = nn.Parameter(torch.randn(shape) * init_std)
        if sac:
            self.scale_raw = nn.Parameter(torch.full((out_planes,), _inv_softplus(t_init - t_min)))
        if lsc:
            self.weight_i = nn.Parameter(torch.randn(shape) * init_std)
        idx = torch.arange(kernel_size, dtype=torch.float64)
        self.register_buffer("_d2", (idx[:, None] - idx[None, :]) ** 2, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"{self.in_planes}, {self.out_planes}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, sac={self.sac}, lsc={self.lsc}, rmo={self.rmo}, gamma_m={self.gamma_m}, "
            f"rmo_lambda={self.rmo_lambda}, efficient_rmo={self.efficient_rmo}, rmo_on={self.rmo_on}"
        )

    # ------------------------------------------------------------------ kernels
    @property
    def t(self) -> torch.Tensor:
        """Scale per output filter, (out,): t = t_min + softplus(ρ) > 0."""
        if not self.sac:
            raise AttributeError("ScaleAttentionConv built with sac=False has no scale t")
        return self.t_min + F.softplus(self.scale_raw)

    def gaussian(self) -> torch.Tensor:
        """g(t) of eq. 2 (D = 2) per output filter on the (2K-1)×(2K-1) offset grid: (out, 2K-1, 2K-1)."""
        t = self.t.view(-1, 1, 1)
        d = torch.arange(-(self.kernel_size - 1), self.kernel_size, dtype=t.dtype, device=t.device)
        r2 = d.view(1, -1, 1) ** 2 + d.view(1, 1, -1) ** 2
        g = torch.exp(-r2 / (2 * t))
        if self.gaussian_sum1:
            return g / g.sum(dim=(1, 2), keepdim=True)
        return g / (2 * math.pi * t)

    def scaled_kernel(self) -> torch.Tensor:
        """k_s = t^γm · (k ⊛ g(t)) (eq. 4), 'same'-size (centre-cropped) convolution, (out, in, K, K)."""
        if not self.sac:
            return self.weight
        t = self.t
        d2 = self._d2.to(t.dtype)
        toeplitz = torch.exp(-d2.unsqueeze(0) / (2 * t.view(-1, 1, 1)))  # G[o, p, q] (eq. 2, 1-D factor)
        if self.gaussian_sum1:
            d = torch.arange(-(self.kernel_size - 1), self.kernel_size, dtype=t.dtype, device=t.device)
            norm = torch.exp(-(d.view(1, -1) ** 2) / (2 * t.view(-1, 1))).sum(dim=1) ** 2
        else:
            norm = 2 * math.pi * t
        coef = t.pow(self.gamma_m) / norm  # t^γm · c(t)
        ks = torch.einsum("opq,oiqs,ors->oipr", toeplitz, self.weight, toeplitz)
        return ks * coef.view(-1, 1, 1, 1)

    def kernel(self) -> torch.Tensor:
        """k_u = k_s + k_i (eq. 8; k_s alone without LSC), the kernel actually applied."""
        ks = self.scaled_kernel()
        return ks + self.weight_i if self.lsc else ks

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        if self.rmo_on == "ks" and self.rmo and trace is not None and self.training and torch.is_grad_enabled():
            ks = self.scaled_kernel()
            y = F.conv2d(x, ks + self.weight_i, None, self.stride, self.padding)
            # eq. 6 on the k_s branch's response alone; efficient RMO: its gradient reaches this layer only
            xs = x.detach() if self.efficient_rmo else x
            loss = rmo_per_sample(F.conv2d(xs, ks, None, self.stride, self.padding), self.rmo_lambda)
            trace.add_loss("rmo", self.rmo_weight * loss.mean())
            return y
        w = self.kernel()
        if self.rmo and trace is not None and self.training and torch.is_grad_enabled():
            if self.efficient_rmo:
                y, loss = _ConvWithRMO.apply(x, w, (self.stride,) * 2, (self.padding,) * 2, float(self.rmo_lambda))
            else:
                y = F.conv2d(x, w, None, self.stride, self.padding)
                loss = rmo_per_sample(y, self.rmo_lambda)
            trace.add_loss("rmo", self.rmo_weight * loss.mean())  # eq. 7: Σ over layers, weighted
            return y
        return F.conv2d(x, w, None, self.stride, self.padding)

    @torch.no_grad()
    def to_conv(self) -> nn.Conv2d:
        """One plain ``nn.Conv2d`` (no bias) with weight k_u: the inference form (eq. 5, 8)."""
        conv = nn.Conv2d(self.in_planes, self.out_planes, self.kernel_size, self.stride, self.padding, bias=False)
        conv = conv.to(device=self.weight.device, dtype=self.weight.dtype)
        conv.weight.copy_(self.kernel())
        return conv


def sac_layers(model: nn.Module) -> list[tuple[str, ScaleAttentionConv]]:
    """(qualified name, module) of every ScaleAttentionConv in ``model``, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ScaleAttentionConv)]


def fold(model: nn.Module) -> nn.Module:
    """Replace every ScaleAttentionConv in ``model`` (in place) by its plain ``nn.Conv2d`` (k_u).

    Returns ``model``. The module names are unchanged, so a folded SCAN-IResNet's ``state_dict``
    is a plain IResNet's. Deep-copy first to keep the trainable form.
    """
    if isinstance(model, ScaleAttentionConv):
        return model.to_conv()
    for name, child in list(model.named_children()):
        if isinstance(child, ScaleAttentionConv):
            setattr(model, name, child.to_conv())
        else:
            fold(child)
    return model


# ---------------------------------------------------------------------- the conv kind


@dataclass
class ScanConvOptions(PartOptions):
    """``model.conv: {kind: scan, ...}`` (Sec. 4, 6.1; Table 1 switches)."""

    RANGES = {
        "rmo_weight": "[0, inf)",
        "rmo_lambda": "(0, inf)",
        "gamma_m": "[0, inf)",
        "t_min": "(0, 1)",
        "t_init": "(0, inf)",
    }  # field → valid interval (pipeline.config.check_ranges)

    sac: bool = True  # scale attention conv (eq. 4); false: plain kernel k
    lsc: bool = True  # local shortcut connection, independent k_i (eq. 8)
    rmo: bool = True  # response-maximisation objective (eq. 6)
    rmo_weight: float = 1.0  # weight of Σ L_scale in the total loss (eq. 7 uses 1)
    rmo_lambda: float = 1.0  # λ of eq. 6
    gamma_m: float = 1.0  # γ·m, exponent of the normalised-derivative factor t^γm (eq. 4)
    efficient_rmo: bool = True  # Appendix E: RMO gradient reaches only the layer's own parameters
    t_min: float = 1e-3  # t = t_min + softplus(ρ), ρ initialised so that t = t_init
    t_init: float = 1.0  # initial scale t of every filter (Sec. 6.1: 1)
    rmo_on: str = "ku"  # eq. 6 on k_u ⊛ f_in (as written) | "ks": on the k_s branch alone (Fig. 8's reading)
    gaussian_sum1: bool = False  # renormalise the 5×5 Gaussian to sum 1 (the paper: eq. 2 as is)
    t_density_png: bool = True  # write t_density.png at every checkpoint

    def validate(self):
        if self.t_init <= self.t_min:
            raise Invalid("t_init", f"must be > t_min ({self.t_min}), got {self.t_init}")
        if self.rmo_on not in ("ku", "ks"):
            raise Invalid("rmo_on", f"must be 'ku' or 'ks', got {self.rmo_on!r}")


class ScanConvKind(ConvKind):
    """Every 3×3 conv a ScaleAttentionConv (or plain when sac, lsc and rmo are all off)."""

    def __init__(self, opts: ScanConvOptions):
        self.opts = opts

    def conv3x3(self, in_planes: int, out_planes: int, stride: int = 1) -> nn.Module:
        o = self.opts
        if not (o.sac or o.lsc or o.rmo):
            return nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        return ScaleAttentionConv(
            in_planes,
            out_planes,
            3,
            stride,
            1,
            sac=o.sac,
            lsc=o.lsc,
            rmo=o.rmo,
            gamma_m=o.gamma_m,
            rmo_lambda=o.rmo_lambda,
            efficient_rmo=o.efficient_rmo,
            t_min=o.t_min,
            gaussian_sum1=o.gaussian_sum1,
            rmo_weight=o.rmo_weight,
            t_init=o.t_init,
            rmo_on=o.rmo_on,
        )

    @staticmethod
    def t_per_layer(net: nn.Module) -> dict[str, torch.Tensor]:
        """Detached t (scale per output filter) of every SAC layer, keyed by module path."""
        return {name: layer.t.detach() for name, layer in sac_layers(net) if layer.sac}

    def monitors(self, net: nn.Module) -> dict[str, torch.Tensor]:
        per_layer = self.t_per_layer(net)
        if not per_layer:
            return {}
        t = torch.cat(list(per_layer.values())).float()
        return {
            "scan/t_mean": t.mean(),
            "scan/t_min": t.min(),
            "scan/t_max": t.max(),
            "scan/t_std": t.std(),
            "scan/t_frac_below_0.1": (t < 0.1).float().mean(),
        }

    def histograms(self, net: nn.Module) -> dict[str, torch.Tensor]:
        per_layer = self.t_per_layer(net)
        out = {f"scan/t/{name}": t for name, t in per_layer.items()}
        if per_layer:
            out["t/all"] = torch.cat(list(per_layer.values()))
        return out

    def no_weight_decay(self, net: nn.Module) -> set[str]:
        """The scale parameters ρ (t) of every SAC layer: "updated without weight decay" (Sec. 6.1)."""
        return {name for name, _ in net.named_parameters() if name.endswith(".scale_raw")}

    def on_checkpoint(self, net: nn.Module, out_dir: Path, step: int) -> None:
        per_layer = self.t_per_layer(net)
        if per_layer and self.opts.t_density_png:
            plot_t_density(
                torch.cat(list(per_layer.values())).float().cpu().numpy(),
                Path(out_dir) / "t_density.png",
                title=f"SCAN t density, step {step} ({len(per_layer)} SAC layers)",
            )

    def fold(self, net: nn.Module) -> int:
        n = len(sac_layers(net))
        fold(net)
        return n


@registry.register("conv", "scan", ScanConvOptions)
def build_scan_conv(opts: ScanConvOptions) -> ScanConvKind:
    return ScanConvKind(opts)


def build_scan_iresnet(
    depth: int,
    width: float = 1.0,
    embedding_size: int = 512,
    dropout: float = 0.0,
    input_size: int = 112,
    se: bool = False,
    **sac_options,
):
    """SCAN-IResNet-``depth`` (a FaceNetwork): :func:`build_iresnet` with ``model.conv: {kind: scan, ...}``."""
    return build_iresnet(
        depth,
        width=width,
        embedding_size=embedding_size,
        dropout=dropout,
        input_size=input_size,
        se=se,
        conv={"kind": "scan", **sac_options},
    )


def plot_t_density(t, path: Path, title: str = "") -> Path:
    """Density of the learnt scales t (Fig. 3 style): normalised histogram + Gaussian KDE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy.stats import gaussian_kde

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.hist(t, bins=80, density=True, color="#9ecae1", edgecolor="none", label="histogram")
    if np.ptp(t) > 1e-6 and len(t) > 2:
        xs = np.linspace(min(0.0, t.min()), t.max() * 1.05 + 1e-3, 400)
        ax.plot(xs, gaussian_kde(t)(xs), color="#08519c", lw=1.5, label="KDE")
    ax.set_xlabel("t")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
