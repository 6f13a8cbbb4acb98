"""CQA-Face head: contrastive quality-aware attentions (``model.head: {kind: cqa}``).

Paper: ``../shared/seeds/cqa_face.md``; implementation spec ``../shared/specs/lgaf_cqa.md`` Part B (B.x below). On
the trunk's final map X (point ``"out"``, after ``bn2``; the backbone's flatten-fc head is not used, B.1-1)::

    branch i = 1..b:  M_i = LANet_i(X)  (N, 1, h, w)       O_i = X ⊙ M_i  (eq. 1)      P_i = GAP(O_i)  (N, C)
    CAL (training loss, eq. 2):  L_CAL = 2/(b(b−1)) Σ_{i<j} max(0, exp(−d(M_i, M_j)/σ) − t),  batch mean
    QAN (eqs. 4–7; nodes = the b parts, every "1×1 conv" a Conv1d shared by the nodes, on P stacked (N, C, b)):
          A = φ(P)ᵀ ϕ(P)                (N, b, b)   A_ij = φ(P_i)·ϕ(P_j), φ ≠ ϕ (not symmetric), no softmax
          R_i = [A(i,:), A(:,i)]        (N, 2b, b)  relations from i, then relations to i
          S_i = θ([μ(P_i), ν(R_i)])    (eq. 5);  Ŝ_i = sigmoid(S_i) (eq. 6);  P̂_i = Ŝ_i · P_i (eq. 7)
    [P̂_1 … P̂_b] (N, b·C) → FC (no bias)  [→ BN1d with out_bn]   = the embedding (N, D)

Loss: L = L_cls (CosFace) + λ·L_CAL, λ = 0.5, σ = 0.01, t = 0.2 (eq. 9; C:182); the CAL term is this head's aux loss
``cal`` (already weighted), so the ``margin`` procedure trains it unchanged.

**d in eq. 2** (B.7-3; the paper does not say how (M_i − M_j)² becomes a scalar): ``cal_distance: mean`` (default,
the mean over the h·w positions: σ then means the same at any map size; the hinge switches off at an RMS
difference √(σ·ln(1/t)) = 0.127), ``sum`` (σ effectively /hw) or ``elementwise`` (kernel and hinge per position,
then the mean). ``diversity: ld`` is eq. 3 (HPDA's L_D = mean over pairs of max(0, t − ‖M_i − M_j‖₂)) in place of
CAL; ``dropout`` is Table 1's "dropout instead of CAL" (Dropout2d on O_i, p = ``dropout_p``; kind and rate are not
stated); ``none`` = no diversity term.

**Not from the paper** (config values): LANet reduction 16 with BNs; QAN widths (φ/ϕ/μ → C/``qan_reduction``,
ν keeps 2b, θ hidden (w+2b)/8, RGA's ratios); θ ending in a plain conv with bias; ``mu_pool`` (RGA averages μ over
its channels; eq. 5 does not: off); BN1d after the final FC (``out_bn``, off by default: it lets the quality
scores collapse, see ``out_bn``); the FC without bias. A run whose ``monitor/cqa/q_spread`` (mean per-sample
spread of Ŝ across the b branches) falls under :data:`Q_SPREAD_FLOOR` prints a one-line warning (the collapse).

Monitoring (B.8): ``monitor/cqa/*`` (raw L_CAL, mean kernel, active-hinge fraction, RMS map differences, per-branch
map mean/max/entropy, quality score mean/std, their spread across branches, part-feature norms, mean and asymmetry
of A), ``hist/cqa/*`` (Ŝ per branch, map values per branch, argmax cell of each map), and ``attention_maps.png`` at
each checkpoint (the b maps over 8 fixed faces, titled with Ŝ_i).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline import registry
from pipeline.config import Invalid, PartOptions
from pipeline.models.lanet import LANet, map_entropy
from pipeline.models.network import Head, PointInfo, Trace

DIVERSITY = ("cal", "ld", "dropout", "none")
# monitor/cqa/q_spread under this = the quality scores are collapsing. Measured at the fidelity scale (RESULTS.md):
# live heads log ≥ 0.011 over 150 steps; the out_bn collapse passes 2e-3 on its way to 0 (0.001 at step 150).
Q_SPREAD_FLOOR = 2e-3
DISTANCES = ("mean", "sum", "elementwise")


@dataclass
class CQAOptions(PartOptions):
    """``model.head: {kind: cqa, ...}`` (spec B.1, B.4; Table 1–2 ablations are these keys)."""

    RANGES = {
        "embedding_size": "[1, inf)",
        "branches": "[2, inf): CAL compares pairs of branches",
        "lanet_reduction": "[1, inf)",
        "cal_weight": "[0, inf)",
        "cal_sigma": "(0, inf)",
        "cal_margin": "[0, 1]",
        "dropout_p": "[0, 1)",
        "qan_reduction": "[1, inf)",
    }  # field → valid interval (pipeline.config.check_ranges)

    embedding_size: int = 512
    branches: int = 4  # b (Table 2)
    lanet_reduction: int = 16  # not from the paper
    lanet_bn: bool = True  # not from the paper
    diversity: str = "cal"  # cal (eq. 2) | ld (eq. 3) | dropout | none (Table 1)
    cal_weight: float = 0.5  # λ of eq. 9 (Table 2)
    cal_sigma: float = 0.01  # σ of eq. 2 (Table 2)
    cal_margin: float = 0.2  # t of eqs. 2 and 3 (Table 2)
    cal_distance: str = "mean"  # how (M_i − M_j)² is reduced (B.7-3; not from the paper)
    dropout_p: float = 0.5  # diversity: dropout (rate not stated)
    qan: bool = True  # Table 1: without QAN, P̂_i = P_i
    qan_reduction: int = 8  # φ/ϕ/μ width C/8 (RGA; not from the paper)
    mu_pool: bool = False  # RGA's channel-mean of μ (not in eq. 5)
    # BN1d after the final FC (not from the paper; the paper goes concat → FC → classifier). Off by default: BN1d
    # makes the loss blind to a common shrink of all Ŝ_i, so while the CE falls in warm-up the FC output's batch
    # variance (~5e-4 at init) drops under BN's eps and the embedding collapses to BN's bias (RESULTS.md, CQA).
    out_bn: bool = False

    def validate(self):
        if self.diversity not in DIVERSITY:
            raise Invalid("diversity", f"must be one of {', '.join(DIVERSITY)}, got '{self.diversity}'")
        if self.cal_distance not in DISTANCES:
            raise Invalid("cal_distance", f"must be one of {', '.join(DISTANCES)}, got '{self.cal_distance}'")


# --------------------------------------------------------------------------- the losses on the maps


def _pairs(b: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.triu_indices(b, b, offset=1, device=device).unbind(0)


def pair_sq_diff(maps: torch.Tensor) -> torch.Tensor:
    """maps (N, b, P) → (M_i − M_j)² for every pair i < j: (N, b(b−1)/2, P), float32."""
    i, j = _pairs(maps.shape[1], maps.device)
    m = maps.float()
    return (m[:, i] - m[:, j]).pow(2)


def cal_kernel(maps: torch.Tensor, sigma: float, distance: str = "mean") -> torch.Tensor:
    """k(M_i, M_j) = exp(−d/σ) for every pair: (N, pairs), or (N, pairs, P) per position (``elementwise``)."""
    sq = pair_sq_diff(maps.flatten(2))
    if distance == "elementwise":
        return torch.exp(-sq / sigma)
    d = sq.mean(dim=2) if distance == "mean" else sq.sum(dim=2)
    return torch.exp(-d / sigma)


def cal_loss(maps: torch.Tensor, sigma: float = 0.01, margin: float = 0.2, distance: str = "mean") -> torch.Tensor:
    """Eq. 2: L_CAL = mean over pairs (= 2/(b(b−1)) Σ_{i<j}) of max(0, k − t), then the batch mean. maps (N, b, h, w)."""
    return (cal_kernel(maps, sigma, distance) - margin).clamp(min=0).mean()


def ld_loss(maps: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Eq. 3 (HPDA's diverse learning): mean over pairs of max(0, t − ‖M_i − M_j‖₂), then the batch mean."""
    dist = pair_sq_diff(maps.flatten(2)).sum(dim=2).clamp(min=1e-12).sqrt()
    return (margin - dist).clamp(min=0).mean()


