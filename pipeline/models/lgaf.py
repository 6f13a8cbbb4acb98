"""LGAF head: local and global feature attention fusion (``model.head: {kind: lgaf}``).

Paper: ``../shared/seeds/lgaf_local_global_fusion.md``; implementation spec ``../shared/specs/lgaf_cqa.md`` Part A
(section numbers A.x below). Both branches read the trunk's final map C(x) (point ``"out"``, after ``bn2``)::

    f_glob = GFE(C(x))   the backbone's own fc head, unchanged (dropout → flatten → fc → BN1d; A.1-2): the
                         parameters keep the ``fc`` head's names, so an arcface_torch ``backbone.pth`` loads
                         into trunk + GFE and only the local branch is new
    f_loc  = [L_1 … L_b] b MSNet heads (MHMS, Sec. 3.3), each on C(x):
               per kernel j ∈ K: Φ_j = conv j×j → BN → PReLU, LANet map att_j, l_j = Φ_j ⊙ att_j   (eq. 12)
               concat over j → SE → GAP → Linear(|K|·c_s → D/b, no bias) → BN1d          = L_k (eq. 13)
    LGF    (no parameters, 4 buffers; eqs. 4–10):
               Z_j = ‖f_j‖₂ (eq. 4–5, "energy" = the L2 norm), j ∈ {l, g}
               μ_j ← α·mean_batch(Z_j) + (1−α)·μ_j, σ_j likewise (eqs. 7–8; α is the weight of the NEW batch)
               Ẑ_j = clip(h·(Z_j − μ_j)/(σ_j + ε), −1, 1) + 1                               (eq. 6)
               γ_j = Ẑ_j / (Ẑ_l + Ẑ_g)   (+ε: both Ẑ can be 0, A.7-6)                        (eq. 9)
               κ = γ_l·f_loc + γ_g·f_glob                                                   (eq. 10)

κ is the embedding (the margin classifier normalises it). No auxiliary loss (A.4).

**Symbol swap in the paper (A.2).** Sec. 3 calls the global feature Υ and the MHMS output Ψ (eq. 14); Sec. 3.2 says
"T^l = Υ … local, T^g = Ψ … global". The superscripts decide: γ_l is computed from the *local* feature's own norm and
multiplies the local feature; here they are ``f_loc`` / ``f_glob``.

**Statistics (A.4, A.7-7/8/9).** As AdaFace's ``head.py`` (the paper's h = 0.333 and α = 0.01 are its ``h`` and
``t_alpha``): Z clipped to [0.001, 100]; each training forward first updates the EMA with the batch, then normalises
with the *updated* EMA; initial μ = 20, σ = 100; eval uses the buffers and never touches them. The batch sums are
**all-reduced across ranks**, so every rank holds the same buffers, equal to the statistics of the global batch.
AdaFace under Lightning-DDP effectively used rank 0's batch alone (DDP broadcasts rank 0's buffers each forward):
the all-reduce is a deliberate departure (same expectation, lower variance, and the checkpoint written by rank 0
holds the statistics every rank used). The buffers stay float32 under bf16/fp16 (``fp32_buffers``: the trainer
does not cast them; an α = 0.01 update of a bf16 value near 20 would round away). Z is detached before eq. 6
(``detach_quality``, AdaFace's ``safe_norms.clone().detach()``; the paper is silent): γ is a per-sample constant,
so the network cannot move γ by inflating a branch's norm.

**Not from the paper** (the spec's choices, all config values): ``kernels`` K = {1, 3, 5}; ``scale_channels``
c_s = C/b (so the cost does not grow with b); BN + PReLU after Φ_j; LANet reduction 16 with BNs; SE reduction 16;
per-head output D/b (eq. 10 adds a D-dim local feature to the D-dim global one); BN1d after each head's
projection (balances ‖f_loc‖ with ‖f_glob‖ at init); ``ema_init``; ``std_eps`` = 1e-3 (AdaFace); the entropy
quality (Table 3 cites TransFace [35] only: Z = ½·log(2πe·Var(f)), A.7-10); iAFF "adapted" to vectors (A.7-11).

Ablations as config (the paper's tables): Table 1 I = ``branches: local``, II = ``branches: global`` (the plain
fc head), III = ``fusion: sum``; Table 2 = ``heads`` 2/4/8/16; Table 3 = ``quality: none|entropy|norm``; Table 4 =
``fusion: cat|iaff|add``.

Monitoring (A.8): ``monitor/lgaf/*`` every log step (γ_l statistics, clip fractions, branch norms, EMA buffers, norm
correlation, cos(f_loc, f_glob), the local share of κ, per-head norms and diversity, per-scale SE gates and LANet
map statistics); ``hist/lgaf/*`` (γ_l, Z_l, Z_g, Ẑ_l, Ẑ_g, SE gates); ``attention_maps.png`` at each checkpoint
(every head × scale LANet map over 8 fixed faces, each titled with its γ_l).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline import collectives, registry
from pipeline.config import Invalid, PartOptions
from pipeline.models.iresnet import FCHead
from pipeline.models.lanet import LANet, map_entropy
from pipeline.models.network import Head, PointInfo, Trace

BRANCHES = ("both", "local", "global")
FUSIONS = ("add", "cat", "sum", "iaff")
QUALITIES = ("norm", "entropy", "none")
EMA_INITS = ("adaface", "first_batch")
ADAFACE_EMA_INIT = (20.0, 100.0)  # AdaFace's batchmean / batchstd buffers at step 0
NORM_CLIP = (0.001, 100.0)  # AdaFace's safe_norms range
GAMMA_EPS = 1e-6  # eq. 9 with both Ẑ = 0 gives 0.5 / 0.5 (A.7-6)


@dataclass
class LGAFOptions(PartOptions):
    """``model.head: {kind: lgaf, ...}`` (spec A.1, A.4; defaults = the spec's)."""

    RANGES = {
        "embedding_size": "[1, inf)",
        "dropout": "[0, 1)",
        "heads": "[1, inf)",
        "scale_channels": "[0, inf): 0 = C // heads",
        "lanet_reduction": "[1, inf)",
        "se_reduction": "[1, inf)",
        "h": "(0, inf)",
        "ema_alpha": "(0, 1]",
        "std_eps": "[0, inf)",
        "iaff_reduction": "[1, inf)",
    }  # field → valid interval (pipeline.config.check_ranges)

    embedding_size: int = 512  # D: the size of f_loc, f_glob and κ (κ is 2·D with fusion: cat)
    dropout: float = 0.0  # the GFE's dropout (the fc head's); the faithful recipe uses 0.4 (AdaFace IR-101)
    heads: int = 4  # b, the number of MSNet heads (Table 2)
    kernels: list = field(default_factory=lambda: [1, 3, 5])  # K (not from the paper)
    scale_channels: int = 0  # c_s per kernel size; 0 = C // heads (not from the paper)
    factorize: bool = False  # a j×j kernel as (j−1)/2 stacked 3×3 convs (the "equivalent kernel" reading)
    lanet_reduction: int = 16  # not from the paper
    lanet_bn: bool = True  # not from the paper
    se_reduction: int = 16  # SE (Hu et al.); the paper cites SE without a ratio
    branches: str = "both"  # both | local (Table 1 I) | global (Table 1 II: the plain fc head)
    fusion: str = "add"  # add (eq. 10) | cat | sum (Table 1 III, no LGF) | iaff (Table 4)
    quality: str = "norm"  # norm (eqs. 4–5, "energy") | entropy | none (Table 3)
    h: float = 0.333  # eq. 6
    ema_alpha: float = 0.01  # eqs. 7–8: weight of the new batch statistic
    # The running [μ, σ] of eqs. 7–8 at step 0 (not from the paper): adaface = [20, 100], AdaFace's values (for
    # norms of ~20–40 they attenuate Ẑ for hundreds of steps: after n steps a fraction (1−α)^n of σ_0 = 100
    # remains); first_batch = the first training batch's own statistics (Ẑ at full size from step 1); or an
    # explicit [μ, σ] list.
    ema_init: Any = "adaface"
    std_eps: float = 1e-3  # eq. 6: σ + ε (AdaFace; not from the paper)
    detach_quality: bool = True  # stop-gradient on Z (AdaFace; the paper is silent)
    iaff_reduction: int = 4  # iAFF's MS-CAM reduction (Dai et al.; not from the paper)

    def validate(self):
        if self.branches not in BRANCHES:
            raise Invalid("branches", f"must be one of {', '.join(BRANCHES)}, got '{self.branches}'")
        if self.fusion not in FUSIONS:
            raise Invalid("fusion", f"must be one of {', '.join(FUSIONS)}, got '{self.fusion}'")
        if self.quality not in QUALITIES:
            raise Invalid("quality", f"must be one of {', '.join(QUALITIES)}, got '{self.quality}'")
        if self.embedding_size % self.heads:
            raise Invalid(
                "embedding_size",
                f"must be a positive multiple of heads={self.heads} (each head emits D/b; eq. 10 adds D-dim "
                f"features), got {self.embedding_size}",
            )
        if not self.kernels or any(not isinstance(k, int) or k < 1 or k % 2 == 0 for k in self.kernels):
            raise Invalid("kernels", f"must be odd positive integers, got {self.kernels}")
        init = self.ema_init
        if isinstance(init, str):
            if init not in EMA_INITS:
                raise Invalid("ema_init", f"must be one of {', '.join(EMA_INITS)} or [mean, std], got {init!r}")
        elif (
            not isinstance(init, list)
            or len(init) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in init)
            or not init[1] > 0
        ):
            raise Invalid("ema_init", f"expects adaface, first_batch or [mean, std] with std > 0, got {init!r}")


