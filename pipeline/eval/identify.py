"""Closed-set identification (rank-k accuracy and CMC) of a checkpoint.

Every probe image is compared with every gallery image (the gallery's own identities plus any
distractors, which match no probe); a probe's rank is the position of the first gallery image of
its identity when the gallery is sorted by cosine similarity, highest first. CMC(k) is the fraction
of probes whose rank is ≤ k; rank-k accuracy is CMC(k). Features: L2-normalised flip-summed
embeddings, as in :mod:`pipeline.eval.verify`. Closed set: every probe's identity must be in the
gallery (a one-line DataError otherwise). Ties between scores are ordered arbitrarily.

Sources (``python -m pipeline.eval identify``):

* ``--gallery G --probe P [--distractors D ...]``: each a list file of ``<image path> <label>``
  lines (paths relative to the list's folder; ``#`` comments and blank lines skipped; a
  distractor line may omit its label, which is ignored anyway) or a folder laid out
  ``<identity>/<images>`` (searched recursively, identity = sub-folder name).
* ``--tinyface ROOT`` (TinyFace, Cheng et al. 2018): ``ROOT/Testing_Set/{Gallery_Match, Probe,
  Gallery_Distractor}`` (or those three folders directly under ROOT, as in an aligned copy).
  Identity = the integer before the first ``_`` of a Gallery_Match / Probe file name
  (``<id>_<n>.jpg``), as in the public TinyFace evaluation code (e.g. AdaFace's
  ``tinyface_helper.py``); distractor names are not parsed. The testing set holds 3,728 probes vs
  4,443 matches + 153,428 distractors. Images of another size are resized to the network's input
  (bilinear), so the raw (non-square, ~20 px) faces can be given as they are.
* ``--scface ROOT`` (SCface, Grgic et al. 2011): gallery = ``ROOT/mugshot_frontal_cropped_all/
  <id>_frontal.<ext>``; probes = ``ROOT/surveillance_cameras_distance_<d>/cam_<c>/<id>_cam<c>_<d>.<ext>``,
  grouped by the distance index ``<d>`` of the file name (1 = 4.20 m, farthest; 2 = 2.60 m;
  3 = 1.00 m), which must agree with the folder's. Cameras 1-5 (visible light) by default
  (``--scface-cameras``; 6-7 are the infrared ones). ``--scface-finetune N`` holds out the N
  lowest subject ids (the fine-tune split, e.g. 50 of 130) from gallery and probes.

The search keeps the top ``max_rank`` gallery entries per probe while walking the gallery in chunks
(``torch.topk`` per chunk, merged with the running top list), so memory is probes × chunk scores:
3.7 k probes × 16,384 gallery images = 240 MB in float32 whatever the gallery's size. It runs on
CUDA when available (``--device``).

Example::

    python -m pipeline.eval identify --checkpoint runs/r50 --tinyface /data/tinyface --cmc tinyface_cmc.png
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.folder2wds import image_files
from data_prep.manifest import DataError, sha256_file
from pipeline.config import ConfigError
from pipeline.core.device import resolve_device
from pipeline.eval.arguments import add_model_arguments
from pipeline.eval.embed import embed_paths
from pipeline.eval.sets import ImageSet, concat_image_sets, read_image_set

RANKS = (1, 5, 10, 20)
DEFAULT_CHUNK = 16384
DISTRACTOR = -1  # label of a distractor: equal to no probe's label (probe labels are ≥ 0)

TINYFACE_FOLDERS = ("Gallery_Match", "Probe", "Gallery_Distractor")
SCFACE_MUGSHOTS = "mugshot_frontal_cropped_all"
SCFACE_DISTANCES = {1: "d1", 2: "d2", 3: "d3"}
SCFACE_VISIBLE_CAMERAS = (1, 2, 3, 4, 5)
_SCFACE_MUGSHOT = re.compile(r"^(\d+)_frontal$", re.IGNORECASE)
_SCFACE_PROBE = re.compile(r"^(\d+)_cam(\d+)_(\d+)$", re.IGNORECASE)


# --------------------------------------------------------------------------- protocols


@dataclass
class IdentificationSet:
    """One gallery (+ distractors) searched by one or more named probe sets."""

    gallery: ImageSet
    probes: dict[str, ImageSet]
    distractors: ImageSet | None = None


def read_lists(
    gallery: str | Path, probe: str | Path, distractors: list[str | Path] | None = None
) -> IdentificationSet:
    """The generic protocol: one gallery, one probe set (named after its file), optional distractors."""
    gallery_set, probe_set = read_image_set(gallery), read_image_set(probe)
    dis = [read_image_set(d, labelled=False) for d in distractors or []]
    return IdentificationSet(gallery_set, {Path(probe).stem: probe_set}, concat_image_sets(dis) if dis else None)


def _tinyface_label(path: Path) -> str:
    prefix = path.stem.split("_")[0]
    if not prefix.isdigit():
        raise DataError(f"{path}: TinyFace file names are '<id>_<n>.<ext>' with an integer id")
    return str(int(prefix))


def read_tinyface(root: str | Path) -> IdentificationSet:
    """TinyFace's testing set read from its folders (layout in the module docstring)."""
    root = Path(root)
    base = root / "Testing_Set" if (root / "Testing_Set").is_dir() else root
    folders = {name: base / name for name in TINYFACE_FOLDERS}
    for folder in folders.values():
        if not folder.is_dir():
            raise DataError(f"{folder}: TinyFace folder does not exist (expected {'/'.join(TINYFACE_FOLDERS)})")
    sets = {}
    for name, folder in folders.items():
        files = image_files(folder)
        if not files:
            raise DataError(f"{folder}: holds no images")
        labels = [_tinyface_label(p) for p in files] if name != "Gallery_Distractor" else [""] * len(files)
        sets[name] = ImageSet(files, labels, str(folder))
    return IdentificationSet(sets["Gallery_Match"], {"tinyface": sets["Probe"]}, sets["Gallery_Distractor"])


