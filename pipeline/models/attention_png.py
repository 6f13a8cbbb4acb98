"""``attention_maps.png``: the spatial maps a network's modules report, drawn over a few fixed faces.

Written by :meth:`pipeline.models.network.FaceNetwork.on_checkpoint` at every checkpoint when any module
reports a map (``trace.spatial_map``; LGAF's LANet maps per head × scale, CQA-Face's b branch maps). One row
per face: the face, then each map upsampled (bilinear) to the face's size and overlaid; the row's label holds
the per-sample values the modules reported (``trace.sample_value``: LGAF's γ_l, CQA's quality scores).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def plot_attention_maps(
    faces: torch.Tensor,
    maps: dict[str, torch.Tensor],
    values: dict[str, torch.Tensor],
    path: str | Path,
    step: int | None = None,
) -> Path:
    """faces (N,3,H,W) in [-1,1]; maps name → (N,1,h,w) in any range (each map drawn on its own colour scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, _, h, w = faces.shape
    names = list(maps)
    imgs = ((faces.detach().float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    ups = {
        k: F.interpolate(m.detach().float().cpu(), size=(h, w), mode="bilinear", align_corners=False)[:, 0].numpy()
        for k, m in maps.items()
    }
    cols = 1 + len(names)
    fig, axes = plt.subplots(n, cols, figsize=(1.3 * cols, 1.45 * n), squeeze=False)
    for i in range(n):
        label = "  ".join(f"{k} {float(v[i]):.3f}" for k, v in values.items() if v.dim() == 1 and v.numel() == n)
        axes[i][0].imshow(imgs[i])
        axes[i][0].set_ylabel(label, fontsize=5, rotation=0, ha="right", va="center", labelpad=2)
        for j, k in enumerate(names):
            ax = axes[i][j + 1]
            ax.imshow(imgs[i].mean(axis=2), cmap="gray", vmin=0, vmax=1)
            ax.imshow(ups[k][i], cmap="jet", alpha=0.5)
            if i == 0:
                ax.set_title(k, fontsize=5)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    title = "attention maps" + (f" at step {step}" if step is not None else "")
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