# --------------------------------------------------------------------------- MHMS: b MSNet heads


def scale_conv(in_ch: int, out_ch: int, kernel: int, factorize: bool) -> nn.Module:
    """Φ_j (eq. 12): a j×j conv (pad j//2, no bias), or (j−1)/2 stacked 3×3 convs with ``factorize``."""
    if not factorize or kernel <= 3:
        return nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False)
    layers = [
        nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1, bias=False) for i in range((kernel - 1) // 2)
    ]
    return nn.Sequential(*layers)


class MSNetHead(nn.Module):
    """One MSNet head (eqs. 11–13): multi-kernel convs → per-scale LANet → concat → SE → GAP → Linear → BN1d.

    The SE gate is a per-channel scale, so SE-then-GAP equals GAP-then-SE-on-the-pooled-vector (spec A.1-3): the
    concatenated (N, |K|·c_s, H, W) map is never built; the SE gate is computed from the GAP of the concatenation
    (which is what SE's own squeeze does) and applied to the pooled vector. ``forward`` →
    (L_k (N, D/b), the LANet maps [(N, 1, H, W)] per scale, the SE gates (N, |K|·c_s))."""

    def __init__(self, channels, scale_channels, kernels, out_dim, lanet_reduction, lanet_bn, se_reduction, factorize):
        super().__init__()
        self.kernels = tuple(kernels)
        self.scales = nn.ModuleList(
            nn.Sequential(
                scale_conv(channels, scale_channels, k, factorize),
                nn.BatchNorm2d(scale_channels),
                nn.PReLU(scale_channels),
            )
            for k in self.kernels
        )
        self.lanets = nn.ModuleList(LANet(scale_channels, lanet_reduction, lanet_bn) for _ in self.kernels)
        cat = scale_channels * len(self.kernels)
        hidden = max(1, cat // se_reduction)
        self.se = nn.Sequential(
            nn.Linear(cat, hidden, bias=False), nn.ReLU(inplace=True), nn.Linear(hidden, cat, bias=False)
        )
        self.proj = nn.Linear(cat, out_dim, bias=False)
        self.bn = nn.BatchNorm1d(out_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        pooled, maps = [], []
        for conv, lanet in zip(self.scales, self.lanets):
            phi = conv(x)
            att = lanet(phi)  # eq. 11: spatial map (N, 1, H, W)
            pooled.append((phi * att).mean(dim=(2, 3)))  # GAP of l_j = Φ_j ⊙ att_j (eq. 12)
            maps.append(att)
        v = torch.cat(pooled, dim=1)  # Ω: concat over scales (after GAP, see the class docstring)
        gate = torch.sigmoid(self.se(v))  # S: SE channel attention
        return self.bn(self.proj(v * gate)), maps, gate


class MSCAM(nn.Module):
    """MS-CAM of attentional feature fusion (Dai et al. 2021) on vectors: σ(BN(W₂ ReLU(BN(W₁ v)))) (A.7-11)."""

    def __init__(self, dim: int, reduction: int):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim),
            nn.BatchNorm1d(dim),
        )

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(v))


