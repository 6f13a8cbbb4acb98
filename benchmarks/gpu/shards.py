"""The LFW faces (../shared/data, or $LOWQ_SHARED/data) as WebDataset shards: what the loader, training and DALI
parts of bench_gpu and benchmarks.bench_loaders read."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.common import REPO


def default_shared() -> Path:
    """Where the LFW faces are: $LOWQ_SHARED/data (as tests/conftest.py reads it; gpu_check.sh points it at the
    copy carried to the GPU machine), else ../shared/data beside the checkout."""
    env = os.environ.get("LOWQ_SHARED")
    return Path(env) / "data" if env else REPO.parent / "shared" / "data"


def make_shards(
    root: Path, shared: Path, repeat: int = 1, num_classes: int | None = None, per_shard: int = 512
) -> Path:
    """The LFW training faces (1,814 JPEGs, 111 people) as WebDataset shards,
    each image written ``repeat`` times under distinct keys: one epoch at batch 512 must be long enough that
    the loaders' per-epoch start-up (DataLoader workers, a fresh DALI pipeline) is not what is timed. The
    manifest may claim more classes than the faces have (classes without images), so that the training-step
    classifier has realistic rows."""
    import webdataset as wds

    from data_prep.manifest import Manifest, ShardInfo, sha256_file, write_manifest

    lfw = shared / "lfw_view1_112" / "train_112"
    if not lfw.is_dir():
        raise SystemExit(f"bench_gpu: no LFW faces at {lfw}: pass --shared DIR (the folder holding lfw_view1_112/)")
    people = sorted(p for p in lfw.iterdir() if p.is_dir())
    files = [(f, c) for c, p in enumerate(people) for f in sorted(p.glob("*.jpg"))]
    samples = [(f, c, r) for r in range(repeat) for f, c in files]
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for i in range(0, len(samples), per_shard):
        name = f"shard-{i // per_shard:06d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for f, c, r in samples[i : i + per_shard]:
                w.write(
                    {
                        "__key__": f"{c:04d}_{f.stem}_r{r}",
                        "jpg": f.read_bytes(),
                        "cls": str(c).encode(),
                        "src": f.name.encode(),
                    }
                )
        shards.append(ShardInfo(name, len(samples[i : i + per_shard]), sha256_file(root / name)))
    classes = max(len(people), num_classes or 0)
    write_manifest(root, Manifest(num_classes=classes, num_images=len(samples), shards=shards))
    return root
