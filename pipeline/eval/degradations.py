"""The degradations an evaluation applies on the fly (``verify --degrade``, the low-resolution table, reports): the
``--degrade`` grammar and :class:`Degradation`; the pixels are :func:`pipeline.faces.degrade.degrade_image`'s, the
same as ``data_prep.bin degrade`` writes into copies."""

from __future__ import annotations

import numpy as np

from pipeline.config import ConfigError

#: ``--degrade`` grammar: exactly the degradations ``data_prep.bin degrade`` writes as copies
#: (:func:`pipeline.faces.degrade.degrade_image`: Gaussian blur σ, bicubic down-up to S px; ``*_cross``: only
#: the second image of each pair degraded).
DEGRADE_HELP = (
    "clean | blur:SIGMA | lr:PX | cross:PX (first image clean, second at PX) | blur-cross:SIGMA "
    "(first image clean, second blurred) | occ-eyes | occ-mask (sunglasses / face-mask proxy bands, default "
    "geometry) | occ-eyes-cross | occ-mask-cross; the degradations of 'python -m data_prep.bin degrade'"
)
#: occlusions that depend on the image alone (``data_prep.bin`` default geometry), so ``--degrade`` can
#: apply them on the fly; the random ones depend on the image's index and set (written copies only)
OCCLUSION_BANDS = ("occ-eyes", "occ-mask")
RANDOM_OCCLUSIONS = ("occ-black", "occ-noise", "occ-face")


class Degradation(tuple):
    """``(kind, level, cross)``: kind ``clean`` | ``blur`` | ``lr`` | ``occ-eyes`` | ``occ-mask`` (level None);
    ``cross``: only image 2 of a pair."""

    __slots__ = ()

    def __new__(cls, kind: str, level: float | None = None, cross: bool = False):
        return super().__new__(cls, (kind, level, cross))

    kind = property(lambda self: self[0])
    level = property(lambda self: self[1])
    cross = property(lambda self: self[2])

    @property
    def image_key(self) -> tuple:
        """What is done to a degraded image (the same for the full and the cross setting)."""
        return (self.kind, self.level)

    @property
    def label(self) -> str:
        if self.kind == "clean":
            return "clean"
        if self.level is None:  # an occlusion band: no level
            return f"{self.kind}-cross" if self.cross else self.kind
        lvl = f"{self.level:g}"
        if self.cross:
            return f"cross:{lvl}" if self.kind == "lr" else f"{self.kind}-cross:{lvl}"
        return f"{self.kind}:{lvl}"


def parse_degradation(spec: str) -> Degradation:
    """``clean``, ``blur:σ``, ``lr:S``, ``cross:S`` (= ``lr-cross:S``), ``blur-cross:σ``, ``occ-eyes``,
    ``occ-mask`` (``-cross``: second image only); ConfigError otherwise."""
    s = spec.strip().lower()
    if s == "clean":
        return Degradation("clean")
    band = s.removesuffix("-cross")
    if band in OCCLUSION_BANDS:
        return Degradation(band, None, s != band)
    if band.partition(":")[0] in RANDOM_OCCLUSIONS:
        raise ConfigError(
            f"--degrade {spec!r}: random occlusions depend on the image's index and set; write copies with "
            f"'python -m data_prep.bin degrade --occlude {band.partition(':')[0][4:]}' and pass them with --bin"
        )
    head, sep, value = s.partition(":")
    kinds = {
        "blur": ("blur", False),
        "lr": ("lr", False),
        "cross": ("lr", True),
        "lr-cross": ("lr", True),
        "blur-cross": ("blur", True),
    }
    if not sep or head not in kinds:
        raise ConfigError(f"--degrade {spec!r}: expected {DEGRADE_HELP}")
    kind, cross = kinds[head]
    try:
        level = float(value)
    except ValueError:
        raise ConfigError(f"--degrade {spec!r}: level {value!r} is not a number") from None
    if kind == "blur" and not (level > 0 and np.isfinite(level)):
        raise ConfigError(f"--degrade {spec!r}: blur σ must be > 0")
    if kind == "lr" and (level != int(level) or level < 1):
        raise ConfigError(f"--degrade {spec!r}: resolution must be a positive whole number of px")
    return Degradation(kind, int(level) if kind == "lr" else level, cross)


def parse_degradations(specs: list[str]) -> list[Degradation]:
    out = list(dict.fromkeys(parse_degradation(s) for s in specs))  # duplicates once, order kept
    if not out:
        raise ConfigError("--degrade: give at least one degradation")
    return out


CLEAN = Degradation("clean")
