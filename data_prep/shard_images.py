"""One sample's encoded image bytes: their real format (the tar member's extension) and their CRC-32 (``<key>.crc``).

The loaders check the CRC (:func:`check_crc`), so an image whose bytes were damaged after sharding — a flipped bit in
the JPEG body, which decoders decode into a wrong picture without an error — is skipped and counted instead of trained
on.
"""

from __future__ import annotations

import io
import zlib

from data_prep.manifest import IMAGE_EXTENSIONS, DataError
from data_prep.shard_source import BadRecord

#: PIL format → tar extension. Loaders should accept every value here (``jpg`` and ``png`` in practice).
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "WEBP": "webp", "TIFF": "tif", "GIF": "gif"}
_PNM_EXT = {b"P1": "pbm", b"P4": "pbm", b"P2": "pgm", b"P5": "pgm", b"P3": "ppm", b"P6": "ppm"}
assert set(FORMAT_EXTENSIONS.values()) | set(_PNM_EXT.values()) == set(IMAGE_EXTENSIONS)


def image_crc(data: bytes) -> str:
    """The ``<key>.crc`` member of a sample: CRC-32 of its image bytes as 8 lowercase hex digits."""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def check_crc(data: bytes, stored: bytes) -> None:
    """Raise DataError unless ``data`` has the CRC-32 recorded in a ``<key>.crc`` member."""
    want = stored.decode("ascii", "replace").strip().lower()
    got = image_crc(data)
    if got != want:
        raise DataError(f"image bytes fail their checksum (crc32 {got}, recorded {want}): damaged after sharding")


def image_ext(data: bytes, verify: str = "decode") -> str:
    """Extension of an encoded image's real format; raises BadRecord('undecodable') if it is not one.

    ``verify``: 'decode' fully decodes (JPEG in draft mode at 1/8 scale: every entropy-coded
    byte is still parsed, so truncation and corrupt data are caught at a fraction of the cost);
    'header' only parses the header (PIL ``verify``); 'none' trusts the magic bytes.
    """
    if not data:
        raise BadRecord("undecodable", "empty image")
    if verify == "none":
        if data[:3] == b"\xff\xd8\xff":
            return "jpg"
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return "png"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if verify == "decode":
                if fmt == "JPEG":
                    im.draft(
                        im.mode if im.mode in ("L", "RGB") else "RGB", (max(1, im.width // 8), max(1, im.height // 8))
                    )
                im.load()
            elif verify == "header":
                im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadRecord("undecodable", f"undecodable image ({str(exc)[:80]})") from None
    except Exception as exc:  # PIL raises assorted errors on garbage; any of them means "bad image"
        raise BadRecord("undecodable", f"undecodable image ({type(exc).__name__}: {str(exc)[:80]})") from None
    if fmt == "PPM":
        return _PNM_EXT.get(data[:2], "ppm")
    if fmt not in FORMAT_EXTENSIONS:
        raise BadRecord("unsupported_format", f"image format {fmt} is not supported by the loaders")
    return FORMAT_EXTENSIONS[fmt]