def read_scface(
    root: str | Path, finetune_subjects: int = 0, cameras: tuple[int, ...] = SCFACE_VISIBLE_CAMERAS
) -> IdentificationSet:
    """SCface: mugshot gallery, probes grouped by distance d1/d2/d3 (layout in the module docstring)."""
    root = Path(root)
    mug_dir = root / SCFACE_MUGSHOTS
    if not mug_dir.is_dir():
        raise DataError(f"{mug_dir}: SCface mugshot folder does not exist")
    mugshots: dict[int, Path] = {}
    for p in image_files(mug_dir):
        m = _SCFACE_MUGSHOT.match(p.stem)
        if not m:
            raise DataError(f"{p}: SCface mugshot names are '<id>_frontal.<ext>'")
        mugshots[int(m.group(1))] = p
    if not mugshots:
        raise DataError(f"{mug_dir}: holds no mugshots")
    held_out = set(sorted(mugshots)[:finetune_subjects])  # the lowest ids are the fine-tune split
    probes: dict[int, list[tuple[Path, int]]] = {d: [] for d in SCFACE_DISTANCES}
    for d in SCFACE_DISTANCES:
        dist_dir = root / f"surveillance_cameras_distance_{d}"
        if not dist_dir.is_dir():
            raise DataError(f"{dist_dir}: SCface probe folder does not exist")
        for p in image_files(dist_dir):
            m = _SCFACE_PROBE.match(p.stem)
            if not m:
                raise DataError(f"{p}: SCface probe names are '<id>_cam<c>_<d>.<ext>'")
            subject, camera, distance = (int(g) for g in m.groups())
            if distance != d:
                raise DataError(f"{p}: distance index {distance} in the name, but the folder is distance {d}")
            if camera in cameras and subject not in held_out:
                probes[d].append((p, subject))
    gallery_ids = sorted(set(mugshots) - held_out)
    if not gallery_ids:
        raise DataError(f"{mug_dir}: no subjects left after holding out {finetune_subjects} for fine-tuning")
    gallery = ImageSet([mugshots[i] for i in gallery_ids], [str(i) for i in gallery_ids], str(mug_dir))
    probe_sets = {}
    for d, name in SCFACE_DISTANCES.items():
        if not probes[d]:
            raise DataError(f"{root / f'surveillance_cameras_distance_{d}'}: no probes of cameras {list(cameras)}")
        paths, subjects = zip(*probes[d])
        source = str(root / f"surveillance_cameras_distance_{d}")
        probe_sets[name] = ImageSet(list(paths), [str(s) for s in subjects], source)
    return IdentificationSet(gallery, probe_sets)


