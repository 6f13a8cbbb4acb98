"""The ablation spec: its YAML schema (arms, seeds, budget, eval sets, diagnostics), typed and validated with one-line errors naming the key."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from pipeline.config import ConfigError, parse_override, read_yaml_mapping
from pipeline.eval.sets import EvalSet
from pipeline.eval.tarfar import ALL_PAIRS_FARS  # TAR kept for an ``images`` set (plus its metric's FAR)

METRICS = ("accuracy", "accuracy_noflip", "auc")  # what the table may report; all are fractions, shown in %
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
class EvalSetSpec:
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

        return tuple(sorted({*ALL_PAIRS_FARS, parse_far_key(self.metric or DEFAULT_IMAGES_METRIC)}, reverse=True))

    def to_eval_set(self) -> EvalSet:
        """The set itself (:class:`pipeline.eval.sets.EvalSet`, the one type every evaluation reads)."""
        if self.images:
            return EvalSet.from_images(self.images, self.name, self.fars())
        if self.bin:
            return EvalSet.from_bin(self.bin, self.name)
        return EvalSet.from_pairs(self.pairs, self.root, self.ext, self.name)


@dataclass
class Spec:
    """An ablation: the base config, the arms, the seeds, the budget, the evaluation sets."""

    config: list[str]
    arms: list[Arm]
    seeds: list[int]
    budget: dict
    eval: list[EvalSetSpec]
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
