"""The one augmentation spec (``data.augment``, :class:`pipeline.config.AugmentConfig`).

Both loaders implement exactly this sequence, the torch loader with the functions below and
the DALI loader with DALI operators (:mod:`pipeline.data.dali_loader`). Images are float
(3, S, S) in [0, 1] until the last step; S is the model input size (112).

0. **decode** the stored bytes to RGB; resize (bicubic, antialiased) to S×S if the stored
   image has another size (aligned 112×112 faces are left untouched).
1. **random rectangle crop**, AdaFace style (Kim et al., CVPR 2022, ``Augmenter.augment``),
   with probability ``crop_p``: a rectangle of area fraction ``a ~ U(crop_scale)`` and aspect
   ratio ``r = exp(U(log 3/4, log 4/3))`` (torchvision ``RandomResizedCrop.get_params``
   ranges) is kept *in place* and everything outside it is set to black (zero padding); the
   image keeps its size and is **not** resized. AdaFace's behaviour, with one simplification
   so that both engines draw identically: instead of torchvision's rejection loop (10 tries,
   then a centre crop), ``w = min(S, round(sqrt(a·S²·r)))`` and ``h = min(S, round(sqrt(a·S²/r)))``
   are clamped; the corner is uniform over the valid positions.
1b. **low-resolution rescale**, AdaFace's ``low_res_augmentation`` (Kim et al., CVPR 2022; LGAF uses
   it with p = 0.2), with probability ``lowres_p``: ``r ~ U(lowres_ratio)`` (AdaFace: [0.2, 1.0]),
   small side ``n = max(1, int(r·S))`` (:func:`lowres_side`); the image is resized to n×n and back
   to S×S, each resize with an interpolation drawn uniformly and independently from
   ``lowres_interp``, each result clamped to [0, 1] (:func:`pipeline.data.degrade.low_res`).
   Position: AdaFace's order (crop, low-res, photometric; its flip comes after, in the
   torchvision transform), i.e. before the flip here, so step 2's symmetry argument does not
   need it. Filters (:mod:`pipeline.data.degrade`), all *without* antialiasing on the way down
   (OpenCV's ``resize`` does not antialias these either), pixel centres aligned, edge pixels
   replicated beyond the border (OpenCV's and DALI's border): ``nearest`` = centre-aligned nearest
   neighbour ``floor((i + ½)·n_in/n_out)``; ``linear`` = OpenCV's ``INTER_LINEAR`` formula (equal to PyTorch's
   ``bilinear``, align_corners=False, within 1e-9; OpenCV itself is not installed here);
   ``cubic`` = Keys cubic with a = −0.5 (PIL's and DALI's); ``lanczos`` = Lanczos-3. DALI:
   ``fn.resize(antialias=False)`` with ``INTERP_NN/LINEAR/CUBIC/LANCZOS3``. Measured DALI (CPU)
   vs torch, max |Δ| on [0, 1] over down+up on LFW faces: nearest 0, linear 3.5e-6, cubic 5.2e-4,
   lanczos 5.1e-4 (DALI tabulates these two kernels at 1/32 px and interpolates linearly).
   **Deviations from AdaFace** (OpenCV): no ``area`` (``INTER_AREA``, the one antialiased
   filter of the five: DALI has no box filter), so the default draws from 4 filters, not 5;
   ``cubic`` uses a = −0.5, not OpenCV's −0.75; ``lanczos`` is Lanczos-3, not OpenCV's
   ``INTER_LANCZOS4``; ``nearest`` is centre-aligned, not OpenCV's ``INTER_NEAREST``
   (``floor(i·n_in/n_out)``, half a source pixel to the top left); float images throughout
   (AdaFace rounds to uint8 after the resize).
2. **horizontal flip** with probability ``flip``. Every later step but 4b is mirror-symmetric
   (global photometric maps, a symmetric Gaussian kernel with symmetric padding, centre-aligned
   bicubic resampling), so the DALI loader may apply the mirror in its final
   ``crop_mirror_normalize`` with identical results; for 4b it mirrors the drawn square
   (``x0 → S − x0 − w``) before erasing, which gives the same pixels.
3. **photometric** with probability ``photometric_p``: factors ``b ~ U(1-brightness, 1+brightness)``,
   ``c ~ U(1-contrast, 1+contrast)``, ``s ~ U(1-saturation, 1+saturation)`` (lower ends
   clipped at 0, torchvision ``ColorJitter`` ranges as AdaFace uses them). In a fixed order:
   brightness+contrast ``x ← clamp(b·(m + c·(x − m)), 0, 1)`` with ``m`` the mean grey level
   of the image (torchvision's contrast centre; equal to torchvision's brightness-then-contrast
   before clamping, and DALI's ``brightness_contrast`` formula), then saturation
   ``x ← clamp(g + s·(x − g), 0, 1)`` with the grey image ``g = 0.299 R + 0.587 G + 0.114 B``.
   (AdaFace draws a random order of the three; the fixed order keeps the engines identical.)
4. **Gaussian blur** with probability ``blur_p``: ``σ ~ U(blur_sigma)``, kernel radius
   ``ceil(3σ)``, reflect-101 borders (:func:`pipeline.data.degrade.gaussian_blur`; SCAN's
   synthetic blur, Sec. 6.4).
4b. **Cutout** (DeVries & Taylor 2017; the image-level baseline of LCD, Table III) with probability
   ``cutout_p``: a centre ``(cy, cx)`` uniform over the S×S pixels, the square of side
   ``cutout_size`` (rows ``[cy − size//2, cy − size//2 + size)``, columns alike) clipped at the
   borders is set to black (0 here, −1 after step 6: the fill of the crop's padding)
   (:func:`cutout_box`, :func:`cutout`). Default side 56 px = 0.5·S, the ratio DeVries & Taylor
   use on CIFAR-10 (16 of 32 px); not from the LCD paper, whose size we do not know. Deviations
   from DeVries & Taylor's code: it zeroes the *normalised* tensor (the dataset-mean colour) where
   this fills black; for an odd side it erases ``2·(size//2)`` px, here exactly ``size``. Placed
   after blur and before multi-resolution: the HR image carries an exact black square (as
   Cutout, the last transform of its recipe, gives), and the LR copy of step 5 is the
   degradation of that occluded image.
5. **multi-resolution** with probability ``multires_p`` (LRFR Sec. 3.1 and 4.1): a size is drawn
   from ``multires_sizes`` with probabilities proportional to ``multires_weights`` (7:14:20 px
   at 1:1:2), the image is resized bicubically down to size×size and back up to S×S
   (:func:`pipeline.data.degrade.bicubic_down_up`, clamped to the image's own range).
6. **normalise** to [-1, 1]: ``x·2 − 1``.

Paired output (``paired: true``, the LRFR recipe): ``image`` is the result of steps 0-4, 1b and
4b included (no multi-resolution), ``image_lr`` is step 5 applied to that same image (same crop,
low-res rescale, flip, photometric, blur and cutout), ``lr_size`` is the drawn size (0 when step 5
was not applied).
Without pairing, ``image`` is the result of all steps and no LR fields are emitted.

Randomness: each sample gets its own :class:`torch.Generator`, seeded from (seed, epoch,
pass, sample key) by :func:`sample_generator`, so the augmentation of a sample does not
depend on the number of workers or on the order in which samples are read.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import AugmentConfig, check
from pipeline.data.degrade import bicubic_down_up, gaussian_blur, low_res

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as DALI's colour ops use
CROP_LOG_RATIO = (math.log(3.0 / 4.0), math.log(4.0 / 3.0))  # torchvision RandomResizedCrop ratio


# --------------------------------------------------------------------------- validation


def validate(cfg: AugmentConfig) -> AugmentConfig:
    """Check the spec's values (:meth:`AugmentConfig.validate`); a bad one is a one-line ConfigError."""
    return check(cfg, "data.augment.")


