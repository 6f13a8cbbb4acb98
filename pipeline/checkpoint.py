"""Checkpoints that are atomic and do not pin resume to one world size.

A checkpoint is one directory ``<output.dir>/checkpoints/step_0000100/`` holding

- ``config.yaml``   the resolved config it was trained with (evaluation rebuilds the recipe from it)
- ``model.pt``      state_dict of the FaceNetwork (trunk + inserts + head; what eval/export load)
- ``recipe.pt``     state_dict of the whole training procedure (the network + any procedure parameters)
- ``classifier.pt`` the FULL class-centre matrix and its optimizer state, gathered from all ranks,
                    so that any world size can re-shard it
- ``optimizer_full.pt`` the backbone's optimizer state by parameter name (fp32 master weights, moments,
                    step), assembled from ZeRO's per-rank partitions, so that any world size can re-partition it
- ``trainer.json``  step counters, world size, the data position
- ``deepspeed/``    DeepSpeed's own engine checkpoint (backbone optimizer states, per rank)

All ranks write into ``.tmp_step_0000100`` and rank 0 renames it to the final name after a
barrier, then rewrites ``latest`` (also via rename): a directory with a final name is complete.
Resuming with the same world size restores everything from DeepSpeed's own files; with another world size the
backbone comes from ``recipe.pt`` + ``optimizer_full.pt`` and the classifier from ``classifier.pt``, exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from data_prep.manifest import atomic_write_text, sha256_file
from pipeline.config import ConfigError

LATEST = "latest"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def tmp_name(step: int) -> str:
    return f".tmp_{step_name(step)}"


def step_of(path: Path) -> int | None:
    """The step number of a ``step_0000100`` directory name, else None."""
    name = Path(path).name
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return None


def holds_network(path: Path) -> bool:
    """The two files every network loader reads: ``config.yaml`` and ``model.pt``."""
    return all((Path(path) / f).is_file() for f in ("model.pt", "config.yaml"))


def complete(path: Path) -> bool:
    """A finished checkpoint directory: final name and the files every loader reads (resuming also verifies
    the rest against checksums.json)."""
    return step_of(path) is not None and holds_network(path)


def checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first by step number (not by name)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and complete(p)), key=step_of)


def finalize(root: Path, step: int, keep: int) -> Path:
    """Rank 0: rename the temporary directory, point ``latest`` at it, prune old ones.

    Pruning keeps the ``keep`` newest checkpoints by step number among those at or before ``step`` (this
    run's lineage; a directory of a later step, left by an abandoned earlier run, is never touched) and never
    the one just written."""
    tmp, final = root / tmp_name(step), root / step_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, final.name + "\n")
    ours = [p for p in checkpoints(root) if step_of(p) <= step and p != final]
    for old in ours[: max(0, len(ours) - (max(1, keep) - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve(path_or_root: str | Path) -> Path:
    """A checkpoint directory, or a run's checkpoint root / output dir (→ its ``latest``).

    A ``latest`` that names a missing or incomplete directory falls back, with a warning, to the newest
    complete checkpoint by step number."""
    p = Path(path_or_root)
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            named = root / (root / LATEST).read_text().strip()
            if complete(named):
                return named
            found = checkpoints(root)
            if found:
                warnings.warn(
                    f"{root / LATEST} names {named.name}, which is missing or incomplete: using {found[-1].name}, "
                    "the newest complete checkpoint",
                    stacklevel=2,
                )
                return found[-1]
            raise FileNotFoundError(
                f"{root / LATEST} names {named.name}, which is missing, and {root} holds no complete checkpoint"
            )
    if (p / "trainer.json").is_file():
        return p
    found = checkpoints(p) or checkpoints(p / "checkpoints")
    if found:
        return found[-1]
    raise FileNotFoundError(f"{p}: no checkpoint here (expected a step_* directory or a 'latest' file)")


CHECKSUMS = "checksums.json"


def write_checksums(ckpt_dir: Path) -> None:
    """Record sha256 and size of every file of a checkpoint (rank 0, after every rank wrote its part)."""
    ckpt_dir = Path(ckpt_dir)
    files = sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    save_json(
        ckpt_dir / CHECKSUMS,
        {str(p.relative_to(ckpt_dir)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
    )


def verify(ckpt_dir: Path) -> str | None:
    """None when every recorded file is present with its recorded size and sha256, else what is wrong (one line).
    A checkpoint written before checksums were recorded (no checksums.json) is reported as such."""
    ckpt_dir = Path(ckpt_dir)
    sums = ckpt_dir / CHECKSUMS
    if not sums.is_file():
        return f"{sums} is missing (a checkpoint written before checksums were recorded, or an incomplete one)"
    try:
        table = json.loads(sums.read_text())
    except (OSError, ValueError) as exc:
        return f"{sums} is unreadable ({type(exc).__name__})"
    for rel, rec in table.items():
        p = ckpt_dir / rel
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != rec["bytes"]:
            return f"{p} has {p.stat().st_size} bytes, {rec['bytes']} were written (truncated?)"
        if sha256_file(p) != rec["sha256"]:
            return f"{p} does not match the sha256 recorded when it was written (corrupt)"
    return None


def resolve_verified(where: str | Path, fall_back: bool) -> Path:
    """The checkpoint to resume from, its files verified against their recorded checksums.

    ``fall_back`` (resuming a run's latest): a checkpoint that fails verification is skipped, with a warning,
    for the previous complete one; otherwise (an explicit directory) it is a one-line ConfigError naming the file.
    DeepSpeed's loader unpickles with full trust, so nothing unverified reaches it."""
    first = resolve(where)
    candidates = [first] + (
        [p for p in reversed(checkpoints(first.parent)) if step_of(p) < step_of(first)]
        if fall_back and step_of(first) is not None
        else []
    )
    problems = []
    for cand in candidates:
        problem = verify(cand)
        if problem is None:
            if problems:
                warnings.warn(f"resuming {cand.name}: skipped {'; '.join(problems)}", stacklevel=2)
            return cand
        problems.append(f"{cand.name}: {problem}")
    raise ConfigError(
        f"--resume: no verifiable checkpoint: {problems[0]}"
        + (f" (and {len(problems) - 1} older)" if len(problems) > 1 else "")
    )


def latest_or_none(root: str | Path) -> Path | None:
    """The run's latest complete checkpoint, or None (for messages)."""
    try:
        return resolve(root)
    except FileNotFoundError:
        return None


def save_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------- loading a network
# The one path by which a FaceNetwork gets weights from disk: evaluation (pipeline.eval), export
# (pipeline.export), fine-tuning (model.init_from) and resuming on another world size all use it.


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (config.yaml + model.pt), or a run dir / checkpoint root → its latest."""
    p = Path(path)
    if holds_network(p):
        return p
    try:
        found = resolve(p)
    except FileNotFoundError:
        found = None
    if found is None or not holds_network(found):
        raise ConfigError(f"{p}: not a checkpoint (expected config.yaml and model.pt, or a 'latest' file)")
    return found


def read_state_dict(path: str | Path) -> dict:
    """Tensors only (``weights_only``: a checkpoint never executes code); DDP's ``module.`` prefix dropped.

    Accepts a plain state dict (``model.pt``, arcface_torch's ``backbone.pth``), a dict holding one under
    ``state_dict`` (many training scripts), and insightface arcface_torch's training checkpoint
    ``checkpoint_gpu_<rank>.pt`` (backbone under ``state_dict_backbone``, beside ``state_dict_softmax_fc``,
    ``state_optimizer``, ``state_lr_scheduler``, ``epoch``, ``global_step``: all ignored)."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure: not a torch checkpoint
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"{path}: not a PyTorch state dict ({type(exc).__name__}: {first})") from None
    if isinstance(obj, dict):
        for key in ("state_dict_backbone", "state_dict"):  # arcface_torch checkpoint_gpu_*.pt, then generic
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: not a state dict of tensors (holds a {type(obj).__name__})")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ConfigError(
            f"{path}: not a state dict of tensors (key {str(bad)[:80]!r} holds a {type(obj[bad]).__name__}; "
            "expected a state dict, or one under 'state_dict' / 'state_dict_backbone')"
        )
    if obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):  # saved from DDP
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_state_strict(module, state: dict, source: str | Path, arch: str) -> None:
    """``load_state_dict(strict=True)``, accepting a FaceNetwork's published (arcface_torch) names too;
    a mismatch is a one-line ConfigError naming the first mismatching key."""
    own = module.state_dict()
    published = getattr(module, "published_names", None)
    back = None
    if published is not None and state and not set(state) & set(own):
        # a published flat state dict (insightface backbone.pth): compare under the flat names
        names = published()
        back = {v: k for k, v in names.items()}
        own = {names[k]: v for k, v in own.items()}
    for k, v in own.items():
        if k not in state:
            raise ConfigError(f"{source}: not a checkpoint of {arch}: first mismatching key '{k}' (missing)")
        if tuple(state[k].shape) != tuple(v.shape):
            raise ConfigError(
                f"{source}: not a checkpoint of {arch}: first mismatching key '{k}' "
                f"(shape {tuple(state[k].shape)} in checkpoint, {tuple(v.shape)} in model)"
            )
    extra = [k for k in state if k not in own]
    if extra:
        raise ConfigError(f"{source}: not a checkpoint of {arch}: first mismatching key '{extra[0]}' (unexpected)")
    if back is not None:
        state = {back[k]: v for k, v in state.items()}
    module.load_state_dict(state, strict=True)


