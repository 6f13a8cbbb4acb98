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
restores a well-conditioned path (SAC + LSC: 38 %, within a point of plain). ``tests/unit/test_scan.py::test_t1_operator_conditioning`` checks the number
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
computes ``y = conv(x, k_u)`` and ``‖y[n]‖`` from the same y; in backward, the input gradient uses the
recognition gradient only and the weight gradient uses recognition + RMO gradients (convolution
is linear in its output gradient). ``efficient_rmo=False`` is the naive form: the norm of y with plain
autograd, so its gradient flows through all earlier layers too.

**One training step's host work (issue 21).** A GPU step of a deep SCAN network is bound by the host's kernel
launches, not by arithmetic. In a training forward the conv kind builds every layer's kernel before the trunk runs
(:class:`~pipeline.models.scan_kind.ScanConvKind`, one batched :func:`sac_kernels` call per shape group) and turns all
layers' norms into eq. 6-7's loss at once after it; each layer reads its kernels from the :class:`ScanStep` the kind
leaves in the trace. Outside training each layer builds its own kernel with the same function.

**Configuration.** ``model.conv: {kind: scan, sac, lsc, rmo, rmo_weight, ...}``
(:class:`~pipeline.models.scan_kind.ScanConvOptions`); with sac, lsc and rmo all off the convs are plain
``nn.Conv2d`` (the network *is* the plain IResNet). The conv kind, its monitors (``scan/t_*``, t histograms,
``t_density.png``) and SCAN's ablation diagnostic (``kernel_dc_share``) are in :mod:`pipeline.models.scan_kind`.

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

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.iresnet import build_iresnet
from pipeline.models.network import Reporter, Trace

__all__ = [
    "ScaleAttentionConv",
    "ScanStep",
    "fold",
    "sac_kernels",
    "sac_layers",
    "rmo_from_norms",
    "rmo_per_sample",
    "build_scan_iresnet",
]


def _norm_dtype(y: torch.Tensor) -> torch.dtype:
    """The dtype a map's norm is accumulated in: float32 for half precision and float32, float64 for float64."""
    return torch.float64 if y.dtype == torch.float64 else torch.float32


def sample_norms(y: torch.Tensor) -> torch.Tensor:
    """‖y[n]‖₂ over each sample's whole (C, H, W) map, (N,), accumulated in ≥ float32 without a float32 copy of y."""
    return torch.linalg.vector_norm(y.flatten(1), dim=1, dtype=_norm_dtype(y))


def rmo_from_norms(norms: torch.Tensor, neg_lambda_over_area) -> torch.Tensor:
    """Eq. 6 from the maps' norms: exp(-λ ‖y[n]‖₂ / (H·W)), with ``neg_lambda_over_area`` = -λ/(H·W) (a float, or a
    (layers, 1) tensor for ``norms`` of shape (layers, N)). The one place eq. 6 is written."""
    return torch.exp(norms * neg_lambda_over_area)


