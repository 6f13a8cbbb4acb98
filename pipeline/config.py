"""Typed configuration loaded from layered YAML files plus ``key=value`` overrides.

A YAML file may name a ``base:`` (a path relative to itself, or a list of them); bases are
merged first, the file on top. Several ``--config`` files are merged left to right, then the
command-line overrides. The merged dict is validated into the dataclasses below: an unknown
key, or a value of the wrong type, is a :class:`ConfigError` whose one-line message names the
key and the file that set it.

The ``method:`` block belongs to the recipe: its schema is the dataclass the recipe registered
(see :mod:`pipeline.registry`), so recipes add options without touching this file.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, with a message that names the file and key."""


# --------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    backbone: str = "iresnet50"  # registry name: iresnet18/34/50/100/200, scan_iresnet50, ...
    embedding_size: int = 512
    width: float = 1.0  # channel multiplier (1.0 = insightface widths); tiny test models use 0.125
    input_size: int = 112
    dropout: float = 0.0
    options: dict = field(default_factory=dict)  # backbone-specific switches (e.g. SCAN's sac/lsc)


@dataclass
class MarginConfig:
    """Combined margin cos(m1*theta + m2) - m3 scaled by s (ArcFace: m2=0.5, CosFace: m3=0.35/0.4)."""
    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0


@dataclass
class ClassifierConfig:
    sample_rate: float = 1.0  # partial-FC negative sampling rate; positives are always kept
    lr_scale: float = 1.0  # classifier lr = optim.lr * lr_scale


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 0.0  # 0 disables


@dataclass
class ScheduleConfig:
    """Learning-rate schedule stated in epochs, as the papers state it."""
    epochs: float = 20.0
    warmup_epochs: float = 0.0
    kind: str = "step"  # step | poly | cosine
    milestones: list = field(default_factory=list)  # epochs at which lr *= gamma (step)
    gamma: float = 0.1
    power: float = 2.0  # poly
    max_steps: int = 0  # >0: stop after this many optimizer steps (smoke runs)


@dataclass
class AugmentConfig:
    """One augmentation spec shared by the DALI and the torch loader."""
    flip: float = 0.5
    multires_p: float = 0.0  # probability of the multi-resolution degradation
    multires_sizes: list = field(default_factory=lambda: [7, 14, 20])
    multires_weights: list = field(default_factory=lambda: [1.0, 1.0, 2.0])
    crop_p: float = 0.0  # AdaFace-style random rectangle crop
    crop_scale: list = field(default_factory=lambda: [0.2, 1.0])
    blur_p: float = 0.0
    blur_sigma: list = field(default_factory=lambda: [0.5, 3.0])
    photometric_p: float = 0.0
    brightness: float = 0.5
    contrast: float = 0.5
    saturation: float = 0.5
    paired: bool = False  # also emit image_lr: the multi-resolution copy of the same augmented HR


@dataclass
class DataConfig:
    train: str = ""  # WebDataset shard directory holding manifest.json
    val: list = field(default_factory=list)  # insightface .bin files
    loader: str = "torch"  # torch | dali
    batch_size: int = 128  # per rank
    num_workers: int = 2
    shuffle_buffer: int = 1000
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    precision: str = "fp32"  # fp32 | fp16 | bf16
    grad_accum: int = 1


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    log_every: int = 10  # steps between TensorBoard scalar writes
    checkpoint_every: int = 1000  # steps; a checkpoint is always written at the end
    eval_every: int = 2000  # steps; 0 disables periodic verification
    histogram_every: int = 200
    keep_checkpoints: int = 2


@dataclass
class Config:
    recipe: str = "margin"  # registry name of the recipe (see pipeline/recipes)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    model: ModelConfig = field(default_factory=ModelConfig)
    margin: MarginConfig = field(default_factory=MarginConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    method: Any = field(default_factory=dict)  # recipe-specific dataclass, resolved by the registry


# --------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(dst: dict, src: dict, origin: dict, source: str, prefix: str = "") -> None:
    """Deep-merge ``src`` into ``dst``; record in ``origin`` which source set each leaf key."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict) and key != "options":
            _merge(dst[key], value, origin, source, dotted + ".")
        else:
            dst[key] = value
            origin[dotted] = source


def _load_layers(path: Path, merged: dict, origin: dict, seen: tuple = ()) -> None:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain")
    data = _read_yaml(path)
    bases = data.pop("base", None) or []
    for base in [bases] if isinstance(bases, str) else bases:
        _load_layers((path.parent / base), merged, origin, seen + (path,))
    _merge(merged, data, origin, str(path))


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw != "" else ""


def _nest(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def load_config(paths: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Merge YAML layers and ``key=value`` overrides, then validate into a :class:`Config`."""
    merged: dict = {}
    origin: dict = {}
    for p in paths:
        _load_layers(Path(p), merged, origin)
    for text in overrides:
        key, value = parse_override(text)
        _merge(merged, _nest(key, value), origin, "command line")
    cfg = from_dict(Config, merged, origin)
    from pipeline import registry  # the recipe owns the schema of `method`

    schema = registry.recipe_config_class(cfg.recipe, origin.get("recipe", "defaults"))
    cfg.method = from_dict(schema, cfg.method or {}, origin, prefix="method.")
    return cfg


# --------------------------------------------------------------------------- validation

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_value(tp: Any, value: Any, key: str, origin: dict) -> Any:
    where = origin.get(key) or _nearest_origin(key, origin)

    def fail(expected: str):
        raise ConfigError(f"{where}: key '{key}' expects {expected}, got {value!r}")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(f"a mapping of {tp.__name__} fields")
        return from_dict(tp, value, origin, prefix=key + ".")
    org = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if tp is list or org is list:
        if isinstance(value, str) and tp is list:
            return [value]  # `data.val=a.bin` on the command line
        if not isinstance(value, list):
            fail("a list")
        args = typing.get_args(tp)
        return [_check_value(args[0], v, key, origin) for v in value] if args else value
    if tp is dict or org is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        return value
    if org in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _check_value(arg, value, key, origin)
            except ConfigError:
                continue
        fail(str(tp))
    return value


def _nearest_origin(key: str, origin: dict) -> str:
    """The source that set ``key`` or any key under it (used for block-level errors)."""
    for k, src in origin.items():
        if k.startswith(key + ".") or key.startswith(k + "."):
            return src
    return "defaults"


def from_dict(cls: type, data: dict, origin: dict | None = None, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown or ill-typed keys raise :class:`ConfigError`."""
    origin = origin or {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            where = origin.get(dotted) or _nearest_origin(dotted, origin)
            raise ConfigError(f"{where}: unknown key '{dotted}' (known: {', '.join(sorted(names))})")
        if key == "method" and cls is Config:
            kwargs[key] = value  # validated against the recipe's schema by load_config
            continue
        kwargs[key] = _check_value(hints[key], value, dotted, origin)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config (what a checkpoint was trained with) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_from_resolved(path: str | Path) -> Config:
    """Load a config written by :func:`dump_config` (a single self-contained layer)."""
    return load_config([path])
