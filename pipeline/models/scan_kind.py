"""SCAN-CNN's conv kind ``scan``: every 3×3 conv of the trunk a :class:`~pipeline.models.scan.ScaleAttentionConv`
(the layer, its kernels, RMO and folding: :mod:`pipeline.models.scan`, whose docstring has the paper's equations),
the network-wide work of one training forward, the t monitors, and SCAN's ablation diagnostic ``kernel_dc_share``.

**One training step's host work (issue 21).** A GPU step of a deep SCAN network is bound by the host's kernel
launches, not by arithmetic. In a training forward the conv kind builds every layer's kernel before the trunk
runs, one batched :func:`sac_kernels` call per (out, in) shape group (:meth:`ScanConvKind.begin`: 8 groups for an
r100, each ``k_s = k · Mᵀ`` with ``M = t^γm c(t) kron(G, G)`` one bmm), and turns all layers' norms into eq. 6-7's
loss at once after it (:meth:`ScanConvKind.end`); the t statistics are computed at log steps only. An r100 step
(forward, backward, SGD) dispatches 1.8× the plain network's launching ops, 8.0× before
(``tests/integration/test_scan.py::test_scan_step_launches_at_most_twice_plain``). Outside training each layer builds its
own kernel with the same function.

**Configuration.** ``model.conv: {kind: scan, sac, lsc, rmo, rmo_weight, ...}`` (:class:`ScanConvOptions`);
with sac, lsc and rmo all off the convs are plain ``nn.Conv2d`` (the network *is* the plain IResNet).
Monitoring (:class:`ScanConvKind`): ``scan/t_mean|t_min|t_max|t_std|t_frac_below_0.1`` (``monitor/…``, at log steps),
histograms ``scan/t/<layer>`` and ``t/all``, ``t_density.png`` (Fig. 3 style) in every checkpoint.

**Diagnostic** (``diagnostics: [kernel_dc_share]`` of an ablation spec): the mean share of DC energy in the folded
3×3 kernels (:func:`dc_share`), the "blur + 1×1" collapse of SAC without LSC (:mod:`pipeline.models.scan`'s docstring).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline import registry
from pipeline.config import Invalid, PartOptions
from pipeline.models.network import ConvKind, Trace
from pipeline.models.scan import SCAN_STATE, ScaleAttentionConv, ScanStep, fold, rmo_from_norms, sac_kernels, sac_layers
from pipeline.registry import DiagnosticContext, register_diagnostic

__all__ = ["ScanConvOptions", "ScanConvKind", "dc_share", "kernel_dc_share", "plot_t_density"]


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
        self._cache: dict = {}

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

    # ------------------------------------------------------------------ one training forward (issue 21 item 3)
    def begin(self, net: nn.Module, trace: Trace) -> None:
        """Build every layer's kernels before the trunk runs: one :func:`sac_kernels` call per (out, in) shape
        group (8 groups for an r100, instead of 99 per-layer constructions), each layer's k_u a contiguous slice."""
        state = ScanStep()
        for layers in self._groups(net):
            first = layers[0]
            out, in_, k = first.out_planes, first.in_planes, first.kernel_size
            stack = torch.stack if len(layers) > 1 else (lambda ts: ts[0].unsqueeze(0))
            weight = stack([m.weight for m in layers]).view(-1, in_, k, k)
            scale_raw = stack([m.scale_raw for m in layers]).view(-1) if first.sac else None
            weight_i = stack([m.weight_i for m in layers]).view(-1, in_, k, k) if first.lsc else None
            ku, ks = sac_kernels(
                weight, scale_raw, weight_i, t_min=first.t_min, gamma_m=first.gamma_m, gaussian_sum1=first.gaussian_sum1
            )
            for m, u, s_ in zip(layers, ku.view(len(layers), out, in_, k, k), ks.view(len(layers), out, in_, k, k)):
                state.kernels[m] = (u, s_)
        trace.state[SCAN_STATE] = state

    def end(self, net: nn.Module, trace: Trace) -> None:
        """Eq. 6 for every RMO layer at once and eq. 7's weighted sum: ``rmo_weight · Σ_l mean_n exp(-λ‖y‖/HW)``."""
        state = trace.state.pop(SCAN_STATE, None)
        if state is None or not state.norms:
            return
        norms = torch.stack(state.norms)  # (layers, N)
        scale = self._neg_lambda_over_area(tuple(state.areas), norms.device, norms.dtype)  # (layers, 1)
        trace.add_loss("rmo", rmo_from_norms(norms, scale).mean(dim=1).sum() * self.opts.rmo_weight)

    def _groups(self, net: nn.Module) -> list[list[ScaleAttentionConv]]:
        """The network's SAC layers grouped by kernel shape and dtype (cached per network object)."""
        cached = self._cache.get("groups")
        if cached is not None and cached[0]() is net:
            return cached[1]
        groups: dict[tuple, list[ScaleAttentionConv]] = {}
        for _, m in sac_layers(net):
            key = (m.out_planes, m.in_planes, m.kernel_size, m.sac, m.lsc, m.weight.dtype, m.weight.device)
            groups.setdefault(key, []).append(m)
        result = list(groups.values())
        self._cache["groups"] = (weakref.ref(net), result)
        return result

    def _neg_lambda_over_area(self, areas: tuple[int, ...], device, dtype) -> torch.Tensor:
        """-λ / (H·W) per layer as a (layers, 1) tensor, made once per (areas, device, dtype): no per-step copy."""
        key = (areas, str(device), dtype)
        value = self._cache.get(key)
        if value is None:
            value = torch.tensor([-self.opts.rmo_lambda / a for a in areas], dtype=dtype).view(-1, 1).to(device)
            self._cache[key] = value
        return value

    def __getstate__(self):  # the cache holds a weak reference and device tensors: never copied or pickled
        return {"opts": self.opts}

    def __setstate__(self, state):
        self.opts = state["opts"]
        self._cache = {}

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


# --------------------------------------------------------------------------- ablation diagnostic


def dc_share(weight) -> float:
    """Share of a K×K conv weight's energy in its DC part: Σ_(o,i) (Σ_taps k)² / K² over Σ k² — the squared
    projection onto the constant kernel. 1: every kernel a (scaled) box blur; a zero-sum kernel: 0; i.i.d. random
    taps: 1/K² on average."""
    k = weight.detach().double().flatten(2)
    return float((k.sum(dim=2) ** 2 / k.shape[2]).sum() / (k**2).sum())


@register_diagnostic("kernel_dc_share")
def kernel_dc_share(net, cfg, ctx: DiagnosticContext) -> dict[str, float]:
    """Mean over the 3×3 convolutions of the folded network (what inference applies: SCAN's k_u) of
    :func:`dc_share`: a network that froze as "blur + 1×1" (SAC without LSC, issue 11) is near 1."""
    folded, _ = net.folded()
    shares = [dc_share(m.weight) for m in folded.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    return {"dc_share": sum(shares) / len(shares)} if shares else {}