def integer_labels(protocol: IdentificationSet) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """(gallery labels, distractor labels (all DISTRACTOR), {probe set: labels}) as int64 arrays.

    A probe identity missing from the gallery is a DataError naming the probe source (closed set)."""
    if not len(protocol.gallery):
        raise DataError(f"{protocol.gallery.source}: empty gallery")
    ids = {name: i for i, name in enumerate(sorted(set(protocol.gallery.labels)))}
    gallery = np.array([ids[lab] for lab in protocol.gallery.labels], dtype=np.int64)
    distractors = np.full(len(protocol.distractors), DISTRACTOR, np.int64) if protocol.distractors else None
    probes = {}
    for name, ps in protocol.probes.items():
        missing = sorted({lab for lab in ps.labels if lab not in ids})
        if missing:
            raise DataError(
                f"{ps.source}: {sum(lab not in ids for lab in ps.labels)} of {len(ps)} probes have an identity "
                f"that is not in the gallery {protocol.gallery.source} (e.g. {missing[0]!r}); closed-set "
                "identification needs every probe's identity in the gallery"
            )
        probes[name] = np.array([ids[lab] for lab in ps.labels], dtype=np.int64)
    return gallery, distractors, probes


# --------------------------------------------------------------------------- features


# --------------------------------------------------------------------------- search