# --------------------------------------------------------------------------- LGF: quality → fusion weights


def quality_score(f: torch.Tensor, quality: str) -> torch.Tensor:
    """Z per sample, float32: the L2 norm (eqs. 4–5) clipped to [0.001, 100], or the Gaussian entropy
    ½·log(2πe·Var(f)) over the D components (A.7-10)."""
    f = f.float()
    if quality == "entropy":
        return 0.5 * torch.log(2 * math.pi * math.e * f.var(dim=1) + 1e-12)
    return f.norm(dim=1).clamp(*NORM_CLIP)


class LocalGlobalFusion(nn.Module):
    """The LGF's running statistics and eqs. 6–9: Z (N, 2) [local, global] → γ (N, 2), rows summing to 1.

    Buffers ``ema_mean`` / ``ema_std`` hold [μ_l, μ_g] / [σ_l, σ_g] (float32 always: ``fp32_buffers``)."""

    fp32_buffers = ("ema_mean", "ema_std")

    def __init__(self, h: float, alpha: float, init: Any, std_eps: float):
        super().__init__()
        self.h, self.alpha, self.std_eps = h, alpha, std_eps
        start = ADAFACE_EMA_INIT if init in ("adaface", "first_batch") else init
        self.register_buffer("ema_mean", torch.full((2,), float(start[0])))
        self.register_buffer("ema_std", torch.full((2,), float(start[1])))
        # first_batch: the first update *sets* the statistics (a flag tensor, so no host sync decides it)
        self.seed_from_first_batch = init == "first_batch"
        if self.seed_from_first_batch:
            self.register_buffer("ema_seeded", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        """Eqs. 7–8 with the batch statistics of the *global* batch: sums all-reduced over ranks."""
        z = z.detach().float()
        stats = torch.cat([z.sum(0), z.pow(2).sum(0), z.new_tensor([float(z.shape[0])])])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            collectives.all_reduce(stats)
        n = stats[4]
        mean = stats[0:2] / n
        var = (stats[2:4] - n * mean.pow(2)) / (n - 1).clamp(min=1.0)  # unbiased, as torch.std (AdaFace)
        std = var.clamp(min=0.0).sqrt()
        a = self.alpha
        new_mean = self.ema_mean * (1 - a) + a * mean.to(self.ema_mean.dtype)
        new_std = self.ema_std * (1 - a) + a * std.to(self.ema_std.dtype)
        if self.seed_from_first_batch:
            new_mean = torch.where(self.ema_seeded, new_mean, mean.to(new_mean.dtype))
            new_std = torch.where(self.ema_seeded, new_std, std.to(new_std.dtype))
            self.ema_seeded.fill_(True)
        self.ema_mean.copy_(new_mean)
        self.ema_std.copy_(new_std)

    def scaled(self, z: torch.Tensor) -> torch.Tensor:
        """h·(Z − μ)/(σ + ε), before the clip of eq. 6."""
        return self.h * (z - self.ema_mean.float()) / (self.ema_std.float() + self.std_eps)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (N, 2) float32 → (γ (N, 2), Ẑ (N, 2), h·z before the clip (N, 2)). Training: update first (AdaFace)."""
        if self.training:
            self.update(z)
        hz = self.scaled(z)
        zhat = hz.clamp(-1.0, 1.0) + 1.0  # eq. 6
        gamma = (zhat + GAMMA_EPS) / (zhat.sum(dim=1, keepdim=True) + 2 * GAMMA_EPS)  # eq. 9
        return gamma, zhat, hz


# --------------------------------------------------------------------------- the head


class LGAFHead(FCHead):
    """GFE (the inherited fc head) + MHMS + LGF; see the module docstring."""

    def __init__(self, opts: LGAFOptions, point: PointInfo):
        d = opts.embedding_size
        if opts.branches == "local":
            Head.__init__(self)  # no global branch: no fc parameters
        else:
            super().__init__(point.channels, point.spatial, d, opts.dropout)
        self.branches, self.fusion, self.quality = opts.branches, opts.fusion, opts.quality
        self.detach_quality = opts.detach_quality
        self.embedding_size = 2 * d if (opts.branches == "both" and opts.fusion == "cat") else d
        if opts.branches != "global":
            c_s = opts.scale_channels or max(1, point.channels // opts.heads)
            self.msnet = nn.ModuleList(
                MSNetHead(
                    point.channels,
                    c_s,
                    opts.kernels,
                    d // opts.heads,
                    opts.lanet_reduction,
                    opts.lanet_bn,
                    opts.se_reduction,
                    opts.factorize,
                )
                for _ in range(opts.heads)
            )
            self.kernels = tuple(opts.kernels)
        self.fuses = opts.branches == "both" and opts.fusion != "sum"
        if self.fuses and opts.quality != "none":
            self.lgf = LocalGlobalFusion(opts.h, opts.ema_alpha, opts.ema_init, opts.std_eps)
        if self.fuses and opts.fusion == "iaff":
            self.cam1, self.cam2 = MSCAM(d, opts.iaff_reduction), MSCAM(d, opts.iaff_reduction)

    # ------------------------------------------------------------------ branches
    def local_feature(self, x: torch.Tensor, trace: Trace | None) -> torch.Tensor:
        outs = [head(x) for head in self.msnet]
        if trace is not None:
            self._report_local(outs, trace)
        return torch.cat([o[0] for o in outs], dim=1)  # eq. 14: f_loc = Ω(L_1 … L_b)

    def forward(self, feats: dict[str, torch.Tensor], trace: Trace | None = None) -> torch.Tensor:
        if self.branches == "global":
            return super().forward(feats, trace)
        f_loc = self.local_feature(feats["out"], trace)
        if self.branches == "local":
            return f_loc
        return self.fuse(f_loc, super().forward(feats, trace), trace)

    def fuse(self, f_loc: torch.Tensor, f_glob: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        """The LGF and the fusion (eqs. 4–10, or the configured ablation): (f_loc, f_glob) → κ."""
        if self.fusion == "sum":  # Table 1 III: summed without LGF
            return f_loc + f_glob
        if self.quality == "none":
            gamma = f_loc.new_full((f_loc.shape[0], 2), 0.5, dtype=torch.float32)
            zhat = hz = z = None
        else:
            z = torch.stack([quality_score(f_loc, self.quality), quality_score(f_glob, self.quality)], dim=1)
            if self.detach_quality:
                z = z.detach()
            gamma, zhat, hz = self.lgf(z)
        x = gamma[:, :1] * f_loc.float()
        y = gamma[:, 1:] * f_glob.float()
        if self.fusion == "add":
            kappa = x + y  # eq. 10
        elif self.fusion == "cat":
            kappa = torch.cat([x, y], dim=1)
        else:  # iaff: z = M(x ⊎ y)⊙x + (1 − M(x ⊎ y))⊙y, x ⊎ y itself a first AFF
            x, y = x.to(f_loc.dtype), y.to(f_loc.dtype)
            a = self.cam1(x + y)
            first = a * x + (1 - a) * y
            b = self.cam2(first)
            kappa = b * x + (1 - b) * y
        if trace is not None:
            self._report_fusion(trace, f_loc, f_glob, gamma, z, zhat, hz)
        return kappa.to(f_loc.dtype)

    # ------------------------------------------------------------------ monitoring (A.8)
    @torch.no_grad()
    def _report_local(self, outs, trace: Trace) -> None:
        feats = [o[0].detach().float() for o in outs]
        for k, f in enumerate(feats):
            trace.monitor(f"lgaf/head{k}/norm_mean", f.norm(dim=1).mean())
        if len(feats) > 1:  # head diversity: mean pairwise cosine between the heads' L_k
            unit = F.normalize(torch.stack(feats, dim=1), dim=2)  # (N, b, D/b)
            cos = unit @ unit.transpose(1, 2)
            b = len(feats)
            off = cos.sum(dim=(1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(dim=1)
            trace.monitor("lgaf/head_cos_mean", (off / (b * (b - 1))).mean())
        gates = torch.stack([o[2].detach().float() for o in outs], dim=1)  # (N, b, |K|·c_s)
        trace.histogram("lgaf/se_gates", gates.flatten())
        c_s = gates.shape[2] // len(self.kernels)
        for j, kern in enumerate(self.kernels):
            trace.monitor(f"lgaf/se_weight_scale{kern}", gates[:, :, j * c_s : (j + 1) * c_s].mean())
            maps = torch.stack([o[1][j].detach().float() for o in outs], dim=1)  # (N, b, 1, H, W)
            trace.monitor(f"lgaf/lanet_scale{kern}_mean", maps.mean())
            trace.monitor(f"lgaf/lanet_scale{kern}_max", maps.amax(dim=(2, 3, 4)).mean())
            trace.monitor(f"lgaf/lanet_scale{kern}_entropy", map_entropy(maps.flatten(0, 1)).mean())
            if trace.probing:
                for k in range(len(outs)):
                    trace.spatial_map(f"h{k}k{kern}", maps[:, k])

    @torch.no_grad()
    def _report_fusion(self, trace: Trace, f_loc, f_glob, gamma, z, zhat, hz) -> None:
        f_loc, f_glob = f_loc.detach().float(), f_glob.detach().float()
        g_l = gamma[:, 0].detach()
        n_l, n_g = f_loc.norm(dim=1), f_glob.norm(dim=1)
        trace.sample_value("gamma_l", g_l)
        trace.histogram("lgaf/gamma_l", g_l)
        m = trace.monitor
        m("lgaf/gamma_l_mean", g_l.mean())
        m("lgaf/gamma_l_std", g_l.std() if g_l.numel() > 1 else torch.zeros_like(g_l[0]))
        m("lgaf/gamma_l_min", g_l.min())
        m("lgaf/gamma_l_max", g_l.max())
        m("lgaf/norm_l_mean", n_l.mean())
        m("lgaf/norm_g_mean", n_g.mean())
        if n_l.numel() > 1:
            m("lgaf/norm_l_std", n_l.std())
            m("lgaf/norm_g_std", n_g.std())
            nl, ng = n_l - n_l.mean(), n_g - n_g.mean()
            m("lgaf/corr_norm_lg", (nl * ng).sum() / (nl.norm() * ng.norm() + 1e-12))
        m("lgaf/cos_loc_glob", F.cosine_similarity(f_loc, f_glob, dim=1).mean())
        loc_part, glob_part = gamma[:, 0] * n_l, gamma[:, 1] * n_g
        m("lgaf/share_l", (loc_part / (loc_part + glob_part + 1e-12)).mean())
        if z is None:
            return
        for j, name in enumerate("lg"):
            m(f"lgaf/clip_frac_{name}_lo", (hz[:, j] <= -1.0).float().mean())
            m(f"lgaf/clip_frac_{name}_hi", (hz[:, j] >= 1.0).float().mean())
            m(f"lgaf/ema_mu_{name}", self.lgf.ema_mean[j].detach().float())
            m(f"lgaf/ema_sigma_{name}", self.lgf.ema_std[j].detach().float())
            trace.histogram(f"lgaf/z_{name}", z[:, j].detach())
            trace.histogram(f"lgaf/zhat_{name}", zhat[:, j].detach())


@registry.register("head", "lgaf", LGAFOptions)
def build_lgaf_head(opts: LGAFOptions, points: dict[str, PointInfo], model_cfg=None) -> LGAFHead:
    return LGAFHead(opts, points["out"])
