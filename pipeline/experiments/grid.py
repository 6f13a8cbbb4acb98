"""The grid: one cell per arm × seed, each arm's resolved config checked against the spec (budget held, data order shared), the hashes that decide what is cached, and a cell's state on disk."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.manifest import DataError, read_manifest
from pipeline.checkpoint import latest_or_none, load_json
from pipeline.config import Config, ConfigError, load_config, parse_override
from pipeline.core.cache import digest
from pipeline.experiments.diagnostics import diagnostics
from pipeline.experiments.spec import CELL_JSON, DATA_ORDER_KEYS, TRAIN_STATE, Spec, SpecError
from pipeline.runlock import is_locked


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
    return digest({"config": resolved, "nproc": nproc}, 16)  # the one cache's key digest


def eval_hash(spec: Spec) -> str:
    return digest({"eval": [e.identity() for e in spec.eval], "diagnostics": spec.diagnostics}, 16)


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
    table = diagnostics()  # the generic ones (imported above) and the models' (their packages imported)
    for name in spec.diagnostics:
        if name not in table:
            known = ", ".join(sorted(table))
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


def read_json(path: Path) -> dict | None:
    try:
        return load_json(path)
    except (OSError, ValueError):
        return None


def training_state(cell: Cell) -> str:
    """done (trained with this config) | resume (stopped midway, same config) | changed (another config) | fresh."""
    state = read_json(cell.dir / TRAIN_STATE)
    if state is None:
        return "fresh"
    if state.get("train_hash") != cell.train_hash:
        return "changed"
    if latest_or_none(cell.run_dir / "checkpoints") is None:
        return "fresh"
    return "done" if state.get("status") == "done" else "resume"


def record_matches(record: dict | None, cell: Cell) -> bool:
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
    record = read_json(cell.dir / CELL_JSON)
    if record_matches(record, cell):
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


def base_record(cell: Cell) -> dict:
    return {
        "index": cell.index,
        "arm": cell.arm,
        "seed": cell.seed,
        "train_hash": cell.train_hash,
        "eval_hash": cell.eval_hash,
        "dir": str(cell.dir),
    }


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
