"""DALI operators of the augmentation spec's pixel operations, each the counterpart of a function of
:mod:`pipeline.data.augment` or :mod:`pipeline.data.degrade` on DataNodes (tests/unit/test_augment.py checks them
against the torch engine): the multi-resolution size draw, the low-resolution down-and-up resize with per-sample
interpolations, and the Cutout square. The DALI graph that uses them: :func:`pipeline.data.dali_loader.build_pipeline`.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.augment import resolution_probs
from pipeline.data.degrade import NN_ROI_SHIFT


def dali_draw_resolution(sizes, weights):
    """DALI op: one LR size per sample with probabilities ∝ weights (LRFR 4.1: 7:14:20 = 1:1:2)."""
    from nvidia.dali import fn

    return fn.random.choice(np.asarray(sizes, np.float32), p=[float(p) for p in resolution_probs(sizes, weights)])


# lowres_interp names → DALI interpolation types (the filters of pipeline.data.degrade.resize_square)
DALI_INTERP = {"nearest": "INTERP_NN", "linear": "INTERP_LINEAR", "cubic": "INTERP_CUBIC", "lanczos": "INTERP_LANCZOS3"}


def dali_interp_codes(names) -> np.ndarray:
    """int32 DALI interpolation codes of ``lowres_interp`` names, for ``fn.random.choice``."""
    from nvidia.dali import types

    return np.array([int(getattr(types, DALI_INTERP[n])) for n in names], np.int32)


def dali_low_res(img, small, down, up, size: int):
    """DALI op of :func:`pipeline.data.degrade.low_res`: HWC float ``img`` (S×S) resized to ``small``×``small``
    (float) with interpolation code ``down`` (int32), back to S×S with ``up``, each clamped to [0, 1].

    ``antialias=False`` keeps every kernel at its width (OpenCV's resize). Nearest neighbour gets its source
    origin shifted by ``NN_ROI_SHIFT`` px (``roi_start``/``roi_end``): DALI computes ``floor((i + ½)·scale)``
    in float32, which can fall on either side of an exact tie; the shift makes it the exact value.
    """
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    nn = int(types.INTERP_NN)

    def resize(x, out, code, n_in):
        shift = fn.cast(code == nn, dtype=types.FLOAT) * NN_ROI_SHIFT
        start = fn.stack(shift, shift)
        y = fn.resize(
            x,
            resize_x=out,
            resize_y=out,
            interp_type=fn.cast(code, dtype=types.INTERP_TYPE),
            antialias=False,
            roi_start=start,
            roi_end=start + n_in,
            roi_relative=False,
        )
        return dmath.clamp(y, 0.0, 1.0)

    return resize(resize(img, small, down, float(size)), float(size), up, small)


def dali_cutout(img, y0, x0, h, w, mirror, size: int):
    """DALI op of :func:`pipeline.data.augment.cutout` for a box drawn in the *mirrored* frame: the DALI loader
    mirrors at the very end, so when ``mirror`` is 1 the columns ``[x0, x0+w)`` become ``[S-x0-w, S-x0)``."""
    from nvidia.dali import fn

    if not (isinstance(mirror, (int, float)) and mirror == 0):
        x0 = x0 + mirror * (float(size) - 2.0 * x0 - w)
    return fn.erase(img, anchor=fn.stack(y0, x0), shape=fn.stack(h, w), axis_names="HW", fill_value=0.0)


def dali_cutout_box(side: int, size: int, u_y=None, u_x=None):
    """(y0, x0, h, w) float DataNodes of :func:`pipeline.data.augment.cutout_box` from two U(0,1) draws
    (``fn.random.uniform`` unless given)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn

    S, half = float(size), float(side // 2)
    out = []
    for u in (u_y, u_x):
        u = fn.random.uniform(range=[0.0, 1.0]) if u is None else u
        c = dmath.min(S - 1.0, dmath.floor(u * S))
        lo, hi = dmath.max(0.0, c - half), dmath.min(S, c - half + float(side))
        out.append((lo, hi - lo))
    (y0, h), (x0, w) = out
    return y0, x0, h, w


__all__ = ["DALI_INTERP", "dali_cutout", "dali_cutout_box", "dali_draw_resolution", "dali_interp_codes", "dali_low_res"]