def rank_k_cmc(
    probe_feats: np.ndarray | torch.Tensor,
    probe_labels: np.ndarray,
    gallery_feats: np.ndarray | torch.Tensor,
    gallery_labels: np.ndarray,
    max_rank: int = 20,
    chunk: int = DEFAULT_CHUNK,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """CMC: ``cmc[k-1]`` = fraction of probes whose first same-label gallery entry is at rank ≤ k,
    for k = 1..max_rank. Similarity = inner product of the features as given (normalise them first
    for cosine), in their dtype. The gallery is walked ``chunk`` rows at a time, keeping only each
    probe's best ``max_rank`` entries, so memory is probes × (chunk + max_rank) scores."""
    if max_rank < 1 or chunk < 1:
        raise ConfigError(f"max_rank and chunk must be ≥ 1, got {max_rank} and {chunk}")
    probes = torch.as_tensor(probe_feats).to(device)
    gallery = torch.as_tensor(gallery_feats)
    n_probes, n_gallery = probes.shape[0], gallery.shape[0]
    if n_gallery == 0:
        raise DataError("empty gallery")
    best_scores = probes.new_empty((n_probes, 0))
    best_index = torch.empty((n_probes, 0), dtype=torch.long, device=probes.device)
    for start in range(0, n_gallery, chunk):
        scores = probes @ gallery[start : start + chunk].to(probes.device, probes.dtype).T
        top_scores, top_index = scores.topk(min(max_rank, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, top_scores], dim=1)
        merged_index = torch.cat([best_index, top_index + start], dim=1)
        best_scores, pos = merged_scores.topk(min(max_rank, merged_scores.shape[1]), dim=1)
        best_index = merged_index.gather(1, pos)
    ranked_labels = np.asarray(gallery_labels)[best_index.cpu().numpy()]  # (P, min(max_rank, G)), best first
    hit = ranked_labels == np.asarray(probe_labels)[:, None]
    first_hit = np.where(hit.any(axis=1), hit.argmax(axis=1), max_rank)  # 0-based rank; max_rank = beyond
    return np.cumsum(np.bincount(first_hit, minlength=max_rank + 1)[:max_rank]) / max(n_probes, 1)


def evaluate_identification(
    embed_fn,
    protocol: IdentificationSet,
    image_size: int,
    max_rank: int = 20,
    chunk: int = DEFAULT_CHUNK,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
    keep_duplicates: bool = False,
) -> list[dict]:
    """One row per probe set: ``{"set", "probes", "gallery", "distractors", "rank": {k: acc or None}, "cmc",
    "trivial_from_rank", "duplicates", "duplicates_excluded"}``.

    Each distinct image file is embedded once (SCface's probe sets share the gallery). A probe image byte-identical
    to a searched gallery image is counted and, unless ``keep_duplicates``, left out (it would score rank 1 by
    construction). Ranks at or beyond :func:`trivial_rank` are None (n/a): the gallery is too small for them."""
    gallery_labels, distractor_labels, probe_labels = integer_labels(protocol)
    sets = (
        [protocol.gallery] + ([protocol.distractors] if protocol.distractors else []) + list(protocol.probes.values())
    )
    unique = list(dict.fromkeys(p for s in sets for p in s.paths))
    feats = embed_paths(embed_fn, unique, image_size, batch_size, device, progress)
    row_of = {p: i for i, p in enumerate(unique)}

    def feats_of(s: ImageSet) -> np.ndarray:
        return feats[[row_of[p] for p in s.paths]]

    searched = protocol.gallery.paths + (protocol.distractors.paths if protocol.distractors else [])
    gallery_feats = feats[[row_of[p] for p in searched]]
    all_labels = np.concatenate([gallery_labels] + ([distractor_labels] if distractor_labels is not None else []))
    # sha256 of the files: a probe that *is* a gallery image scores rank 1 by construction
    gallery_digests = {sha256_file(p) for p in searched}
    rows = []
    for name, ps in protocol.probes.items():
        labels = probe_labels[name]
        duplicate = np.array([sha256_file(p) in gallery_digests for p in ps.paths], dtype=bool)
        keep = np.ones(len(ps), dtype=bool) if keep_duplicates else ~duplicate
        probe_feats = feats_of(ps)[keep]
        cmc = rank_k_cmc(probe_feats, labels[keep], gallery_feats, all_labels, max_rank, chunk, device)
        trivial = trivial_rank(labels[keep], all_labels)
        rows.append(
            {
                "set": name,
                "probes": int(keep.sum()),
                "gallery": len(searched),
                "distractors": len(protocol.distractors) if protocol.distractors else 0,
                # rank-k from `trivial` on finds every probe by construction (too small a gallery): n/a
                "rank": {k: (float(cmc[k - 1]) if k < trivial else None) for k in RANKS if k <= max_rank},
                "trivial_from_rank": int(trivial),
                "duplicates": int(duplicate.sum()),
                "duplicates_excluded": 0 if keep_duplicates else int(duplicate.sum()),
                "cmc": cmc.tolist(),
            }
        )
    return rows


def trivial_rank(probe_labels: np.ndarray, gallery_labels: np.ndarray) -> int:
    """The smallest k at which every probe is found whatever the features: a probe's first same-identity entry
    can sit at most behind all the other identities' entries, so rank-k with k ≥ max over probes of
    (entries − entries of its identity + 1) is 100 % by construction. Probes whose identity is absent never count."""
    entries = len(gallery_labels)
    ids, counts = np.unique(gallery_labels, return_counts=True)
    per_id = dict(zip(ids.tolist(), counts.tolist()))
    worst = [entries - per_id[label] + 1 for label in np.asarray(probe_labels).tolist() if label in per_id]
    return max(worst) if worst else entries + 1


# --------------------------------------------------------------------------- output


def format_table(rows: list[dict]) -> str:
    """The rank-k table (accuracies in %; n/a where the gallery is too small for the rank), with a line per set
    that had probe images identical to gallery images."""
    ranks = list(rows[0]["rank"])
    name_w = max(4, *(len(r["set"]) for r in rows))
    head = f"{'set':<{name_w}}  {'probes':>7}  {'gallery':>8}" + "".join(f"  {f'rank-{k}':>7}" for k in ranks)
    lines = [head + "   (%)"]
    notes = []
    for r in rows:
        cells = "".join(f"  {'n/a':>7}" if r["rank"][k] is None else f"  {100 * r['rank'][k]:>7.2f}" for k in ranks)
        lines.append(f"{r['set']:<{name_w}}  {r['probes']:>7}  {r['gallery']:>8}{cells}")
        if any(r["rank"][k] is None for k in ranks):
            notes.append(
                f"{r['set']}: n/a from rank-{r['trivial_from_rank']}: the {r['gallery']}-entry gallery puts every "
                "probe's identity within that rank whatever the features"
            )
        if r.get("duplicates"):
            what = "excluded (--keep-duplicates keeps them)" if r.get("duplicates_excluded") else "kept"
            notes.append(f"{r['set']}: {r['duplicates']} probe image(s) byte-identical to gallery images: {what}")
    return "\n".join(lines + notes)


def plot_cmc(rows: list[dict], path: str | Path, title: str = "") -> None:
    """CMC curves (identification rate vs rank) of every probe set into one PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for r in rows:
        ranks = np.arange(1, len(r["cmc"]) + 1)
        ax.plot(ranks, 100 * np.asarray(r["cmc"]), marker=".", label=f"{r['set']} (rank-1 {100 * r['cmc'][0]:.2f} %)")
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate (%)")
    ax.set_xlim(1, max(len(r["cmc"]) for r in rows))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # ranks are whole numbers
    if title:
        ax.set_title(title, fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def add_identify_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``identify`` on the ``python -m pipeline.eval`` sub-parsers; returns the parser."""
    p = subparsers.add_parser(
        "identify",
        help="closed-set identification: rank-1/5/10/20 and the CMC curve (lists, TinyFace, SCface)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gallery", help="gallery: a list of '<image path> <label>' lines or an <identity>/ folder")
    src.add_argument("--tinyface", help="TinyFace root (holding Testing_Set/, or its three folders)")
    src.add_argument("--scface", help="SCface root (mugshot_frontal_cropped_all/, surveillance_cameras_distance_*/)")
    p.add_argument("--probe", help="probes for --gallery: a list or an identity folder")
    p.add_argument(
        "--distractors", nargs="+", default=[], help="distractor lists/folders for --gallery (labels unused)"
    )
    p.add_argument("--scface-finetune", type=int, default=0, help="hold out the N lowest SCface ids (fine-tune split)")
    p.add_argument(
        "--scface-cameras", type=int, nargs="+", default=list(SCFACE_VISIBLE_CAMERAS), help="default: 1 2 3 4 5"
    )
    p.add_argument("--max-rank", type=int, default=20, help="CMC up to this rank (default 20)")
    p.add_argument(
        "--keep-duplicates",
        action="store_true",
        help="keep probe images byte-identical to gallery images (default: counted, reported and left out)",
    )
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="gallery images scored at a time (memory)")
    p.add_argument("--cmc", help="write the CMC curves to this PNG (default: beside --json)")
    p.add_argument("--json", help="write the table and the CMC arrays to this JSON file")
    return p


