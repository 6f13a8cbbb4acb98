"""Ablation runner: every arm × seed trained with one budget, evaluated on every set, one table.

    python -m pipeline.ablate configs/ablations/smoke_scan.yaml        # train what is not cached, write the table
    python -m pipeline.ablate SPEC --list                              # the grid: index, arm, seed, status
    python -m pipeline.ablate SPEC --jobs 4 data.train=/scratch/lfw    # 4 cells at a time; key=value for every arm
    python -m pipeline.ablate SPEC --report-only                       # the table from the cells on disk

On Slurm, one array task per cell (N = arms × seeds; ``--list`` prints the exact line), then the table:

    sbatch --array=0-17 --cpus-per-task=4 --wrap "python -m pipeline.ablate SPEC --cell \\$SLURM_ARRAY_TASK_ID"
    python -m pipeline.ablate SPEC --report-only

The spec is YAML. Relative paths are relative to the directory you run from, as for ``pipeline.train``:

    config: [configs/scan_r18_casia.yaml, configs/smoke.yaml]   # base config layers of every arm
    overrides: [data.train=shards/lfw_view1]                    # key=value for every arm
    arms:                                   # name + config layers and/or key=value overrides
      - {name: plain, overrides: [model.conv=plain]}
      - full                                # an arm that changes nothing: the base as it is
    seeds: [0, 1, 2]
    budget: {schedule.max_steps: 280}       # set by the runner for every arm; an arm that sets it is an error
    eval:                                   # .bin files, or LFW pairs lists + image folder; name: default the stem
      - {name: lfw, bin: ../shared/data/lfw_view1_112/lfw_devtest_112.bin}
      - {name: lfw_pairs, pairs: ../shared/data/lfw_view1_112/pairsDevTest.txt,
         root: ../shared/data/lfw_view1_112/devtest_112}
      - {name: lfw_all, images: ../shared/data/lfw_view1_112/devtest_112, metric: tar@far=1e-3}
                                            # ^ a labelled image set (identity folders or a list): TAR at FAR over
                                            #   all its pairs (pipeline.eval tarfar); 1e-2, 1e-3, 1e-4 and its
                                            #   metric's FAR are kept, the metric (default tar@far=1e-3) is reported
    reference: plain                        # paired differences against this arm (default: the first)
    output: runs/ablations/scan             # default: runs/ablations/<spec file name>
    processes: 8                            # cores this runner may use (default: all of this machine's)
    parallel: 4                             # cells at a time (default: processes / nproc; on GPUs: GPUs / nproc)
    nproc: 1                                # trainer processes per cell (torchrun when > 1)
    diagnostics: [train_loss, embedding_norm]
    metric: accuracy                        # what the table reports for the pair sets: accuracy | accuracy_noflip | auc

How a cell's config is made: the spec's layers then the arm's layers; then the spec's overrides, the command
line's, the arm's; then the runner's: the budget, ``seed``, ``output.dir`` (the cell's folder), ``data.val=[]``
(the runner evaluates the spec's sets itself). Every arm's config is resolved and validated before anything
trains. The data order is a function of the seed and of :data:`DATA_ORDER_KEYS` (and of ``nproc``, one per
spec): arms must agree on those, so the same seed means the same batches in every arm.

Cells live in ``OUTPUT/cells/<arm>/seed_<seed>/``: ``config.yaml`` (the resolved config the trainer is given),
``train.log``, ``run/`` (the trainer's output.dir: checkpoints, tb), ``cell.json`` (metrics, diagnostics, the
hashes). ``train_hash`` covers the resolved config (less its output paths) and nproc; ``eval_hash`` the eval
sets and diagnostics. On a rerun a cell whose hashes match is skipped ("cached"); one whose eval sets changed is
evaluated again without training; one whose config changed trains again from scratch (said on the console). A
cell whose training stopped (Ctrl-C, preemption, a crash) resumes from its latest checkpoint with
``pipeline.train --resume``, which continues with the same data order and schedule (the same weights as an
uninterrupted run), as long as its config is unchanged. A failed cell is recorded with its exit code and log,
the other cells go on, the table marks it and the runner exits 1; a rerun tries it again.

Cores: ``parallel × nproc × threads ≤ processes``; each cell gets ``OMP_NUM_THREADS=threads``. With GPUs
(``device: auto`` or ``cuda``) each running cell gets its own ``CUDA_VISIBLE_DEVICES`` (nproc GPUs).

Diagnostics: ``@register_diagnostic(name)`` on ``fn(net, cfg, ctx) -> {column: float}`` (net: the cell's final
FaceNetwork in eval mode; cfg: its resolved Config; ctx: :class:`DiagnosticContext`). Register in this module or
in a module named in the config's ``plugins:`` list (imported when the config loads).

Exit codes: 0 every cell finished; 1 a cell failed or is missing (the table is still written); 2 a spec or
config error (one line); 130 interrupted (running cells checkpoint first; a rerun resumes them).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from data_prep.manifest import DataError, read_manifest
from pipeline.checkpoint import latest_or_none, load_json, save_json
from pipeline.config import Config, ConfigError, dump_config, load_config, parse_override, read_yaml_mapping
from pipeline.progress import hms
from pipeline.runlock import FolderLock, FolderLocked, die_with_parent, is_locked

METRICS = ("accuracy", "accuracy_noflip", "auc")  # what the table may report; all are fractions, shown in %
IMAGES_FARS = (1e-2, 1e-3, 1e-4)  # TAR kept for an ``images`` eval set (plus its metric's FAR)
DEFAULT_IMAGES_METRIC = "tar@far=1e-3"
KEPT_METRICS = ("accuracy", "std", "accuracy_noflip", "std_noflip", "auc", "tar_at_far", "threshold", "xnorm")
# Keys the runner sets in every cell: an arm's override of one is an error (it would be ignored).
RUNNER_KEYS = ("seed", "output.dir", "output.overwrite", "data.val")
# What the loaders' sample order depends on besides the seed (pipeline/data/torch_loader.py, dali_loader.py).
DATA_ORDER_KEYS = (
    "data.train",
    "data.batch_size",
    "data.num_workers",
    "data.shuffle_buffer",
    "data.loader",
    "deepspeed.grad_accum",
)
ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # it names a folder
EVAL_BATCH = 64  # on a CPU, 64 embeds faster than 128 (measured)
CELL_JSON = "cell.json"
TRAIN_STATE = "train_state.json"
EXIT_INCOMPLETE, EXIT_SPEC, EXIT_INTERRUPTED = 1, 2, 130
EXIT_BUSY = 75  # --cell: another process holds the cell (EX_TEMPFAIL: try again when it ends)


class SpecError(ValueError):
    """A problem with an ablation spec: a one-line message naming the spec file and the key or file."""


# --------------------------------------------------------------------------- spec types


def _from_mapping(cls: type, raw: Any, where: str):
    """Dataclass ``cls`` from a YAML mapping; unknown or missing keys and ill-typed values are SpecErrors.

    A class with ``SHORTHAND`` also accepts a scalar, meaning ``{SHORTHAND: scalar}``."""
    shorthand = getattr(cls, "SHORTHAND", None)
    if shorthand and isinstance(raw, str):
        raw = {shorthand: raw}
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expects a mapping, got {raw!r}")
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in known:
            raise SpecError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(known))})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in known.items():
        if name in raw:
            kwargs[name] = _typed(hints[name], raw[name], where, name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"{where}: key '{name}' is missing")
    obj = cls(**kwargs)
    obj.validate(where)
    return obj


def _typed(tp: Any, value: Any, where: str, key: str) -> Any:
    def fail(expected: str):
        raise SpecError(f"{where}: key '{key}' expects {expected}, got {value!r}")

    if tp is str:
        return value if isinstance(value, str) else fail("a string")
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else fail("an integer")
    if tp is dict:
        return value if isinstance(value, dict) and all(isinstance(k, str) for k in value) else fail("a mapping")
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            value = [value]  # `config: one.yaml`
        if not isinstance(value, list):
            fail("a list")
        if dataclasses.is_dataclass(item):
            return [_from_mapping(item, v, f"{where}: {key}[{i}]{_named(v)}") for i, v in enumerate(value)]
        return [_typed(item, v, where, key) for v in value]
    raise TypeError(f"spec field type {tp} is not handled")  # a programming error, not a user's


def _named(raw: Any) -> str:
    name = raw.get("name") if isinstance(raw, dict) else raw
    return f" '{name}'" if isinstance(name, str) else ""


def _check_layers(paths: list[str], where: str) -> None:
    for p in paths:
        if not Path(p).is_file():
            raise SpecError(f"{where}: config layer '{p}' does not exist")


def _override_key(text: str, where: str) -> str:
    try:
        return parse_override(text)[0]
    except (ConfigError, yaml.YAMLError):
        raise SpecError(f"{where}: override {text!r} is not of the form key=value") from None


def _touches(key: str, held: str) -> bool:
    """``key`` sets ``held`` or a block holding it (``schedule={...}`` sets schedule.max_steps)."""
    return key == held or held.startswith(key + ".") or key.startswith(held + ".")


def _check_not_held(texts: list[str], budget: dict, where: str) -> None:
    """Overrides may not set a budget key or a key the runner sets per cell: it would be silently replaced."""
    for text in texts:
        key = _override_key(text, where)
        held = next((k for k in budget if _touches(key, k)), None)
        if held:
            raise SpecError(
                f"{where}: override '{key}' sets the budget key {held}, which is the same for every arm "
                "(change budget: instead)"
            )
        held = next((k for k in RUNNER_KEYS if _touches(key, k)), None)
        if held:
            raise SpecError(f"{where}: override '{key}' sets {held}, which the runner sets per cell (seeds:, eval:)")


@dataclass
class Arm:
    """One row of the table: config layers and/or key=value overrides on top of the spec's base."""

    SHORTHAND: ClassVar[str] = "name"
    name: str
    config: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)

    def validate(self, where: str) -> None:
        if not ARM_NAME.fullmatch(self.name):
            raise SpecError(f"{where}: key 'name': {self.name!r} must be letters, digits and . _ + - (a folder name)")
        _check_layers(self.config, where)
        for text in self.overrides:
            _override_key(text, where)


