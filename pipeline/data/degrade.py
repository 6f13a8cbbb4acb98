"""Image degradations shared by the torch loader and the evaluation-set tools.

Images are float tensors (C, H, W) or (N, C, H, W) in any range; outputs keep the input range
(clamped to the input's min/max so bicubic overshoot cannot leave it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bicubic_down_up(img: torch.Tensor, size: int, out_size: int | None = None) -> torch.Tensor:
    """Bicubic down to ``size``×``size`` and back up, both as PIL's ``Image.resize(..., BICUBIC)`` does it.

    This is the low-resolution synthesis of LRFR Sec. 3.1 (7/14/20 px) and of the LR benchmarks. Both steps use
    PyTorch's antialiased bicubic, which is PIL's filter (Keys cubic, a = −0.5, support scaled by the
    down-sampling factor). For the *up* step that matters too: PyTorch's plain ``mode="bicubic"`` uses
    a = −0.75 (OpenCV's), which differed from PIL and DALI by 0.0075 mean |Δ| at 7 px on LFW faces.
    ``tests/test_augment.py`` checks the result against PIL (float mode) within 1e-6 on a [0, 1] scale.
    """
    squeeze = img.dim() == 3
    x = img.unsqueeze(0) if squeeze else img
    out_size = out_size or x.shape[-1]
    lo, hi = x.amin(), x.amax()
    # float64: PIL accumulates in double, so float32 here would add ~1e-6 of rounding at 20 px
    small = F.interpolate(x.double(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    up = F.interpolate(small, size=(out_size, out_size), mode="bicubic", antialias=True, align_corners=False)
    up = up.clamp(lo, hi).to(img.dtype)
    return up[0] if squeeze else up


def gaussian_kernel1d(sigma: float, radius: int | None = None) -> torch.Tensor:
    radius = radius if radius is not None else max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, radius ceil(3σ), reflect padding (SCAN's synthetic blur, Sec. 6.4)."""
    if sigma <= 0:
        return img
    squeeze = img.dim() == 3
    x = (img.unsqueeze(0) if squeeze else img).float()
    c = x.shape[1]
    k = gaussian_kernel1d(sigma).to(x.device)
    r = (k.numel() - 1) // 2
    r_eff = min(r, x.shape[-1] - 1, x.shape[-2] - 1)  # reflect pad must be < size
    if r_eff < r:
        k = gaussian_kernel1d(sigma, r_eff).to(x.device)
        r = r_eff
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)
    x = x.to(img.dtype)
    return x[0] if squeeze else x