def rmo_per_sample(y: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 6 per sample: exp(-λ ‖y[n]‖₂ / (H·W)) for y of shape (N, C, H, W) → (N,), ≥ float32."""
    return rmo_from_norms(sample_norms(y), -lam / (y.shape[-2] * y.shape[-1]))


class _ConvWithNorm(torch.autograd.Function):
    """y = conv2d(x, w) and ‖y[n]‖₂ (eq. 6's norm) from the same y; the norm's gradient reaches w only.

    Appendix E's efficient RMO: the input gradient is the recognition gradient alone, the weight gradient takes
    both (a convolution is linear in its output gradient, so one weight-gradient convolution of
    ``grad_y + (∂L/∂‖y‖ / ‖y‖) · y`` serves both terms).
    """

    @staticmethod
    def forward(ctx, x, w, stride, padding):
        y = F.conv2d(x, w, None, stride, padding)
        norm = sample_norms(y)
        # Save what the convolution actually consumed (autocast may have cast x, w to y's dtype).
        ctx.save_for_backward(x.to(y.dtype), w.to(y.dtype), y, norm)
        ctx.conf = (stride, padding, x.dtype, w.dtype)
        ctx.set_materialize_grads(False)
        return y, norm

    @staticmethod
    def backward(ctx, grad_y, grad_norm):
        x, w, y, norm = ctx.saved_tensors
        stride, padding, x_dtype, w_dtype = ctx.conf
        conv_args = (None, stride, padding, (1, 1), False, (0, 0), 1)
        grad_x = grad_w = None
        if grad_y is not None:
            grad_y = grad_y.to(y.dtype)
        if ctx.needs_input_grad[0] and grad_y is not None:
            # input gradient: recognition path only (the RMO term sees a detached input)
            grad_x = torch.ops.aten.convolution_backward(grad_y, x, w, *conv_args, (True, False, False))[0].to(x_dtype)
        if ctx.needs_input_grad[1]:
            g = grad_y
            if grad_norm is not None:
                # d‖y[n]‖/dy[n] = y[n] / ‖y[n]‖ (0 where ‖y[n]‖ = 0)
                coef = (grad_norm / norm.clamp_min(1e-12)).to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
                g = coef * y if g is None else torch.addcmul(g, coef, y)
            if g is not None:
                grad_w = torch.ops.aten.convolution_backward(g, x, w, *conv_args, (False, True, False))[1].to(w_dtype)
        return grad_x, grad_w, None, None


def sac_kernels(
    weight: torch.Tensor,
    scale_raw: torch.Tensor | None,
    weight_i: torch.Tensor | None,
    *,
    t_min: float,
    gamma_m: float,
    gaussian_sum1: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_u, k_s) of F filters at once: ``weight``/``weight_i`` (F, I, K, K), ``scale_raw`` ρ (F,) → (F, I, K, K) each.

    Eq. 4 as one batched matrix product: with the K×K Toeplitz factor ``G[p, q] = exp(-(p-q)²/(2t))`` of the
    separable Gaussian (eq. 2), ``k_s = t^γm c(t) · G k Gᵀ``, i.e. each K×K kernel flattened to K² values is
    multiplied by ``M = t^γm c(t) · kron(G, G)`` (K²×K²), one M per filter. ``scale_raw=None``: no SAC (k_s = k);
    ``weight_i=None``: no LSC (k_u = k_s, eq. 8). One call builds every kernel of a shape group (issue 21).
    """
    if scale_raw is None:
        ks = weight
    else:
        f, i, k, _ = weight.shape
        t = t_min + F.softplus(scale_raw)  # (F,)
        idx = torch.arange(k, dtype=t.dtype, device=t.device)
        d2 = (idx.view(-1, 1) - idx.view(1, -1)) ** 2  # (K, K), constant
        toeplitz = torch.exp(d2 * (-0.5 / t).view(-1, 1, 1))  # G[f, p, q]
        if gaussian_sum1:  # renormalise the (2K-1)² samples to sum 1: c(t) = 1 / (Σ_d exp(-d²/(2t)))²
            d = torch.arange(-(k - 1), k, dtype=t.dtype, device=t.device)
            coef = t.pow(gamma_m) / torch.exp((d * d).view(1, -1) * (-0.5 / t).view(-1, 1)).sum(dim=1).square()
        elif gamma_m == 1.0:  # t^γm / (2πt) = 1/(2π): t acts through G's shape alone (see the module docstring)
            coef = None
        else:
            coef = t.pow(gamma_m - 1.0) * (1.0 / (2 * math.pi))
        # kron(G, G)[f, (p, r), (q, s)] = G[f, p, q] · G[f, r, s]
        kron = (toeplitz.view(f, k, 1, k, 1) * toeplitz.view(f, 1, k, 1, k)).reshape(f, k * k, k * k)
        kron = kron * (1.0 / (2 * math.pi)) if coef is None else kron * coef.view(-1, 1, 1)
        ks = torch.bmm(weight.reshape(f, i, k * k), kron.transpose(1, 2)).view(f, i, k, k)
    return (ks if weight_i is None else ks + weight_i), ks


class ScanStep:
    """One training forward's SCAN state: every layer's kernels (built per shape group) and the RMO norms. The conv
    kind leaves it in the trace (``trace.state[SCAN_STATE]``) before the trunk runs and reads the norms after it."""

    def __init__(self) -> None:
        self.kernels: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.norms: list[torch.Tensor] = []  # (N,) per RMO layer, in call order
        self.areas: list[int] = []  # H·W of each layer's output map


SCAN_STATE = "scan"  # the key of the SCAN state in a Trace's per-call state


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

    def kernels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_u, k_s) of this layer (:func:`sac_kernels`), each (out, in, K, K)."""
        return sac_kernels(
            self.weight,
            self.scale_raw if self.sac else None,
            self.weight_i if self.lsc else None,
            t_min=self.t_min,
            gamma_m=self.gamma_m,
            gaussian_sum1=self.gaussian_sum1,
        )

    def scaled_kernel(self) -> torch.Tensor:
        """k_s = t^γm · (k ⊛ g(t)) (eq. 4), 'same'-size (centre-cropped) convolution, (out, in, K, K)."""
        return self.kernels()[1]

    def kernel(self) -> torch.Tensor:
        """k_u = k_s + k_i (eq. 8; k_s alone without LSC), the kernel actually applied."""
        return self.kernels()[0]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        state = trace.state.get(SCAN_STATE) if trace is not None else None
        ku, ks = state.kernels[self] if state is not None and self in state.kernels else self.kernels()
        if not (self.rmo and trace is not None and self.training and torch.is_grad_enabled()):
            return F.conv2d(x, ku, None, self.stride, self.padding)
        if self.rmo_on == "ks":
            y = F.conv2d(x, ku, None, self.stride, self.padding)
            # eq. 6 on the k_s branch's response alone; efficient RMO: its gradient reaches this layer only
            xs = x.detach() if self.efficient_rmo else x
            norm = sample_norms(F.conv2d(xs, ks, None, self.stride, self.padding))
        elif self.efficient_rmo:
            y, norm = _ConvWithNorm.apply(x, ku, (self.stride,) * 2, (self.padding,) * 2)
        else:
            y = F.conv2d(x, ku, None, self.stride, self.padding)
            norm = sample_norms(y)
        area = y.shape[-2] * y.shape[-1]
        if state is not None:  # the conv kind turns every layer's norms into eq. 6-7's loss at once
            state.norms.append(norm)
            state.areas.append(area)
        else:  # a layer used outside a SCAN network: eq. 6 here, eq. 7's sum by the trace
            trace.add_loss("rmo", self.rmo_weight * rmo_from_norms(norm, -self.rmo_lambda / area).mean())
        return y

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