def resolution_probs(sizes, weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def photometric_ranges(cfg: AugmentConfig) -> list[tuple[float, float]]:
    """torchvision ColorJitter ranges [max(0, 1-v), 1+v] for brightness, contrast, saturation."""
    return [(max(0.0, 1.0 - v), 1.0 + v) for v in (cfg.brightness, cfg.contrast, cfg.saturation)]


# --------------------------------------------------------------------------- randomness


def sample_generator(*parts) -> torch.Generator:
    """A generator seeded from a hash of ``parts`` (seed, epoch, pass, sample key, ...)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()


def _coin(gen: torch.Generator, p: float) -> bool:
    if p <= 0.0:
        return False
    if p >= 1.0:
        return True
    return torch.rand((), generator=gen, dtype=torch.float64).item() < p


def draw_resolution(gen: torch.Generator, sizes, weights) -> int:
    """One LR size drawn from ``sizes`` with probabilities ∝ ``weights`` (LRFR 4.1: 7:14:20 = 1:1:2)."""
    probs = torch.as_tensor(resolution_probs(sizes, weights))
    return int(sizes[int(torch.multinomial(probs, 1, generator=gen).item())])


def crop_box(u_area: float, u_logratio: float, u_x: float, u_y: float, size: int, scale) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) of the kept rectangle from four U(0,1) draws (step 1 of the module doc).

    The DALI loader evaluates the same expressions with DALI arithmetic.
    """
    area = (scale[0] + (scale[1] - scale[0]) * u_area) * size * size
    ratio = math.exp(CROP_LOG_RATIO[0] + (CROP_LOG_RATIO[1] - CROP_LOG_RATIO[0]) * u_logratio)
    w = min(size, int(math.floor(math.sqrt(area * ratio) + 0.5)))
    h = min(size, int(math.floor(math.sqrt(area / ratio) + 0.5)))
    x0 = min(size - w, int(math.floor(u_x * (size - w + 1))))
    y0 = min(size - h, int(math.floor(u_y * (size - h + 1))))
    return y0, x0, h, w


def lowres_side(u: float, size: int, ratio) -> int:
    """Step 1b's small side ``max(1, int(r·S))`` with ``r = low + (high − low)·u`` (AdaFace: ``int(side_ratio·S)``)."""
    r = ratio[0] + (ratio[1] - ratio[0]) * u
    return max(1, int(math.floor(r * size)))


def cutout_box(u_y: float, u_x: float, size: int, side: int) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) of step 4b's square from two U(0,1) draws: centre ``c = min(S−1, floor(u·S))`` per axis
    (uniform over the pixels), rows/columns ``[c − side//2, c − side//2 + side)`` clipped to the image.

    The DALI loader evaluates the same expressions with DALI arithmetic.
    """
    out = []
    for u in (u_y, u_x):
        c = min(size - 1, int(math.floor(u * size)))
        lo, hi = max(0, c - side // 2), min(size, c - side // 2 + side)
        out.append((lo, hi - lo))
    (y0, h), (x0, w) = out
    return y0, x0, h, w


# --------------------------------------------------------------------------- the steps (torch)


def decode(data: bytes, size: int) -> torch.Tensor:
    """Encoded JPEG/PNG bytes → float (3, size, size) in [0, 1] (step 0)."""
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    if x.shape[1] != size or x.shape[2] != size:
        x = F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
        x = x.clamp_(0.0, 1.0)
    return x


def zero_pad_crop(x: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Keep the rectangle (y0, x0, h, w) in place, black elsewhere (AdaFace's crop)."""
    y0, x0, h, w = box
    out = torch.zeros_like(x)
    out[:, y0 : y0 + h, x0 : x0 + w] = x[:, y0 : y0 + h, x0 : x0 + w]
    return out


def gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype).view(3, 1, 1)
    return (x * w).sum(0, keepdim=True)