@dataclass
class EvalSet:
    """An evaluation set: an insightface ``.bin`` or an LFW pairs list with its image folder (verification of its
    pairs, 10-fold), or a labelled image set (``images``: identity folders or a list file; TAR at FAR over all its
    pairs, :mod:`pipeline.eval.tarfar`)."""

    SHORTHAND: ClassVar[str] = "bin"
    name: str = ""
    bin: str = ""
    pairs: str = ""
    root: str = ""
    ext: str = "jpg"
    images: str = ""
    metric: str = ""  # what the table reports for this set: default the spec's metric (images: tar@far=1e-03)

    def validate(self, where: str) -> None:
        if sum(map(bool, (self.bin, self.pairs, self.images))) != 1:
            raise SpecError(
                f"{where}: give one of 'bin' (a .bin file), 'pairs' + 'root' (a pairs list and its images) or "
                "'images' (a labelled image set: identity folders or a list file)"
            )
        if self.images:
            from pipeline.eval.tarfar import far_key, parse_far_key

            if not Path(self.images).exists():
                raise SpecError(f"{where}: '{self.images}' does not exist")
            far = parse_far_key(self.metric or DEFAULT_IMAGES_METRIC)
            if far is None:
                raise SpecError(
                    f"{where}: key 'metric': '{self.metric}' is not tar@far=F with 0 < F < 1 (an 'images' set "
                    "reports TAR at a FAR over all its pairs)"
                )
            self.metric = far_key(far)
        elif self.metric and self.metric not in METRICS:
            raise SpecError(f"{where}: key 'metric': '{self.metric}' is not one of {', '.join(METRICS)}")
        if self.bin and not Path(self.bin).is_file():
            raise SpecError(f"{where}: file '{self.bin}' does not exist")
        if self.pairs and not Path(self.pairs).is_file():
            raise SpecError(f"{where}: file '{self.pairs}' does not exist")
        if self.pairs and not self.root:
            raise SpecError(f"{where}: key 'root' is missing (the image folder of '{self.pairs}')")
        if self.root and not Path(self.root).is_dir():
            raise SpecError(f"{where}: image folder '{self.root}' does not exist")
        self.name = self.name or Path(self.bin or self.pairs or self.images).stem
        if "|" in self.name or not self.name.strip():
            raise SpecError(f"{where}: key 'name': {self.name!r} cannot be empty or hold '|' (a table column)")

    def identity(self) -> dict:
        """What the cached results depend on: the name and the absolute paths (images: and the FARs kept)."""
        if self.images:
            return {"name": self.name, "images": str(Path(self.images).resolve()), "fars": list(self.fars())}
        if self.bin:
            return {"name": self.name, "bin": str(Path(self.bin).resolve())}
        pairs, root = str(Path(self.pairs).resolve()), str(Path(self.root).resolve())
        return {"name": self.name, "pairs": pairs, "root": root, "ext": self.ext}

    def reported(self, spec_metric: str) -> str:
        """The metric this set's table column shows."""
        return self.metric or spec_metric

    def fars(self) -> tuple[float, ...]:
        """An ``images`` set's FARs: 1e-2, 1e-3, 1e-4 and its metric's."""
        from pipeline.eval.tarfar import parse_far_key

        return tuple(sorted({*IMAGES_FARS, parse_far_key(self.metric or DEFAULT_IMAGES_METRIC)}, reverse=True))

    def load(self, image_size: int):
        """Pair sets: (uint8 images (2P, S, S, 3), issame (P,)); ``images`` sets: (uint8 images (N, S, S, 3),
        labels (N,)). Decoded once per process."""
        import numpy as np

        from pipeline.eval.identify import load_image_set, read_image_set
        from pipeline.eval.verify import load_bin, load_pairs

        key = (json.dumps(self.identity(), sort_keys=True), image_size)
        if key not in _LOADED:  # load_bin caches itself; the pairs' JPEGs are decoded once here
            if self.images:
                image_set = read_image_set(self.images)
                _LOADED[key] = (load_image_set(image_set, image_size), np.asarray(image_set.labels))
            elif self.bin:
                _LOADED[key] = load_bin(self.bin, image_size)
            else:
                _LOADED[key] = load_pairs(self.pairs, self.root, image_size, self.ext)
        return _LOADED[key]


_LOADED: dict[tuple, tuple] = {}


@dataclass
class Spec:
    """An ablation: the base config, the arms, the seeds, the budget, the evaluation sets."""

    config: list[str]
    arms: list[Arm]
    seeds: list[int]
    budget: dict
    eval: list[EvalSet]
    overrides: list[str] = field(default_factory=list)
    reference: str = ""
    output: str = ""
    processes: int = 0
    parallel: int = 0
    nproc: int = 1
    diagnostics: list[str] = field(default_factory=list)
    metric: str = "accuracy"
    # not spec keys: where it came from, and the command line's key=value (forwarded to --cell subprocesses)
    path: Path = field(default=Path(), init=False)
    extra: list[str] = field(default_factory=list, init=False)

    def validate(self, where: str) -> None:
        if not self.config:
            raise SpecError(f"{where}: key 'config' needs at least one config layer")
        _check_layers(self.config, where)
        for key, items in (("arms", self.arms), ("seeds", self.seeds), ("eval", self.eval)):
            if not items:
                raise SpecError(f"{where}: key '{key}' is empty")
        for key, names in (("arms", [a.name for a in self.arms]), ("eval", [e.name for e in self.eval])):
            dup = next((n for n in names if names.count(n) > 1), None)
            if dup is not None:
                raise SpecError(f"{where}: key '{key}': the name '{dup}' appears twice")
        if len(set(self.seeds)) != len(self.seeds):
            raise SpecError(f"{where}: key 'seeds': {self.seeds} repeats a seed")
        if not self.budget:
            raise SpecError(
                f"{where}: key 'budget' is empty: state the training budget, e.g. {{schedule.max_steps: 280}}"
            )
        for key in self.budget:
            held = next((r for r in RUNNER_KEYS if _touches(key, r)), None)
            if held:
                raise SpecError(f"{where}: key 'budget': '{key}' touches {held}, which the runner sets per cell")
        _check_not_held(self.overrides, self.budget, f"{where}: key 'overrides'")
        self.reference = self.reference or self.arms[0].name
        if self.reference not in [a.name for a in self.arms]:
            raise SpecError(f"{where}: key 'reference': no arm is named '{self.reference}'")
        for key in ("processes", "parallel"):
            if getattr(self, key) < 0:
                raise SpecError(f"{where}: key '{key}' must be >= 0 (0: automatic), got {getattr(self, key)}")
        if self.nproc < 1:
            raise SpecError(f"{where}: key 'nproc' must be >= 1, got {self.nproc}")
        if self.metric not in METRICS:
            raise SpecError(f"{where}: key 'metric': '{self.metric}' is not one of {', '.join(METRICS)}")
        for arm in self.arms:
            _check_not_held(arm.overrides, self.budget, f"{where}: arm '{arm.name}'")

    @property
    def out_dir(self) -> Path:
        return Path(self.output).resolve()

    def all_overrides(self) -> list[str]:
        return [*self.overrides, *self.extra]