# --------------------------------------------------------------------------- QAN


def relation_vectors(a: torch.Tensor) -> torch.Tensor:
    """A (N, b, b) → R (N, 2b, b), column i = [A(i,:), A(:,i)] (C:127): the relations from node i, then to i."""
    return torch.cat([a.transpose(1, 2), a], dim=1)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, 1, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True))


class QualityAwareNetwork(nn.Module):
    """Eqs. 4–6: part features P (N, C, b) → quality scores Ŝ (N, b) ∈ (0, 1), and A (N, b, b) for monitoring."""

    def __init__(self, channels: int, b: int, reduction: int, mu_pool: bool):
        super().__init__()
        w = max(1, channels // reduction)
        self.phi, self.varphi, self.mu = (_conv_bn_relu(channels, w) for _ in range(3))  # φ, ϕ, μ
        self.nu = _conv_bn_relu(2 * b, 2 * b)  # ν on the relation vectors
        self.mu_pool = mu_pool
        cin = (1 if mu_pool else w) + 2 * b
        hidden = max(1, cin // 8)
        self.theta = nn.Sequential(_conv_bn_relu(cin, hidden), nn.Conv1d(hidden, 1, 1))  # θ of eq. 5

    def forward(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.einsum("nci,ncj->nij", self.phi(p), self.varphi(p))  # eq. 4
        mu = self.mu(p)
        if self.mu_pool:
            mu = mu.mean(dim=1, keepdim=True)
        s = self.theta(torch.cat([mu, self.nu(relation_vectors(a))], dim=1))  # eq. 5: (N, 1, b)
        return torch.sigmoid(s[:, 0]), a  # eq. 6


# --------------------------------------------------------------------------- the head


class CQAHead(Head):
    """b LANet branches → GAP parts → QAN-scaled → concat → FC (→ BN1d); CAL as the aux loss. See the module docstring."""

    def __init__(self, opts: CQAOptions, point: PointInfo):
        super().__init__()
        c, b = point.channels, opts.branches
        self.embedding_size = opts.embedding_size
        self.b = b
        self.diversity, self.cal_weight = opts.diversity, opts.cal_weight
        self.cal_sigma, self.cal_margin, self.cal_distance = opts.cal_sigma, opts.cal_margin, opts.cal_distance
        # separate weights per branch (identically initialised branches would never separate: CAL's gradient is
        # 0 at d = 0, B.3) — default init draws each LANet independently
        self.lanets = nn.ModuleList(LANet(c, opts.lanet_reduction, opts.lanet_bn) for _ in range(b))
        self.part_dropout = nn.Dropout2d(opts.dropout_p) if opts.diversity == "dropout" else None
        self.qan = QualityAwareNetwork(c, b, opts.qan_reduction, opts.mu_pool) if opts.qan else None
        self.fc = nn.Linear(b * c, opts.embedding_size, bias=False)
        self.features = nn.BatchNorm1d(opts.embedding_size) if opts.out_bn else nn.Identity()
        self.has_quality = opts.qan

    def monitor_floors(self) -> dict[str, tuple[float, str]]:
        if not self.has_quality:
            return {}
        why = "CQA's quality scores Ŝ have collapsed (every branch ≈ the same value; with out_bn: true see cqa.py)"
        return {"cqa/q_spread": (Q_SPREAD_FLOOR, why)}

    def forward(self, feats: dict[str, torch.Tensor], trace: Trace | None = None) -> torch.Tensor:
        x = feats["out"]
        maps = torch.cat([lanet(x) for lanet in self.lanets], dim=1)  # (N, b, h, w): M_i
        if self.part_dropout is not None:  # "dropout instead of CAL": on O_i = X ⊙ M_i, then GAP
            parts = torch.stack([self.part_dropout(x * maps[:, i : i + 1]).mean(dim=(2, 3)) for i in range(self.b)], 2)
        else:  # eq. 1 + GAP without building the b products: P_i = mean_p X(p)·M_i(p)
            parts = torch.einsum("nchw,nbhw->ncb", x, maps) / (x.shape[2] * x.shape[3])  # (N, C, b)
        if self.qan is not None:
            quality, a = self.qan(parts)
            scaled = parts * quality.unsqueeze(1).to(parts.dtype)  # eq. 7
        else:
            quality = a = None
            scaled = parts
        emb = self.features(self.fc(scaled.transpose(1, 2).flatten(1)))  # [P̂_1 … P̂_b] → FC → BN
        if trace is not None:
            if self.diversity == "cal":
                raw = cal_loss(maps, self.cal_sigma, self.cal_margin, self.cal_distance)
                trace.add_loss("cal", self.cal_weight * raw)
                trace.monitor("cqa/loss_cal", raw.detach())
            elif self.diversity == "ld":
                raw = ld_loss(maps, self.cal_margin)
                trace.add_loss("ld", self.cal_weight * raw)
                trace.monitor("cqa/loss_ld", raw.detach())
            self._report(trace, maps, parts, quality, a)
        return emb

    @torch.no_grad()
    def _report(self, trace: Trace, maps, parts, quality, a) -> None:
        maps, parts = maps.detach().float(), parts.detach().float()
        m = trace.monitor
        k = cal_kernel(maps, self.cal_sigma, self.cal_distance)
        m("cqa/cal_kernel_mean", k.mean())
        m("cqa/cal_active_frac", (k > self.cal_margin).float().mean())
        rmsd = pair_sq_diff(maps.flatten(2)).mean(dim=2).sqrt()  # (N, pairs): the 'mean' CAL distance, rooted
        m("cqa/attn_pair_rmsd_mean", rmsd.mean())
        m("cqa/attn_pair_rmsd_min", rmsd.min(dim=1).values.mean())
        ent = map_entropy(maps.flatten(0, 1).unsqueeze(1)).view(maps.shape[0], self.b)
        argmax = maps.flatten(2).argmax(dim=2)  # (N, b): the cell each map peaks on
        for i in range(self.b):
            m(f"cqa/attn{i}_mean", maps[:, i].mean())
            m(f"cqa/attn{i}_max", maps[:, i].amax(dim=(1, 2)).mean())
            m(f"cqa/attn{i}_entropy", ent[:, i].mean())
            m(f"cqa/P{i}_norm_mean", parts[:, :, i].norm(dim=1).mean())
            trace.histogram(f"cqa/attn{i}", maps[:, i].flatten())
            trace.histogram(f"cqa/attn{i}_argmax", argmax[:, i].float())
            trace.spatial_map(f"M{i}", maps[:, i : i + 1])
        if quality is None:
            return
        q = quality.detach().float()
        for i in range(self.b):
            m(f"cqa/q{i}_mean", q[:, i].mean())
            if q.shape[0] > 1:
                m(f"cqa/q{i}_std", q[:, i].std())
            trace.histogram(f"cqa/q{i}", q[:, i])
            trace.sample_value(f"q{i}", q[:, i])
        m("cqa/q_spread", (q.max(dim=1).values - q.min(dim=1).values).mean())
        a = a.detach().float()
        m("cqa/A_mean", a.mean())
        m("cqa/A_asym", (a - a.transpose(1, 2)).abs().mean())


@registry.register("head", "cqa", CQAOptions)
def build_cqa_head(opts: CQAOptions, points: dict[str, PointInfo], model_cfg=None) -> CQAHead:
    return CQAHead(opts, points["out"])


def quality_scores(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Eval-mode Ŝ (N, b) of a network with a ``cqa`` head (for the fidelity report: Ŝ on clean vs occluded faces)."""
    trace = net.probe(images)
    keys = sorted((k for k in trace.sample_values if k.startswith("q")), key=lambda k: int(k[1:]))
    if not keys:
        raise ValueError("the network has no CQA quality scores (model.head.kind is not cqa, or qan: false)")
    return torch.stack([trace.sample_values[k] for k in keys], dim=1)