def photometric(x: torch.Tensor, b: float, c: float, s: float) -> torch.Tensor:
    """Step 3: brightness+contrast about the mean grey level, then saturation about grey."""
    m = gray(x).mean()
    x = (b * (m + c * (x - m))).clamp(0.0, 1.0)
    g = gray(x)
    return (g + s * (x - g)).clamp(0.0, 1.0)


def cutout(x: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Step 4b: the rectangle (y0, x0, h, w) set to black (0), everything else kept."""
    y0, x0, h, w = box
    out = x.clone()
    out[..., y0 : y0 + h, x0 : x0 + w] = 0.0
    return out


@dataclass
class Augmenter:
    """The spec applied to one decoded image with a per-sample generator (torch engine)."""

    cfg: AugmentConfig
    size: int = 112

    def __post_init__(self):
        validate(self.cfg)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> dict:
        cfg, S = self.cfg, self.size
        if _coin(gen, cfg.crop_p):  # 1. AdaFace rectangle crop, zero padded
            u = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
            x = zero_pad_crop(x, crop_box(*u, size=S, scale=cfg.crop_scale))
        if _coin(gen, cfg.lowres_p):  # 1b. AdaFace low-resolution rescale
            small = lowres_side(torch.rand((), generator=gen, dtype=torch.float64).item(), S, cfg.lowres_ratio)
            names = cfg.lowres_interp
            down, up = (names[int(i)] for i in torch.randint(len(names), (2,), generator=gen))
            x = low_res(x, small, down, up, S)
        if _coin(gen, cfg.flip):  # 2. horizontal flip
            x = x.flip(-1)
        if _coin(gen, cfg.photometric_p):  # 3. photometric
            (b0, b1), (c0, c1), (s0, s1) = photometric_ranges(cfg)
            x = photometric(x, _uniform(gen, b0, b1), _uniform(gen, c0, c1), _uniform(gen, s0, s1))
        if _coin(gen, cfg.blur_p):  # 4. Gaussian blur
            x = gaussian_blur(x, _uniform(gen, *cfg.blur_sigma))
        if _coin(gen, cfg.cutout_p):  # 4b. Cutout, black square
            u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
            x = cutout(x, cutout_box(*u, size=S, side=cfg.cutout_size))
        lr, lr_size = x, 0
        if _coin(gen, cfg.multires_p):  # 5. multi-resolution (LRFR Sec. 3.1, 7:14:20 = 1:1:2)
            lr_size = draw_resolution(gen, cfg.multires_sizes, cfg.multires_weights)
            lr = bicubic_down_up(x, lr_size, S)
        if cfg.paired:  # 6. normalise to [-1, 1]
            return {"image": x * 2.0 - 1.0, "image_lr": lr * 2.0 - 1.0, "lr_size": lr_size}
        return {"image": lr * 2.0 - 1.0}