def load_spec(path: str | Path, extra_overrides: list[str] = (), output: str | None = None) -> Spec:
    """Read and validate a spec; ``extra_overrides`` (the command line's key=value) apply to every arm."""
    path = Path(path)
    spec = _from_mapping(Spec, read_yaml_mapping(path, "spec", SpecError, empty_ok=False), str(path))
    spec.path = path
    _check_not_held(list(extra_overrides), spec.budget, "command line")
    spec.extra = list(extra_overrides)
    spec.output = output or spec.output or str(Path("runs") / "ablations" / path.stem)
    return spec


# --------------------------------------------------------------------------- the grid


@dataclass
class Cell:
    """One arm × seed: its folder, resolved config and the hashes its cached results are checked against."""

    index: int
    arm: str
    seed: int
    dir: Path
    config: Config
    train_hash: str
    eval_hash: str

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    @property
    def label(self) -> str:
        return f"{self.arm} seed {self.seed} (#{self.index})"

    @property
    def key(self) -> str:
        """``ARM@SEED``: names the cell whatever its index (arm names cannot hold '@')."""
        return f"{self.arm}@{self.seed}"


def _kv(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: strings stay strings, lists stay lists


def _resolve(spec: Spec, label: str, layers: list[str], overrides: list[str]) -> Config:
    try:
        return load_config(layers, overrides)
    except ConfigError as exc:
        msg = " ".join(str(exc).split())
        msg = "overrides" + msg[len("command line") :] if msg.startswith("command line") else msg
        raise SpecError(f"{spec.path}: {label}: {msg}") from None


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else getattr(cfg, part, None)
    return cfg


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _non_default(obj: Any) -> Any:
    """A config object as a dict of the values that differ from their field's default (nested, recursively):
    a release that adds an option (with a default that keeps the old behaviour) leaves the hash unchanged."""
    if isinstance(obj, (list, tuple)):
        return [_non_default(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _non_default(v) for k, v in obj.items()}
    if not dataclasses.is_dataclass(obj):
        return obj
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if dataclasses.is_dataclass(value):
            sub = _non_default(value)
            if sub:
                out[f.name] = sub
        elif value != default:
            out[f.name] = _non_default(value)
    return out


def train_hash(cfg: Config, nproc: int) -> str:
    """What a cell's weights depend on: the resolved config less its output paths and less every value equal to
    its default, and the world size."""
    resolved = _non_default(cfg)
    for runner_managed in ("dir", "overwrite"):
        resolved.get("output", {}).pop(runner_managed, None)
    if not cfg.optim.scale_lr:  # the batch the lr is stated for changes nothing unless the lr is scaled to it
        resolved.get("optim", {}).pop("reference_batch", None)
        if not resolved.get("optim", True):
            resolved.pop("optim")
    return _digest({"config": resolved, "nproc": nproc})


def eval_hash(spec: Spec) -> str:
    return _digest({"eval": [e.identity() for e in spec.eval], "diagnostics": spec.diagnostics})


def build_grid(spec: Spec) -> list[Cell]:
    """Resolve and validate every cell's config (before anything trains): arm-major, seed-minor indices."""
    budget = [_kv(k, v) for k, v in spec.budget.items()]
    base = _resolve(spec, "base config", spec.config, spec.all_overrides())
    _check_diagnostics(spec)  # now: the config's plugins: (which may register diagnostics) are imported
    _resolve(spec, "budget", spec.config, [*spec.all_overrides(), *budget])
    evals = eval_hash(spec)
    cells = []
    for arm in spec.arms:
        label = f"arm '{arm.name}'"
        layers = [*spec.config, *arm.config]
        as_written = _resolve(spec, label, layers, [*spec.all_overrides(), *arm.overrides])
        _check_held_keys(spec, arm.name, as_written, base)
        for seed in spec.seeds:
            cell_dir = spec.out_dir / "cells" / arm.name / f"seed_{seed}"
            runner = [f"seed={seed}", _kv("output.dir", str(cell_dir / "run")), "output.overwrite=true", "data.val=[]"]
            cfg = _resolve(spec, label, layers, [*spec.all_overrides(), *arm.overrides, *budget, *runner])
            check_overrides_applied(spec, arm.name, cfg, [*spec.all_overrides(), *arm.overrides, *budget, *runner])
            cells.append(Cell(len(cells), arm.name, seed, cell_dir, cfg, train_hash(cfg, spec.nproc), evals))
    _check_data_order(spec, cells)
    _check_training_data(spec, cells)
    return cells


def _written_matches(resolved: Any, written: Any) -> bool:
    """Does the resolved config value hold what an override wrote? (a part block given by its kind name, a
    mapping given for a dataclass, numbers written as YAML strings such as 5e-4 are all accepted)"""
    if dataclasses.is_dataclass(resolved):
        if isinstance(written, str):
            return getattr(resolved, "kind", None) == written
        if not isinstance(written, dict):
            return False
        names = {f.name for f in dataclasses.fields(resolved)}
        return all(k in names and _written_matches(getattr(resolved, k), v) for k, v in written.items())
    if isinstance(resolved, list):
        if not isinstance(written, list):
            written = [written]
        return len(resolved) == len(written) and all(_written_matches(r, w) for r, w in zip(resolved, written))
    if isinstance(resolved, float) and not isinstance(written, bool):
        try:
            return math.isclose(resolved, float(written), rel_tol=1e-12, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return resolved == written


def check_overrides_applied(spec: Spec, arm: str, cfg: Config, overrides: list[str]) -> None:
    """Every ``key=value`` of the spec and the arm is in the cell's resolved config (the last one written for a
    key wins): a merge that dropped one (issue 23: a head's options vanished when its kind changed) stops the
    runner before anything trains, naming the key."""
    last: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        for earlier in [k for k in last if k.startswith(key + ".")]:
            del last[earlier]  # a block written whole after its keys replaces them
        last[key] = value
    for key, value in last.items():
        try:
            resolved = _get(cfg, key)
        except AttributeError:
            resolved = None
        if not _written_matches(resolved, value):
            raise SpecError(
                f"{spec.path}: arm '{arm}': override {key}={value!r} is not in the resolved config "
                f"(it holds {resolved!r}); a later layer or override changed or dropped it"
            )


def parameter_count(cfg: Config) -> int:
    """Parameters of the cell's network (trunk, inserts, head; not the classifier: classes × embedding size),
    built on the meta device (no memory, no time) where its parts allow, else on the CPU."""
    import torch

    from pipeline.models.network import build_network  # torch: imported when a count is asked for

    try:
        with torch.device("meta"):
            net = build_network(cfg.model)
    except (NotImplementedError, RuntimeError):  # a part reads a tensor's values while building (LCD's map list)
        net = build_network(cfg.model)
    return sum(p.numel() for p in net.parameters())


def _check_diagnostics(spec: Spec) -> None:
    for name in spec.diagnostics:
        if name not in DIAGNOSTICS:
            known = ", ".join(sorted(DIAGNOSTICS))
            raise SpecError(f"{spec.path}: key 'diagnostics': unknown diagnostic '{name}' (known: {known})")


def _check_held_keys(spec: Spec, arm: str, as_written: Config, base: Config) -> None:
    """An arm's config layers may not change the budget or the seed (the runner would silently replace them)."""
    for key, why in [*((k, "budget:") for k in spec.budget), ("seed", "seeds:")]:
        mine, theirs = _get(as_written, key), _get(base, key)
        if mine != theirs:
            raise SpecError(
                f"{spec.path}: arm '{arm}': its config layers set {key} to {mine!r} (the base has {theirs!r}), "
                f"which the runner holds identical across arms ({why})"
            )


def _check_data_order(spec: Spec, cells: list[Cell]) -> None:
    ref = next(c for c in cells if c.arm == spec.reference)
    for cell in cells:
        for key in DATA_ORDER_KEYS:
            mine, theirs = _get(cell.config, key), _get(ref.config, key)
            if mine != theirs:
                raise SpecError(
                    f"{spec.path}: arm '{cell.arm}': {key} is {mine!r} but the reference arm '{ref.arm}' has "
                    f"{theirs!r}: arms must share the data order (seed, {', '.join(DATA_ORDER_KEYS)})"
                )


def _check_training_data(spec: Spec, cells: list[Cell]) -> None:
    """data.train is one shard directory for every arm (the data order check): look at it once, now."""
    cfg = cells[0].config
    if not cfg.data.train:
        raise SpecError(
            f"{spec.path}: data.train is not set (a WebDataset shard directory; e.g. overrides: [data.train=DIR])"
        )
    try:
        read_manifest(cfg.data.train)
    except DataError as exc:
        raise SpecError(f"{spec.path}: data.train: {exc}") from None


# --------------------------------------------------------------------------- cell state on disk


def _read_json(path: Path) -> dict | None:
    try:
        return load_json(path)
    except (OSError, ValueError):
        return None


def training_state(cell: Cell) -> str:
    """done (trained with this config) | resume (stopped midway, same config) | changed (another config) | fresh."""
    state = _read_json(cell.dir / TRAIN_STATE)
    if state is None:
        return "fresh"
    if state.get("train_hash") != cell.train_hash:
        return "changed"
    if latest_or_none(cell.run_dir / "checkpoints") is None:
        return "fresh"
    return "done" if state.get("status") == "done" else "resume"


def _matches(record: dict | None, cell: Cell) -> bool:
    """A cell.json written for this cell's config and evaluation (not an earlier spec's)."""
    if record is None:
        return False
    return record.get("train_hash") == cell.train_hash and record.get("eval_hash") == cell.eval_hash


def cell_status(cell: Cell, holding_lock: bool = False) -> str:
    """running (another process holds the cell's lock) | cached | failed | interrupted (its last run, this config) |
    trained (evaluate only) | partial (resume) | changed (config changed since its last run) | new.
    ``holding_lock``: the caller is the cell's process (it holds the lock itself)."""
    if not holding_lock and is_locked(cell.dir):
        return "running"
    record = _read_json(cell.dir / CELL_JSON)
    if _matches(record, cell):
        return "cached" if record.get("status") == "ok" else str(record.get("status"))
    return {"done": "trained", "resume": "partial", "changed": "changed", "fresh": "new"}[training_state(cell)]


STATUS_TEXT = {
    "running": "running in another process (its lock is held): not started here; rerun when it ends",
    "cached": "cached",
    "failed": "failed last time: runs again",
    "interrupted": "interrupted last time: resumes",
    "trained": "trained; evaluates again (eval sets or diagnostics changed)",
    "partial": "resumes from its latest checkpoint",
    "changed": "config changed since its last run: trains again from scratch",
    "new": "to train",
}


def _base_record(cell: Cell) -> dict:
    return {
        "index": cell.index,
        "arm": cell.arm,
        "seed": cell.seed,
        "train_hash": cell.train_hash,
        "eval_hash": cell.eval_hash,
        "dir": str(cell.dir),
    }


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- one cell (--cell, and each subprocess)


def run_cell(spec: Spec, cell: Cell, threads: int) -> dict:
    """Train (or resume) and evaluate one cell, holding its lock (:func:`run_one`); writes and returns its cell.json
    record."""
    status = cell_status(cell, holding_lock=True)
    if status == "cached":
        print(f"[ablate] {cell.label}: cached", flush=True)
        return load_json(cell.dir / CELL_JSON)
    cell.dir.mkdir(parents=True, exist_ok=True)
    (cell.dir / CELL_JSON).unlink(missing_ok=True)  # what the parent reads afterwards is this run's
    print(f"[ablate] {cell.label}: {STATUS_TEXT.get(status, status)}", flush=True)
    record = _base_record(cell)
    training = training_state(cell)
    if training == "done":  # only the evaluation changed, or it failed last time
        record["train_s"] = (_read_json(cell.dir / TRAIN_STATE) or {}).get("train_s")
    else:
        exit_code, record["train_s"] = train_cell(cell, spec.nproc, training == "resume", threads)
        if exit_code != 0:
            return _failed(cell, record, exit_code, cell.dir / "train.log")
    try:
        metrics, diagnostics, checkpoint, record["eval_s"] = evaluate_cell(spec, cell, threads)
    except (ConfigError, DataError) as exc:
        record["error"] = " ".join(str(exc).split())
        return _failed(cell, record, 1, None)
    record.update(status="ok", checkpoint=str(checkpoint), metrics=metrics, diagnostics=diagnostics)
    save_json(cell.dir / CELL_JSON, record)
    return record


def _failed(cell: Cell, record: dict, exit_code: int, log: Path | None) -> dict:
    """Record a cell whose training exited non-zero (``log``: its train.log) or whose evaluation failed."""
    from pipeline.train import EXIT_STOPPED

    record.update(
        status="interrupted" if exit_code in (EXIT_STOPPED, -signal.SIGINT, -signal.SIGTERM) else "failed",
        exit_code=exit_code,
        log=str(log) if log else None,
    )
    if log:
        record.setdefault("error", _log_tail(log))
    save_json(cell.dir / CELL_JSON, record)
    return record


def trainer_command(config_path: Path, nproc: int, resume: bool) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "pipeline.train", "--config", str(config_path), *(["--resume"] if resume else [])]


def train_cell(cell: Cell, nproc: int, resume: bool, threads: int) -> tuple[int, float]:
    """Run the trainer on the cell's resolved config; (exit code, seconds). A fresh start clears the run's old
    checkpoints (output.overwrite); ``resume`` continues from its latest one."""
    config_path = cell.dir / "config.yaml"
    dump_config(cell.config, config_path)
    save_json(cell.dir / TRAIN_STATE, {"train_hash": cell.train_hash, "status": "training"})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, str(threads))
    cmd = trainer_command(config_path, nproc, resume)
    started = time.perf_counter()
    with open(cell.dir / "train.log", "a" if resume else "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        # its own session: a terminal's Ctrl-C reaches this process only, which passes on exactly one signal
        # (two SIGINTs would make the trainer abort without its checkpoint)
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=die_with_parent
        )  # and it dies with this cell process (SIGTERM: it checkpoints first)
        exit_code = _wait_passing_signals(proc)
    seconds = round(time.perf_counter() - started, 1)
    if exit_code == 0 and not _reached_last_step(cell):
        from pipeline.train import EXIT_STOPPED

        exit_code = EXIT_STOPPED  # preempted under Slurm: the trainer requeued itself and exited 0
    if exit_code == 0:
        save_json(cell.dir / TRAIN_STATE, {"train_hash": cell.train_hash, "status": "done", "train_s": seconds})
    return exit_code, seconds


def _reached_last_step(cell: Cell) -> bool:
    latest = latest_or_none(cell.run_dir / "checkpoints")
    meta = _read_json(latest / "trainer.json") if latest else None
    return bool(meta) and meta.get("step", 0) >= meta.get("total_steps", math.inf)


def _wait_passing_signals(proc: subprocess.Popen) -> int:
    """Wait for the trainer; SIGINT / SIGTERM to this process go on to it (it checkpoints and exits 4)."""

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _device(setting: str):
    import torch

    from pipeline.core.device import resolve_device

    return torch.device(resolve_device(setting))


def evaluate_cell(spec: Spec, cell: Cell, threads: int) -> tuple[dict, dict, Path, float]:
    """(metrics per set, diagnostics, checkpoint, seconds) of the cell's final checkpoint."""
    import torch

    from pipeline.eval.checkpoint import load_network_checked
    from pipeline.eval.tarfar import all_pairs_metrics
    from pipeline.eval.verify import check_finite, embed_images, verification_metrics

    torch.set_num_threads(threads)
    started = time.perf_counter()
    net, model_cfg, weights = load_network_checked(cell.run_dir)
    device = _device(cell.config.device)
    net = net.to(device).eval()
    embed = net.embedder().eval()
    metrics, embeddings = {}, {}
    for eval_set in spec.eval:
        images, target = eval_set.load(model_cfg.input_size)  # target: issame per pair, or a label per image
        # what pipeline.eval.verify.evaluate_images / pipeline.eval tarfar do, keeping the embeddings for diagnostics
        emb, emb_flip = embed_images(embed, images, EVAL_BATCH, device)
        if eval_set.images:
            check_finite(emb, emb_flip, eval_set.name)
            feats = torch.nn.functional.normalize(torch.from_numpy(emb + emb_flip), dim=1)
            metrics[eval_set.name] = all_pairs_metrics(feats, target, eval_set.fars(), device)
        else:
            res = verification_metrics(emb, emb_flip, target, eval_set.name)
            metrics[eval_set.name] = {k: res[k] for k in KEPT_METRICS if k in res}
        embeddings[eval_set.name] = emb
    ctx = DiagnosticContext(cell.run_dir, spec.eval, device, model_cfg.input_size, embeddings)
    diagnostics = run_diagnostics(spec.diagnostics, net, cell.config, ctx)
    return metrics, diagnostics, weights.parent, round(time.perf_counter() - started, 1)


# --------------------------------------------------------------------------- diagnostics


@dataclass(frozen=True)
class DiagnosticContext:
    """What a diagnostic may read besides the network and its config."""

    run_dir: Path  # the cell's trainer output.dir (tb/, checkpoints/)
    eval_sets: list[EvalSet]  # the spec's evaluation sets, in order (``.load(input_size)`` → images, issame)
    device: Any  # torch.device the network is on
    input_size: int
    embeddings: dict  # set name → float32 (2P, D) embeddings of its images, no flip, not normalised (numpy)


DiagnosticFn = Callable[[Any, Config, DiagnosticContext], dict[str, float]]
DIAGNOSTICS: dict[str, DiagnosticFn] = {}


def register_diagnostic(name: str) -> Callable[[DiagnosticFn], DiagnosticFn]:
    """``@register_diagnostic("name")`` on ``fn(net, cfg, ctx) -> {column: float}``; a spec lists it by name."""

    def register(fn: DiagnosticFn) -> DiagnosticFn:
        if name in DIAGNOSTICS and DIAGNOSTICS[name] is not fn:
            raise ValueError(f"diagnostic '{name}' is registered twice")
        DIAGNOSTICS[name] = fn
        return fn

    return register


def run_diagnostics(names: list[str], net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        for column, value in DIAGNOSTICS[name](net, cfg, ctx).items():
            if column in out:
                raise ConfigError(f"diagnostics: '{name}' returns the column '{column}' another diagnostic returned")
            out[column] = float(value)
    return out


@register_diagnostic("train_loss")
def train_loss(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """The last logged value of each ``loss/*`` TensorBoard scalar: ``train_loss`` (loss/total) and
    ``train_loss/<term>`` (cls_main, rmo, dist, ...)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(ctx.run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        if tag.startswith("loss/"):
            last = max(acc.Scalars(tag), key=lambda e: (e.step, e.wall_time))
            out["train_loss" if tag == "loss/total" else f"train_loss/{tag[5:]}"] = float(last.value)
    if "train_loss" not in out:
        raise DataError(f"{ctx.run_dir / 'tb'}: no loss/total scalar logged")
    return out


@register_diagnostic("embedding_norm")
def embedding_norm(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """Mean L2 norm of the un-normalised embeddings of the first evaluation set's images (no flip)."""
    import numpy as np

    emb = ctx.embeddings[ctx.eval_sets[0].name]
    return {"embedding_norm": float(np.linalg.norm(emb, axis=1).mean())}


@register_diagnostic("conv_monitors")
def conv_monitors(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """The conv kind's own end-of-training monitors (SCAN: ``t_mean``, ``t_min``, ``t_max``, ``t_std``,
    ``t_frac_below_0.1`` of the scales t over every filter); nothing for plain convs."""
    return {name.rsplit("/", 1)[-1]: float(v) for name, v in net.conv_kind.monitors(net).items()}


@register_diagnostic("sample_values")
def sample_values(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """Mean over each evaluation set's images of every per-sample value the network's modules report on a probe
    forward (``trace.sample_value``): ``<value>/<set>``, e.g. LGAF's ``gamma_l/clean`` vs ``gamma_l/occ_eyes``
    (does the local branch gain weight on degraded faces?) or CQA-Face's ``q0/…`` … ``q3/…`` (do the quality
    scores fall on occluded faces?); nothing for a network without such values (the fc head)."""

    from pipeline.eval.verify import to_model_input

    out: dict[str, float] = {}
    for eval_set in ctx.eval_sets:
        images, _ = eval_set.load(ctx.input_size)
        means = net.sample_value_means(images, EVAL_BATCH, to_model_input)
        out.update({f"{name}/{eval_set.name}": v for name, v in means.items()})
    return out


EQ8_FRACTIONS = (0.1, 0.3, 0.5)  # of the channels dropped at test time (the paper's Fig. 3/4 sweep)
EQ8_IMAGES = 256  # the first images of the first evaluation set


@register_diagnostic("eq8_mse")
def eq8_mse_diagnostic(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """LCD's eq. 8 (Sec. V-C): mean squared difference between the L2-normalised embeddings of the first
    evaluation set's first 256 images without and with 10 / 30 / 50 % of the channels dropped at test time at
    ``layer3.branch`` (the same seeded masks for every network of one width): ``eq8_mse@0.1`` … — low = the
    network tolerates losing channels there, the paper's claim for LCD. Any iresnet network (the baseline too)."""
    return eq8_sweep(net, ctx, "eq8_mse")


def eq8_sweep(net, ctx: DiagnosticContext, name: str) -> dict[str, float]:
    """Eq. 8 at every EQ8_FRACTIONS on the first evaluation set's first EQ8_IMAGES images, ``{name@frac: mse}``
    (L2-normalised embeddings; the same seeded masks for every network of one width)."""
    import torch

    from pipeline.eval.verify import to_model_input
    from pipeline.models.lcd import eq8_mse

    images, _ = ctx.eval_sets[0].load(ctx.input_size)
    batch = to_model_input(images[:EQ8_IMAGES]).to(ctx.device)
    out = {}
    for frac in EQ8_FRACTIONS:
        res = eq8_mse(net, batch, frac, "layer3.branch", torch.Generator(device=ctx.device).manual_seed(0))
        out[f"{name}@{frac}"] = float(res["mse_unit"])
    return out


@register_diagnostic("eq8_mse_thetabar")
def eq8_mse_thetabar_diagnostic(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """The SAM control of LCD's eq. 8 (spec §7.1): every LCD insert's SAM replaced by its own per-channel mean θ̄
    over the first evaluation set's first 256 distinct faces (:func:`pipeline.models.lcd.freeze_sam_to_mean`),
    then eq. 8 as ``eq8_mse`` (``eq8_mse_thetabar@0.1`` …). Equal to ``eq8_mse`` = SAM's effect on eq. 8 is its
    mean scale of the branch, not its reading of the dropped channels. Nothing for a network without SAM."""
    import copy

    from pipeline.models.lcd import freeze_sam_to_mean

    frozen = copy.deepcopy(net)
    if not freeze_sam_to_mean(frozen, fixed_faces(ctx)):
        return {}
    return eq8_sweep(frozen, ctx, "eq8_mse_thetabar")


FIXED_FACES = 256  # occlusion_locality / validation_monitors: distinct faces of the first evaluation set


def fixed_faces(ctx: DiagnosticContext, n: int = FIXED_FACES):
    """(n, 3, S, S) model input on ``ctx.device``: the first image of each of the first n pairs of the first
    evaluation set (distinct faces; for an ``images`` set every other image)."""
    from pipeline.eval.verify import to_model_input

    images, _ = ctx.eval_sets[0].load(ctx.input_size)
    return to_model_input(images[0 : 2 * n : 2]).to(ctx.device)


@register_diagnostic("occlusion_locality")
def occlusion_locality_diagnostic(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """LCD's spec §8 locality at ``layer3.branch`` (the feature an LCD insert there reads), on the first evaluation
    set's first 256 distinct faces, clean: ``spatial_entropy`` / ``top10_energy`` of the channels, and
    ``occlusion_concentration`` (``/eyes``, ``/mask``): with the eye band or the lower face occluded
    (:func:`pipeline.models.lcd.occlude_faces`), the share of the summed relative channel change carried by the
    10 % most-changed channels (⌈0.1·c⌉/c = spread evenly; the paper: SR raises it). Any iresnet network."""
    from pipeline.models.lcd import OCCLUSION_BANDS, occlude_faces, occlusion_locality, point_features

    faces = fixed_faces(ctx)
    feats = point_features(net, [faces] + [occlude_faces(faces, kind) for kind in OCCLUSION_BANDS], "layer3.branch")
    return occlusion_locality(feats[0], dict(zip(OCCLUSION_BANDS, feats[1:])))


@register_diagnostic("validation_monitors")
def validation_monitors_diagnostic(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """What the network's modules measure on fixed clean faces at every in-training evaluation
    (:meth:`FaceNetwork.validation_monitors`; LCD: the occlusion concentration at its own point, θ on the channels
    an occlusion changes most, the next BatchNorm's running-vs-batch gap, eq. 8 at 30 %), on the first evaluation
    set's first 256 distinct faces; nothing for a network whose modules measure nothing there."""
    return net.validation_monitors(fixed_faces(ctx))


def dc_share(weight) -> float:
    """Share of a K×K conv weight's energy in its DC part: Σ_(o,i) (Σ_taps k)² / K² over Σ k² — the squared
    projection onto the constant kernel. 1: every kernel a (scaled) box blur; a zero-sum kernel: 0; i.i.d. random
    taps: 1/K² on average."""
    k = weight.detach().double().flatten(2)
    return float((k.sum(dim=2) ** 2 / k.shape[2]).sum() / (k**2).sum())


@register_diagnostic("kernel_dc_share")
def kernel_dc_share(net, cfg: Config, ctx: DiagnosticContext) -> dict[str, float]:
    """Mean over the 3×3 convolutions of the folded network (what inference applies: SCAN's k_u) of
    :func:`dc_share`: a network that froze as "blur + 1×1" (SAC without LSC, issue 11) is near 1."""
    from torch import nn

    folded, _ = net.folded()
    shares = [dc_share(m.weight) for m in folded.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    return {"dc_share": sum(shares) / len(shares)} if shares else {}


# --------------------------------------------------------------------------- running the grid


@dataclass(frozen=True)
class Plan:
    """How many cells run at once, with how many threads each, and which GPUs each slot owns."""

    jobs: int
    threads: int
    gpu_sets: tuple[str, ...] = ()  # CUDA_VISIBLE_DEVICES per slot; empty on CPU

    def describe(self) -> str:
        where = f"GPUs {' / '.join(self.gpu_sets)}" if self.gpu_sets else "CPU"
        return f"{self.jobs} cell(s) at a time, {self.threads} thread(s) per process, {where}"


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    count = torch.cuda.device_count()
    return listed[:count] if listed else [str(i) for i in range(count)]


def plan_resources(spec: Spec, cells: list[Cell], jobs: int | None, cells_to_run: int) -> Plan:
    cores = spec.processes or _cpu_count()
    uses_gpu = any(c.config.device in ("auto", "cuda") for c in cells)
    gpus = _visible_gpus() if uses_gpu else []
    if gpus and spec.nproc > len(gpus):
        raise SpecError(
            f"{spec.path}: key 'nproc': {spec.nproc} processes per cell, but {len(gpus)} GPU(s) are visible"
        )
    default = len(gpus) // spec.nproc if gpus else cores // spec.nproc
    jobs = max(1, min(jobs or spec.parallel or default, max(1, cells_to_run)))
    threads = max(1, cores // (jobs * spec.nproc))
    # slot k owns nproc GPUs; with more slots than GPUs / nproc (small models) slots share them round-robin
    gpu_sets = [
        ",".join(gpus[(k * spec.nproc + r) % len(gpus)] for r in range(spec.nproc)) for k in range(jobs if gpus else 0)
    ]
    return Plan(jobs, threads, tuple(gpu_sets) if gpus else ())


class Progress:
    """Cells done / total and an ETA from the mean wall time of the cells finished in this run."""

    def __init__(self, total: int, done: int, jobs: int):
        from tqdm import tqdm

        self.total, self.done, self.jobs, self.walls = total, done, jobs, []
        self.bar = tqdm(total=total, initial=done, unit="cell", disable=not sys.stderr.isatty())

    def say(self, text: str) -> None:
        if self.bar.disable:
            print(text, flush=True)
        else:
            self.bar.write(text)

    def finished(self, cell: Cell, record: dict, wall: float) -> None:
        self.done += 1
        self.walls.append(wall)
        self.bar.update(1)
        left = self.total - self.done
        eta = sum(self.walls) / len(self.walls) * math.ceil(left / self.jobs) if left else 0.0
        self.say(
            f"[ablate] {self.done}/{self.total} cells done; {cell.label}: {describe_record(record)} "
            f"in {wall:.0f} s; ETA {hms(eta)}"
        )

    def close(self) -> None:
        self.bar.close()


def describe_record(record: dict) -> str:
    if record.get("status") == "ok":
        shown = []
        for n, m in record.get("metrics", {}).items():
            key = "accuracy" if "accuracy" in m else next((k for k in m if k.startswith("tar@far=")), None)
            value = m.get(key) if key else None
            shown.append(
                f"{n} {'–' if value is None else f'{100 * value:.2f}'}{'' if key == 'accuracy' else f' ({key})'}"
            )
        return "ok, accuracy % " + ", ".join(shown)
    detail = f"exit {record.get('exit_code')}, log {record.get('log')}"
    return f"{str(record.get('status')).upper()} ({detail}): {record.get('error', '')}"


def _cell_command(spec: Spec, cell: Cell) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.ablate",
        str(spec.path.resolve()),
        "--cell",
        cell.key,  # by arm and seed, not index: an arm or seed added to the spec meanwhile shifts the indices
        "--output",
        str(spec.out_dir),
        *spec.extra,
    ]


class GridRunner:
    """Runs the cells that are not cached as ``--cell`` subprocesses, ``plan.jobs`` at a time."""

    def __init__(self, spec: Spec, cells: list[Cell], plan: Plan):
        self.spec, self.cells, self.plan = spec, cells, plan
        self.slots: queue.Queue[int] = queue.Queue()
        for slot in range(plan.jobs):
            self.slots.put(slot)
        self.running: dict[int, subprocess.Popen] = {}
        self.stopping = threading.Event()

    def run(self, todo: list[Cell], progress: Progress) -> bool:
        """True when every cell got its turn; False when interrupted (running cells checkpoint first)."""
        with ThreadPoolExecutor(self.plan.jobs) as pool:
            futures = {pool.submit(self._run_one, cell): cell for cell in todo}
            try:
                for future in as_completed(futures):
                    outcome = future.result()
                    if outcome is not None:
                        progress.finished(futures[future], *outcome)
            except KeyboardInterrupt:
                self.stopping.set()
                progress.say(
                    "[ablate] interrupted: the running cells write a checkpoint and stop (a rerun resumes them)"
                )
                for proc in list(self.running.values()):
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGINT)
                for future in futures:
                    future.result()
                return False
        return True

    def _run_one(self, cell: Cell) -> tuple[dict, float] | None:
        slot = self.slots.get()
        try:
            if self.stopping.is_set():
                return None
            env = {**os.environ, "OMP_NUM_THREADS": str(self.plan.threads), "MKL_NUM_THREADS": str(self.plan.threads)}
            if self.plan.gpu_sets:
                env["CUDA_VISIBLE_DEVICES"] = self.plan.gpu_sets[slot]
            cell.dir.mkdir(parents=True, exist_ok=True)
            log_path = cell.dir / "cell.log"
            started = time.perf_counter()
            with open(log_path, "w") as log:
                proc = subprocess.Popen(
                    _cell_command(self.spec, cell),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # Ctrl-C reaches the runner, which passes on one SIGINT per cell
                    preexec_fn=die_with_parent,  # a cell never outlives its runner (kill -9, the OOM killer)
                )
                self.running[cell.index] = proc
                exit_code = proc.wait()
            record = self._record_of(cell, exit_code, log_path)
            return record, time.perf_counter() - started
        finally:
            self.running.pop(cell.index, None)
            self.slots.put(slot)

    def _record_of(self, cell: Cell, exit_code: int, log_path: Path) -> dict:
        """The cell's cell.json; a subprocess that died before writing one is recorded here."""
        if exit_code == EXIT_BUSY:  # another process holds the cell (it is the one writer of its records)
            return {**_base_record(cell), "status": "running", "exit_code": exit_code, "log": str(log_path)}
        record = _read_json(cell.dir / CELL_JSON)
        if _matches(record, cell):
            return record
        # the spec (or a config layer) was edited while the cell ran, and the cell ran the edited one: its
        # cell.json is valid for the new spec (a rerun finds it cached) and is kept; this run's report leaves it out
        edited = record is not None and record.get("status") == "ok" and exit_code == 0
        record = {
            **_base_record(cell),
            "status": "interrupted" if self.stopping.is_set() and not edited else "failed",
            "exit_code": exit_code,
            "log": str(log_path),
            "error": "the spec or a config it names changed while the cell ran; rerun the runner to use it"
            if edited
            else _log_tail(log_path),
        }
        if not edited:
            save_json(cell.dir / CELL_JSON, record)
        return record


def run_grid(spec: Spec, cells: list[Cell], jobs: int | None) -> bool:
    """Train and evaluate every cell that is not cached; False when interrupted."""
    statuses = {c.index: cell_status(c) for c in cells}
    # seed-major: every arm of seed 0, then of seed 1, ... — a run stopped part-way still gives paired seeds
    todo = sorted(
        (c for c in cells if statuses[c.index] not in ("cached", "running")),
        key=lambda c: (spec.seeds.index(c.seed), c.index),
    )
    plan = plan_resources(spec, cells, jobs, len(todo))
    print(
        f"[ablate] {spec.path}: {len(cells)} cells ({len(spec.arms)} arms × {len(spec.seeds)} seeds), "
        f"{len(cells) - len(todo)} cached, {len(todo)} to run; {plan.describe()}; output {spec.out_dir}",
        flush=True,
    )
    for cell in cells:
        if statuses[cell.index] != "new":
            print(f"[ablate] {cell.label}: {STATUS_TEXT.get(statuses[cell.index], statuses[cell.index])}", flush=True)
    if not todo:
        return True
    progress = Progress(len(cells), len(cells) - len(todo), plan.jobs)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # scancel / kill: stop as for Ctrl-C
    try:
        return GridRunner(spec, cells, plan).run(todo, progress)
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()


def _raise_interrupt(_signum, _frame):
    raise KeyboardInterrupt


# --------------------------------------------------------------------------- aggregation


def _describe(by_seed: dict[int, float]) -> dict:
    values = list(by_seed.values())
    n = len(values)
    mean = sum(values) / n if n else None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n >= 2 else None
    return {"n": n, "mean": mean, "sd": sd, "values": {str(s): v for s, v in by_seed.items()}}


def _paired(arm: dict[int, float], ref: dict[int, float]) -> dict:
    """Difference arm − reference over the seeds both have, with a 95 % t-interval (n − 1 dof) over seeds."""
    from scipy.stats import t

    seeds = [s for s in arm if s in ref]
    diffs = {s: arm[s] - ref[s] for s in seeds}
    out = _describe(diffs)
    out["seeds"] = seeds
    out["ci95"] = None
    if out["n"] >= 2:
        half = float(t.ppf(0.975, out["n"] - 1)) * out["sd"] / math.sqrt(out["n"])
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def summarize(
    values: dict[str, dict[int, dict[str, float]]], arms: list[str], reference: str, columns: list[str] = ()
) -> dict:
    """``values[arm][seed][column]`` → per arm and column: n, mean, sd over seeds (ddof = 1); per other arm and
    column: the paired difference vs ``reference`` (by seed) with its 95 % interval. Absent / None values are
    left out (a failed or missing cell). ``columns``: those always reported (more are found in ``values``)."""
    columns = list(columns)
    for by_seed in values.values():
        for row in by_seed.values():
            columns += [c for c in row if c not in columns]

    def column(arm: str, col: str) -> dict[int, float]:
        rows = values.get(arm, {})
        return {s: float(r[col]) for s, r in rows.items() if r.get(col) is not None}

    per_arm = {arm: {col: _describe(column(arm, col)) for col in columns} for arm in arms}
    paired = {
        arm: {col: _paired(column(arm, col), column(reference, col)) for col in columns}
        for arm in arms
        if arm != reference
    }
    return {"columns": columns, "per_arm": per_arm, "paired": paired}


def collect_records(cells: list[Cell]) -> list[dict]:
    """Each cell's record as the current spec sees it: its cell.json when the hashes match, else missing/stale."""
    records = []
    for cell in cells:
        status = cell_status(cell)
        if status in ("cached", "failed", "interrupted"):
            record = load_json(cell.dir / CELL_JSON)
        else:
            record = {**_base_record(cell), "status": {"changed": "stale", "running": "running"}.get(status, "missing")}
        records.append({**record, "index": cell.index})  # its place in this grid (seeds or arms added since move it)
    return records


def build_report(spec: Spec, records: list[dict], params: dict[str, int] | None = None) -> dict:
    """The report of the cells' records; ``params``: each arm's network parameter count (:func:`arm_parameters`)."""
    arms = [a.name for a in spec.arms]
    ok = [r for r in records if r["status"] == "ok"]
    metric_values: dict = {}
    diag_values: dict = {}
    for r in ok:
        metric_values.setdefault(r["arm"], {})[r["seed"]] = {
            s.name: r["metrics"][s.name].get(s.reported(spec.metric)) for s in spec.eval
        }
        diag_values.setdefault(r["arm"], {})[r["seed"]] = r.get("diagnostics", {})
    return {
        "spec": str(spec.path),
        "metric": spec.metric,
        "set_metrics": {s.name: s.reported(spec.metric) for s in spec.eval},
        "reference": spec.reference,
        "arms": [dataclasses.asdict(a) for a in spec.arms],
        "seeds": spec.seeds,
        "budget": spec.budget,
        "nproc": spec.nproc,
        "eval_sets": [e.identity() for e in spec.eval],
        "complete": len(ok) == len(records),
        "counts": {s: sum(r["status"] == s for r in records) for s in sorted({r["status"] for r in records})},
        "params": params or {},
        "summary": summarize(metric_values, arms, spec.reference, [e.name for e in spec.eval]),
        "diagnostics": summarize(diag_values, arms, spec.reference),
        "cells": records,
    }


# --------------------------------------------------------------------------- the table


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _mean_sd(stats: dict, show: Callable[[float | None], str]) -> str:
    if not stats["n"]:
        return "–"
    if stats["sd"] is None:
        return f"{show(stats['mean'])} (n=1)"
    return f"{show(stats['mean'])} ± {show(stats['sd'])}"


def _diff(stats: dict, scale: float, fmt: str) -> str:
    if not stats["n"]:
        return "–"
    d = format(scale * stats["mean"], fmt)
    if stats["ci95"] is None:
        return f"{d} [n/a] (n={stats['n']})"
    lo, hi = (format(scale * v, fmt) for v in stats["ci95"])
    return f"{d} [{lo}, {hi}] (n={stats['n']})"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _cell_state(record: dict) -> str:
    status = record["status"]
    if status in ("failed", "interrupted"):
        log = f"; {record['log']}" if record.get("log") else ""
        return f"**{status}** (exit {record.get('exit_code')}{log})"
    if status == "stale":
        return "**stale** (config changed since it ran)"
    if status == "running":
        return "**running** (in another process)"
    return status if status == "ok" else f"**{status}**"


def render_markdown(spec: Spec, report: dict) -> str:
    sets = [e.name for e in spec.eval]
    arms = [a.name for a in spec.arms]
    summary, diags = report["summary"], report["diagnostics"]
    budget = ", ".join(f"{k}={v}" for k, v in spec.budget.items())
    reported = {e.name: e.reported(spec.metric) for e in spec.eval}
    own = [e for e in spec.eval if reported[e.name] != spec.metric]
    what = f"{spec.metric} in % (insightface 10-fold protocol on each set)"
    if own:
        what = f"{spec.metric} in % (insightface 10-fold protocol) on the pair sets; " + "; ".join(
            f"`{e.name}`: {reported[e.name]}"
            + (" in % over all pairs of its images" if e.images else " in % (10-fold protocol)")
            for e in own
        )
    lines = [
        f"# Ablation `{spec.path.stem}`: {spec.metric}",
        "",
        f"Spec `{spec.path}`; budget {budget}; seeds {', '.join(map(str, spec.seeds))}; {spec.nproc} process(es) per "
        f"cell. {what}; mean ± sd over seeds (sd with "
        f"ddof = 1); paired differences vs `{spec.reference}` in points, by seed, with a 95 % t-interval over the "
        "seeds (n − 1 degrees of freedom; n/a with fewer than 2 pairs).",
        "",
    ]
    if not report["complete"]:
        counts = ", ".join(f"{n} {s}" for s, n in report["counts"].items() if s != "ok")
        lines += [
            f"**Incomplete: {counts}** of {len(report['cells'])} cells; the tables use the cells that finished.",
            "",
        ]
    params = report.get("params", {})
    rows = [
        [
            f"{arm}{' (ref)' if arm == spec.reference else ''}",
            f"{params[arm]:,}" if arm in params else "–",
            str(max((summary["per_arm"][arm][s]["n"] for s in sets), default=0)),
        ]
        + [_mean_sd(summary["per_arm"][arm][s], _pct) for s in sets]
        for arm in arms
    ]
    heads = [s if reported[s] == spec.metric else f"{s} ({reported[s]})" for s in sets]
    lines += [
        f"## {spec.metric} (%): mean ± sd over seeds",
        "",
        *_table(["arm", "params", "n", *heads], rows),
        "",
        "params: the network's (trunk, inserts, head; the classifier adds classes × embedding size).",
        "",
    ]
    rows = [
        [arm] + [_diff(summary["paired"][arm][s], 100, "+.2f") for s in sets] for arm in arms if arm != spec.reference
    ]
    if rows:
        others = [a for a in arms if a != spec.reference]
        resolved = resolved_comparisons(summary["paired"], others, sets, 100, "+.2f")
        lines += [
            f"## Paired difference vs `{spec.reference}` (points, 95 % interval)",
            "",
            *_table(["arm", *sets], rows),
            "",
            "Resolved (the 95 % interval excludes 0): " + ("" if resolved else "none."),
            *resolved,
            "",
        ]
    dcols = diags["columns"]
    if dcols:
        rows = [[arm] + [_mean_sd(diags["per_arm"][arm][c], _num) for c in dcols] for arm in arms]
        lines += ["## Diagnostics: mean ± sd over seeds", "", *_table(["arm", *dcols], rows), ""]
        rows = [
            [arm] + [_diff(diags["paired"][arm][c], 1, "+.4g") for c in dcols] for arm in arms if arm != spec.reference
        ]
        if rows:
            resolved = resolved_comparisons(diags["paired"], [a for a in arms if a != spec.reference], dcols, 1, "+.4g")
            lines += [
                f"Paired difference vs `{spec.reference}` (95 % interval):",
                "",
                *_table(["arm", *dcols], rows),
                "",
                "Resolved (the 95 % interval excludes 0): " + ("" if resolved else "none."),
                *resolved,
                "",
            ]
    rows = []
    for r in report["cells"]:
        ok = r["status"] == "ok"
        row = [str(r["index"]), r["arm"], str(r["seed"]), _cell_state(r)]
        row += [_pct(r["metrics"][s].get(reported[s])) if ok else "–" for s in sets]
        row += [_num(r.get("diagnostics", {}).get(c)) if ok else "–" for c in dcols]
        row += [str(r.get("train_s", "–")), str(r.get("eval_s", "–"))]
        rows.append(row)
    head = ["#", "arm", "seed", "status", *sets, *dcols, "train s", "eval s"]
    lines += ["## Cells", "", *_table(head, rows), ""]
    return "\n".join(lines)


def arm_parameters(cells: list[Cell]) -> dict[str, int]:
    """Each arm's network parameter count (from its first cell's resolved config; seeds do not change it)."""
    out: dict[str, int] = {}
    for cell in cells:
        if cell.arm not in out:
            out[cell.arm] = parameter_count(cell.config)
    return out


def resolved_comparisons(paired: dict, arms: list[str], columns: list[str], scale: float, fmt: str) -> list[str]:
    """The paired comparisons whose 95 % interval excludes 0, one line each (what the prose may call an effect)."""
    out = []
    for arm in arms:
        for col in columns:
            stats = paired.get(arm, {}).get(col)
            ci = stats and stats.get("ci95")
            if ci and (ci[0] > 0 or ci[1] < 0):
                lo, hi = (format(scale * v, fmt) for v in ci)
                out.append(f"- `{arm}` on `{col}`: {format(scale * stats['mean'], fmt)} [{lo}, {hi}] (n={stats['n']})")
    return out


def write_report(spec: Spec, cells: list[Cell]) -> dict:
    """results.json + results.md in the output folder, from the cells on disk."""
    report = build_report(spec, collect_records(cells), arm_parameters(cells))
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    save_json(spec.out_dir / "results.json", report)
    markdown = render_markdown(spec, report)
    (spec.out_dir / "results.md").write_text(markdown)
    return {**report, "markdown": markdown}


# --------------------------------------------------------------------------- command line


def print_grid(spec: Spec, cells: list[Cell]) -> None:
    width = max(len(c.arm) for c in cells)
    print(f"{'#':>4}  {'arm':<{width}}  {'seed':>6}  status")
    statuses = [cell_status(c) for c in cells]
    for cell, status in zip(cells, statuses):
        print(f"{cell.index:>4}  {cell.arm:<{width}}  {cell.seed:>6}  {STATUS_TEXT.get(status, status)}")
    cached = statuses.count("cached")
    print(
        f"{len(cells)} cells ({len(spec.arms)} arms × {len(spec.seeds)} seeds): {cached} cached, {len(cells) - cached} to run"
    )
    base = ["python", "-m", "pipeline.ablate", str(spec.path), *spec.extra, "--output", spec.output]
    inner = (
        (shlex.join(base) + " --cell $SLURM_ARRAY_TASK_ID")
        .replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("$", "\\$")
    )
    print(f'Slurm: sbatch --array=0-{len(cells) - 1} --wrap "{inner}"')
    print(f"then:  {shlex.join([*base, '--report-only'])}")


def _threads_here(spec: Spec) -> int:
    """Threads for a --cell run: OMP_NUM_THREADS when set (the runner sets it), else this task's cores / nproc."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0) or spec.processes or _cpu_count()
    return max(1, cores // spec.nproc)


def find_cell(cells: list[Cell], which: str | int) -> Cell:
    """``--cell``'s cell: an index into the grid, or ``ARM@SEED`` (what the runner passes its subprocesses)."""
    text = str(which).strip()
    if "@" in text:
        arm, _, seed = text.rpartition("@")
        for cell in cells:
            if cell.arm == arm and str(cell.seed) == seed:
                return cell
        raise SpecError(f"--cell {text}: no arm '{arm}' with seed {seed} in the spec (the spec changed?); see --list")
    if not text.lstrip("-").isdigit():
        raise SpecError(f"--cell {text}: give a cell index or ARM@SEED")
    index = int(text)
    if not 0 <= index < len(cells):
        raise SpecError(f"--cell {index}: the grid has {len(cells)} cells (0-{len(cells) - 1}); see --list")
    return cells[index]


def run_one(spec: Spec, cells: list[Cell], which: str | int) -> int:
    """``--cell``: train and evaluate one cell, holding its folder's lock: the holder is the one writer of the
    cell's train_state.json and cell.json, and a second process for the same cell refuses (exit 75)."""
    cell = find_cell(cells, which)
    try:
        lock = FolderLock(cell.dir, "ablation cell").acquire()
    except FolderLocked as exc:
        print(f"error: {cell.label}: {exc}", file=sys.stderr, flush=True)
        return EXIT_BUSY
    try:
        record = run_cell(spec, cell, _threads_here(spec))
    finally:
        lock.release()
    print(f"[ablate] {cell.label}: {describe_record(record)}", flush=True)
    return 0 if record["status"] == "ok" else EXIT_INCOMPLETE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.ablate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python -m pipeline.ablate configs/ablations/smoke_scan.yaml --list, then without --list.",
    )
    ap.add_argument("spec", help="the ablation spec (YAML), e.g. configs/ablations/smoke_scan.yaml")
    ap.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides for every arm, after the spec's (e.g. data.train=/scratch/shards); "
        "give the same ones to --cell and --report-only",
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--list", action="store_true", help="print the grid (index, arm, seed, status) and the sbatch line"
    )
    mode.add_argument(
        "--cell",
        metavar="INDEX|ARM@SEED",
        help="run only that cell: its index (a Slurm array task: --cell $SLURM_ARRAY_TASK_ID) or arm@seed",
    )
    mode.add_argument(
        "--report-only", action="store_true", help="write results.json / results.md from the cells on disk"
    )
    ap.add_argument(
        "--jobs", type=int, metavar="N", help="cells at a time (default: the spec's parallel:, else automatic)"
    )
    ap.add_argument("--output", metavar="DIR", help="output folder (default: the spec's output:)")
    args = ap.parse_intermixed_args(argv)
    if args.jobs is not None and args.jobs < 1:
        ap.error("--jobs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = load_spec(args.spec, args.overrides, args.output)
        cells = build_grid(spec)
        if args.list:
            print_grid(spec, cells)
            return 0
        if args.cell is not None:
            return run_one(spec, cells, args.cell)
        finished = True if args.report_only else run_grid(spec, cells, args.jobs)
        report = write_report(spec, cells)
    except (SpecError, ConfigError, DataError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return EXIT_SPEC
    print(report["markdown"], flush=True)
    print(f"[ablate] wrote {spec.out_dir / 'results.md'} and {spec.out_dir / 'results.json'}", flush=True)
    if not finished:
        return EXIT_INTERRUPTED
    return 0 if report["complete"] else EXIT_INCOMPLETE


if __name__ == "__main__":
    # Run the importable module's main: a plugin's `from pipeline.ablate import register_diagnostic` registers
    # into pipeline.ablate's table, which this __main__ copy of the module would not see.
    from pipeline.ablate import main as package_main

    sys.exit(package_main())
