"""SCAN-CNN recipe: a SCAN-IResNet trained with a margin softmax plus the RMO term (eq. 7).

L_total = L_rec + rmo_weight · Σ_layers L_scale (eqs. 6-7; the paper's weight is 1). The scale
attention convolution, LSC, RMO and folding live in :mod:`pipeline.models.scan`.

Config: ``recipe: scan``, ``model.backbone`` one of scan_iresnet18/50/100, scan_se_iresnet50/100
(SE-ResNet of Table 4 = the ``se_`` names), and the switches under ``method:`` (the schema is
:class:`ScanConfig`). The switches are the single source of truth: they are passed to the
backbone as its ``model.options``, so setting them in ``model.options`` as well is an error.

Monitoring: aux loss ``rmo`` (TensorBoard ``loss/rmo``); scalars ``scan/t_mean``, ``scan/t_min``,
``scan/t_max``, ``scan/t_std``, ``scan/t_frac_below_0.1`` (``monitor/…``); histograms
``scan/t/<layer>`` per SAC layer and ``t/all`` (``hist/…``); ``t_density.png`` (Fig. 3 style) in
every checkpoint directory.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import registry
from pipeline.models.scan import SCAN_OPTION_KEYS, SacOptions, sac_layers
from pipeline.recipes.base import ClassifierInput, RecipeModel, StepOutput

SCAN_BACKBONES = ("scan_iresnet18", "scan_iresnet50", "scan_iresnet100", "scan_se_iresnet50", "scan_se_iresnet100")


@dataclass
class ScanConfig:
    """``method:`` block of the scan recipe (Sec. 4, 6.1; Table 1 switches)."""
    sac: bool = True  # scale attention conv (eq. 4); false: plain kernel k
    lsc: bool = True  # local shortcut connection, independent k_i (eq. 8)
    rmo: bool = True  # response-maximisation objective (eq. 6)
    rmo_weight: float = 1.0  # weight of Σ L_scale in the total loss (eq. 7 uses 1)
    rmo_lambda: float = 1.0  # λ of eq. 6
    gamma_m: float = 1.0  # γ·m, exponent of the normalised-derivative factor t^γm (eq. 4)
    efficient_rmo: bool = True  # Appendix E: RMO gradient reaches only the layer's own parameters
    t_min: float = 1e-3  # t = t_min + softplus(ρ), ρ initialised so that t = 1
    gaussian_sum1: bool = False  # renormalise the 5×5 Gaussian to sum 1 (the paper: eq. 2 as is)
    t_density_png: bool = True  # write t_density.png at every checkpoint
    # Fine-tuning (QMUL-SurvFace): initialise the backbone from a checkpoint dir / run dir / model.pt
    # of the same architecture (strict). Once loaded, the recipe moves the path to
    # `initialised_from`, so the checkpoints' config.yaml records it but never needs the file again.
    init_backbone: str = ""
    initialised_from: str = ""  # set by the recipe (provenance only)


class ScanRecipe(RecipeModel):
    def __init__(self, cfg):
        super().__init__()
        from pipeline.config import ConfigError

        m: ScanConfig = cfg.method
        if cfg.model.backbone not in SCAN_BACKBONES:
            raise ConfigError(f"model.backbone: recipe 'scan' needs a SCAN backbone ({', '.join(SCAN_BACKBONES)}), "
                              f"got '{cfg.model.backbone}'")
        clash = sorted(set(cfg.model.options) & set(SCAN_OPTION_KEYS))
        if clash:
            raise ConfigError(f"model.options: set {', '.join(clash)} under 'method:' for recipe 'scan', not in model.options")
        if m.rmo_weight < 0 or m.rmo_lambda <= 0:
            raise ConfigError(f"method: rmo_weight must be >= 0 and rmo_lambda > 0, got {m.rmo_weight}, {m.rmo_lambda}")
        options = {k: getattr(m, k) for k in SCAN_OPTION_KEYS}
        SacOptions.from_options(options, where="method")
        model_cfg = dataclasses.replace(cfg.model, options={**cfg.model.options, **options})
        self.method = m
        self.backbone = registry.build_backbone(model_cfg)
        if m.init_backbone:
            load_backbone_weights(self.backbone, m.init_backbone, cfg.model.backbone)
            m.initialised_from, m.init_backbone = m.init_backbone, ""

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict) -> StepOutput:
        emb = self.backbone(batch["image"])
        aux = {}
        losses = [loss for _, layer in sac_layers(self.backbone) if (loss := layer.pop_rmo()) is not None]
        if losses:
            # eq. 7: L_total = L_rec + Σ_layers L_scale (weighted; the paper's weight is 1)
            aux["rmo"] = self.method.rmo_weight * torch.stack([l.float() for l in losses]).sum()
        return StepOutput(heads={"main": ClassifierInput(emb, batch["label"])}, aux_losses=aux,
                          scalars=self._t_scalars())

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def inference_backbone(self):
        """The unfolded SCAN backbone (eval rebuilds it from config.yaml; export folds it)."""
        return self.backbone

    # ------------------------------------------------------------------ monitoring
    def t_per_layer(self) -> dict[str, torch.Tensor]:
        """Detached t (scale per output filter) of every SAC layer, keyed by module path."""
        return {name: layer.t.detach() for name, layer in sac_layers(self.backbone) if layer.sac}

    def _t_scalars(self) -> dict[str, torch.Tensor]:
        per_layer = self.t_per_layer()
        if not per_layer:
            return {}
        t = torch.cat(list(per_layer.values())).float()
        return {"scan/t_mean": t.mean(), "scan/t_min": t.min(), "scan/t_max": t.max(), "scan/t_std": t.std(),
                "scan/t_frac_below_0.1": (t < 0.1).float().mean()}

    def no_weight_decay(self) -> set[str]:
        """The scale parameters ρ (t) of every SAC layer: "updated without weight decay" (Sec. 6.1)."""
        return {name for name, _ in self.named_parameters() if name.endswith(".scale_raw")}

    def histograms(self) -> dict[str, torch.Tensor]:
        per_layer = self.t_per_layer()
        out = {f"scan/t/{name}": t for name, t in per_layer.items()}
        if per_layer:
            out["t/all"] = torch.cat(list(per_layer.values()))
        return out

    def on_checkpoint(self, out_dir: Path, step: int) -> None:
        per_layer = self.t_per_layer()
        if per_layer and self.method.t_density_png:
            plot_t_density(torch.cat(list(per_layer.values())).float().cpu().numpy(), Path(out_dir) / "t_density.png",
                           title=f"SCAN t density, step {step} ({len(per_layer)} SAC layers)")


def load_backbone_weights(backbone: torch.nn.Module, source: str, name: str) -> None:
    """Load ``model.pt`` of a checkpoint dir, a run dir (its latest checkpoint) or a .pt file (strict)."""
    from pipeline.checkpoint import resolve
    from pipeline.config import ConfigError

    path = Path(source)
    if path.is_dir():
        try:
            path = (path if (path / "model.pt").is_file() else resolve(path)) / "model.pt"
        except FileNotFoundError as exc:
            raise ConfigError(f"method.init_backbone: {exc}") from None
    if not path.is_file():
        raise ConfigError(f"method.init_backbone: {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"method.init_backbone: {path} does not fit '{name}' ({first})") from None


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


@registry.register_recipe("scan", ScanConfig)
def build(cfg) -> ScanRecipe:
    return ScanRecipe(cfg)