def describe(model_cfg) -> str:
    """One line naming a network: backbone, conv kind, inserts, head, widths."""
    ins = "+".join(f"{i.kind}@{i.at}" for i in model_cfg.inserts)
    return (
        f"{model_cfg.backbone} (conv {model_cfg.conv.kind}{', inserts ' + ins if ins else ''}, "
        f"head {model_cfg.head.kind}, width {model_cfg.width}, input {model_cfg.input_size})"
    )


def load_network(source: str | Path, model_cfg=None):
    """(FaceNetwork with weights, its ``model:`` config, the file they came from).

    ``source``: a checkpoint dir / run dir (the network is rebuilt from its ``config.yaml``; ``model_cfg``
    must be None) or a state-dict file (``model_cfg`` describes the network; insightface's flat names
    are accepted for the ``fc`` head)."""
    from pipeline.config import load_config
    from pipeline.models.network import build_network  # torch and the model code: only when a network is loaded

    path = Path(source)
    if not path.exists():
        raise ConfigError(f"{path}: checkpoint does not exist")
    if path.is_dir():
        ckpt = find_checkpoint(path)
        model_cfg = load_config([ckpt / "config.yaml"]).model
        path = ckpt / "model.pt"
    elif model_cfg is None:
        raise ConfigError(f"{path}: a state-dict file needs --backbone NAME (the network it holds)")
    net = build_network(model_cfg)
    load_state_strict(net, read_state_dict(path), path, describe(model_cfg))
    return net, model_cfg, path


def load_weights(net, source: str | Path, key: str) -> Path:
    """Load ``model.pt`` of a checkpoint dir / run dir, or a state-dict file, into ``net`` (strict).
    Errors name the config key the path came from (e.g. ``model.init_from``)."""
    p = Path(source)
    try:
        path = find_checkpoint(p) / "model.pt" if p.is_dir() else p
        if not path.is_file():
            raise ConfigError(f"{path} does not exist")
        load_state_strict(net, read_state_dict(path), path, "this network")
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return path
