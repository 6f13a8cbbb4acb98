"""Images → embeddings, the one way every evaluation does it (insightface ``eval/verification.py``): uint8 RGB scaled
to [-1, 1], each image and its horizontal flip embedded; images of another size resized (bilinear) to the network's
input; a non-finite embedding is a one-line error naming the set."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.preprocessing import normalize

from data_prep.manifest import DataError
from pipeline.faces.io import decode_image
from pipeline.models.network import to_model_input  # the one definition (the models room owns it)

EmbedFn = Callable[[torch.Tensor], torch.Tensor]


def stack_images(images: list[np.ndarray], where: str, image_size: int | None) -> torch.Tensor:
    """uint8 (N, S, S, 3) of decoded images, each of another size resized to ``image_size`` (None: the first's)."""
    from PIL import Image

    if not images:
        raise DataError(f"{where}: no images")
    size = image_size or images[0].shape[0]
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        if im.shape[:2] != (size, size):  # insightface resizes mismatching images too
            im = np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
        out[i] = im
    return torch.from_numpy(out)


def read_file(path: Path) -> bytes:
    """A file's bytes; a one-line DataError naming the file when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None


def read_image(path: Path) -> np.ndarray:
    """One image file decoded to uint8 RGB; a one-line DataError naming the file otherwise."""
    return decode_image(read_file(path), str(path))


@torch.inference_mode()
def embed_images(
    embed_fn: EmbedFn,
    images_u8: torch.Tensor,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool | str = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, embeddings of the horizontally flipped images), float32 numpy (N, D) each. ``progress``: a bar on
    a terminal, a periodic line with an ETA in a log (:mod:`pipeline.progress`); a string names the work."""
    from pipeline.progress import progress as report

    plain, flipped = [], []
    starts = range(0, len(images_u8), batch_size)
    desc = progress if isinstance(progress, str) else "embed"
    for s in report(starts, len(starts), desc, enabled=bool(progress)):
        x = to_model_input(images_u8[s : s + batch_size]).to(device)
        plain.append(embed_fn(x).float().cpu())
        flipped.append(embed_fn(torch.flip(x, dims=[3])).float().cpu())
    return torch.cat(plain).numpy(), torch.cat(flipped).numpy()


def check_finite(emb: np.ndarray, emb_flip: np.ndarray | None, name: str = "set") -> None:
    """One-line DataError naming the set when any embedding (or its flipped twin) holds NaN/inf."""
    bad = ~np.isfinite(emb).all(axis=1)
    if emb_flip is not None:
        bad |= ~np.isfinite(emb_flip).all(axis=1)
    if bad.any():
        raise DataError(
            f"{name}: {int(bad.sum())} of {len(bad)} embeddings are not finite (NaN/inf: a diverged model?)"
        )


def embed_paths(
    embed_fn: EmbedFn,
    paths: list[Path],
    image_size: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """L2-normalised flip-summed embeddings (float32, (N, D)) of image files, decoded a batch at a
    time (a 160 k-image gallery never sits decoded in memory), resized to ``image_size``."""
    from pipeline.progress import progress as report

    out = []
    starts = range(0, len(paths), batch_size)
    for s in report(starts, len(starts), "embed", enabled=progress):  # a bar on a terminal, lines in a log
        batch = paths[s : s + batch_size]
        images = stack_images([read_image(p) for p in batch], str(batch[0]), image_size)
        plain, flipped = embed_images(embed_fn, images, batch_size, device)
        check_finite(plain, flipped, f"{batch[0]} (batch of {len(batch)})")
        out.append(normalize(plain + flipped).astype(np.float32))
    return np.concatenate(out)
