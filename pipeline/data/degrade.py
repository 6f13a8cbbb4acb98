"""Image degradations shared by the torch loader and the evaluation-set tools.

Images are float tensors (C, H, W) or (N, C, H, W) in any range; outputs keep the input range
(clamped to the input's min/max so bicubic overshoot cannot leave it).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def bicubic_down_up(img: torch.Tensor, size: int, out_size: int | None = None) -> torch.Tensor:
    """Bicubic down to ``size``×``size`` and back up, both as PIL's ``Image.resize(..., BICUBIC)`` does it.

    This is the low-resolution synthesis of LRFR Sec. 3.1 (7/14/20 px) and of the LR benchmarks. Both steps use
    PyTorch's antialiased bicubic, which is PIL's filter (Keys cubic, a = −0.5, support scaled by the
    down-sampling factor). For the *up* step that matters too: PyTorch's plain ``mode="bicubic"`` uses
    a = −0.75 (OpenCV's), which differed from PIL and DALI by 0.0075 mean |Δ| at 7 px on LFW faces.
    ``tests/unit/test_augment.py`` checks the result against PIL (float mode) within 1e-6 on a [0, 1] scale.
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


# --------------------------------------------------------------------------- AdaFace low-resolution rescale

LOWRES_HALF_WIDTH = {"linear": 1, "cubic": 2, "lanczos": 3}  # kernel radius in source px (never widened)
NN_ROI_SHIFT = 1.0 / 512  # DALI nearest: source origin shifted by this (see resample_nearest_index)


def _kernel(name: str, t: torch.Tensor) -> torch.Tensor:
    """Triangle, Keys cubic (a = -0.5, PIL's and DALI's), Lanczos-3: the filters of DALI's INTERP_* types."""
    t = t.abs()
    if name == "linear":
        return (1.0 - t).clamp(min=0.0)
    if name == "cubic":
        a = -0.5
        inner = (a + 2) * t**3 - (a + 3) * t**2 + 1
        outer = a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return torch.where(t < 1, inner, torch.where(t < 2, outer, torch.zeros_like(t)))
    if name == "lanczos":
        return torch.where(t < 3, torch.sinc(t) * torch.sinc(t / 3), torch.zeros_like(t))
    raise ValueError(f"unknown resampling filter {name!r}")


@functools.lru_cache(maxsize=512)
def resample_matrix(n_in: int, n_out: int, name: str) -> torch.Tensor:
    """(n_out, n_in) float64 weights of a 1-D resize *without antialiasing* (the kernel keeps its width when
    down-sampling, as OpenCV's resize and DALI's ``antialias=False``): output pixel i samples the source at
    ``c = (i + 0.5)·n_in/n_out − 0.5`` (pixel centres aligned), taps ``j`` with ``|j − c| < radius`` weighted
    by the kernel and normalised to sum 1, taps outside the image clamped to the edge pixel (replicate
    border, as DALI and OpenCV; PIL instead drops them and renormalises)."""
    half = LOWRES_HALF_WIDTH[name]
    c = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
    j = torch.floor(c)[:, None] + torch.arange(-half + 1, half + 1, dtype=torch.float64)[None, :]
    w = _kernel(name, j - c[:, None])
    w = w / w.sum(1, keepdim=True)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m.scatter_add_(1, j.clamp(0, n_in - 1).long(), w)
    return m


def resample_nearest_index(n_in: int, n_out: int) -> torch.Tensor:
    """Centre-aligned nearest neighbour: source ``floor((i + 0.5)·n_in/n_out)``, in exact integer arithmetic
    (PyTorch's ``nearest-exact``, OpenCV's ``INTER_NEAREST_EXACT``; not OpenCV's ``INTER_NEAREST``, which
    takes ``floor(i·n_in/n_out)``). DALI evaluates the same expression in float32 and could land on the
    wrong side of exact ties (e.g. 112 → 22 px); the DALI loader shifts its source origin by
    :data:`NN_ROI_SHIFT` (1/512 px, more than its float32 error and less than the 1/(2·n_out) gap to the
    next non-tie value), which makes its result this exact one."""
    return ((2 * torch.arange(n_out) + 1) * n_in) // (2 * n_out)


def resize_square(img: torch.Tensor, size: int, name: str) -> torch.Tensor:
    """(…, H, W) → (…, size, size) with one of :data:`LOWRES_HALF_WIDTH`'s filters or ``"nearest"``
    (the same size is a copy, as in OpenCV; every filter is the identity there up to rounding)."""
    if img.shape[-2:] == (size, size):
        return img.clone()
    if name == "nearest":
        iy = resample_nearest_index(img.shape[-2], size)
        ix = resample_nearest_index(img.shape[-1], size)
        return img[..., iy, :][..., ix]
    my = resample_matrix(img.shape[-2], size, name)
    mx = resample_matrix(img.shape[-1], size, name)
    out = torch.matmul(torch.matmul(my, img.double()), mx.T)
    return out.to(img.dtype)


def low_res(img: torch.Tensor, small: int, down: str, up: str, out_size: int | None = None) -> torch.Tensor:
    """AdaFace's ``low_res_augmentation`` for a drawn side: resize to ``small``×``small`` with ``down``, back to
    ``out_size`` (default: the input size) with ``up``; each result clamped to [0, 1] (OpenCV saturates the
    uint8 images AdaFace resizes). Images in [0, 1]; see the augment module doc for the deviations."""
    out_size = out_size or img.shape[-1]
    x = resize_square(img, small, down).clamp(0.0, 1.0)
    return resize_square(x, out_size, up).clamp(0.0, 1.0)


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