def run_identify(args) -> list[dict]:
    """Run the ``identify`` subcommand; prints the rank-k table, returns its rows."""
    from pipeline.eval.checkpoint import embedder_from_args

    if args.gallery and not args.probe:
        raise ConfigError("--gallery needs --probe (the probe list or folder)")
    if (args.probe or args.distractors) and not args.gallery:
        raise ConfigError("--probe and --distractors go with --gallery (TinyFace and SCface read their own)")
    if args.scface_finetune < 0:
        raise ConfigError(f"--scface-finetune must be ≥ 0 subjects, got {args.scface_finetune}")
    if args.max_rank < 1 or args.chunk < 1:
        raise ConfigError(f"--max-rank and --chunk must be ≥ 1, got {args.max_rank} and {args.chunk}")
    if args.tinyface:
        protocol = read_tinyface(args.tinyface)
    elif args.scface:
        protocol = read_scface(args.scface, args.scface_finetune, tuple(args.scface_cameras))
    else:
        protocol = read_lists(args.gallery, args.probe, args.distractors)
    device = resolve_device(args.device)
    net, info = embedder_from_args(args, device)
    rows = evaluate_identification(
        net,
        protocol,
        info["input_size"],
        args.max_rank,
        args.chunk,
        args.batch_size,
        device,
        progress=not args.no_progress,
        keep_duplicates=args.keep_duplicates,
    )
    print(format_table(rows), flush=True)
    cmc_png = args.cmc or (str(Path(args.json).with_suffix("")) + "_cmc.png" if args.json else None)
    if cmc_png:
        plot_cmc(rows, cmc_png, info["checkpoint"])
        print(f"CMC: {cmc_png}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**info, "results": rows}, indent=1) + "\n")
        print(f"JSON: {args.json}")
    return rows
