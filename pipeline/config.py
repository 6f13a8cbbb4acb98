"""Typed configuration loaded from layered YAML files plus ``key=value`` overrides.

A YAML file may name a ``base:`` (a path relative to itself, or a list of them); bases are
merged first, the file on top. Several ``--config`` files are merged left to right, then the
command-line overrides. The merged dict is validated into the dataclasses below: an unknown
key, or a value of the wrong type, is a :class:`ConfigError` whose one-line message names the
key and the file that set it.

The ``method:`` block belongs to the recipe and the blocks ``model.conv``, ``model.head`` and each
entry of ``model.inserts`` to the part their ``kind`` names: their schemas are the dataclasses those
parts registered (see :mod:`pipeline.registry`), so new parts add options without touching this file.

Validation lives with the types: a dataclass may define ``validate(self)`` (checks on its own fields,
raising :class:`Invalid` with the field name) and a recipe's options ``validate_with(self, cfg)``
(checks against the rest of the config). Keys renamed by a redesign are errors that name the new key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import ConfigError, Invalid  # noqa: F401  (re-exported: pipeline.config.ConfigError)
from pipeline.core.schema import InsertOptions, PartOptions  # noqa: F401  (re-exported for the parts)

# Keys and values of earlier releases → what to write now (a one-line error says so).
RENAMED_KEYS = {
    "model.embedding_size": "model.head.embedding_size",
    "model.dropout": "model.head.dropout",
    "model.options": "model.conv (e.g. model.conv: {kind: scan, lsc: false})",
}
RENAMED_KEYS.update(
    {
        f"method.{k}": f"model.conv.{k} (with model.conv.kind: scan)"
        for k in (
            "sac",
            "lsc",
            "rmo",
            "rmo_weight",
            "rmo_lambda",
            "gamma_m",
            "efficient_rmo",
            "t_min",
            "gaussian_sum1",
            "t_density_png",
        )
    }
)
RENAMED_KEYS["method.init_backbone"] = "model.init_from"
RENAMED_VALUES = {
    ("recipe", "scan"): "recipe: margin with model.conv: {kind: scan, ...} (the SCAN switches moved from "
    "method: to model.conv:, method.init_backbone to model.init_from)",
}
RENAMED_BACKBONE_PREFIX = ("scan_", "model.backbone: {plain} with model.conv: {{kind: scan}}")


# --------------------------------------------------------------------------- ranges

_RANGE_RE = re.compile(r"^([\[(])\s*([^,]+?)\s*,\s*([^,\])]+?)\s*([\])])(?:\s*:\s*(.+))?$")


@dataclass(frozen=True)
class Range:
    """An interval written as in mathematics: ``"[0, 1)"``, ``"(0, inf)"``, ``"[16, inf)"``, ``"[0, pi)"``; after a
    colon, why (``"[0, inf): 0 disables"``), which the error message repeats."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool
    text: str
    note: str = ""

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below


def parse_range(text: str) -> Range:
    m = _RANGE_RE.match(text.strip())
    if not m:
        raise ValueError(f"not an interval: {text!r}")
    value = {"inf": math.inf, "-inf": -math.inf, "pi": math.pi}
    low, high = (value[v] if v in value else float(v) for v in (m.group(2), m.group(3)))
    interval = f"{m.group(1)}{m.group(2)}, {m.group(3)}{m.group(4)}"
    return Range(low, high, m.group(1) == "[", m.group(4) == "]", interval, m.group(5) or "")


def field_ranges(cls: type) -> dict[str, Range]:
    """The valid range of each numeric field of a config dataclass: its class attribute ``RANGES`` (a mapping of
    field name → interval text; every int/float field has one, tests/unit/test_config_ranges.py walks them all)."""
    cached = cls.__dict__.get("_parsed_ranges")
    if cached is None:
        cached = {}
        for klass in reversed(cls.__mro__):
            cached.update({k: parse_range(v) for k, v in klass.__dict__.get("RANGES", {}).items()})
        cls._parsed_ranges = cached
    return cached


def check_ranges(obj) -> None:
    """Raise :class:`Invalid` for the first numeric field of ``obj`` outside its :func:`field_ranges` interval."""
    for name, rng in field_ranges(type(obj)).items():
        value = getattr(obj, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in rng:
            why = f" ({rng.note})" if rng.note else ""
            raise Invalid(name, f"must be in {rng.text}{why}, got {value}")


# --------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    """The face network = trunk (``backbone`` + ``conv`` kind) + ``inserts`` + ``head`` (pipeline.models.network)."""

    RANGES = {"width": "(0, inf)", "input_size": "[16, inf)"}  # field → valid interval (check_ranges)

    backbone: str = "iresnet50"  # trunk registry name: iresnet18/34/50/100/200, se_iresnet50/100
    width: float = 1.0  # channel multiplier (1.0 = insightface widths); tiny test models use 0.0625
    input_size: int = 112
    conv: Any = field(default_factory=lambda: {"kind": "plain"})  # plain | scan (+ the kind's options)
    inserts: list = field(default_factory=list)  # [{kind: ..., at: POINT, ...}], applied in list order
    head: Any = field(default_factory=lambda: {"kind": "fc"})  # fc (+ embedding_size, dropout) | ...
    # Initialise the network from a checkpoint dir / run dir (latest) / model.pt of the same architecture
    # (fine-tuning). Once loaded, the path moves to `initialised_from` (provenance; never read again).
    init_from: str = ""
    initialised_from: str = ""
    # torch.compile in training: none | blocks (each residual block compiled in place: one compile per distinct block
    # shape, ~8 for an r100) | full (the whole network; a minute or more of compile at start-up). none by default
    # until a GPU measurement says which is faster (make gpu-check: "compiled blocks"); eval and export never compile
    compile: str = "none"

    def validate(self):
        if self.compile not in ("none", "blocks", "full"):
            raise Invalid("compile", f"unknown mode '{self.compile}' (known: none, blocks, full)")


@dataclass
class MarginConfig:
    """Combined margin cos(m1*theta + m2) - m3 scaled by s (ArcFace: m2=0.5, CosFace: m3=0.35/0.4)."""

    RANGES = {
        "s": "(0, inf)",
        "m1": "(0, inf)",
        "m2": "[0, pi)",
        "m3": "[0, 1]",
    }  # field → valid interval (check_ranges)

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0


@dataclass
class ClassifierConfig:
    RANGES = {"sample_rate": "(0, 1]", "lr_scale": "[0, inf)"}  # field → valid interval (check_ranges)
    sample_rate: float = 1.0  # partial-FC negative sampling rate; positives are always kept
    lr_scale: float = 1.0  # classifier lr = optim.lr * lr_scale
    # the cosine-logits matmul (batch × classes × D, the classifier's FLOPs): fp32 | bf16 (its inputs rounded to
    # bf16, as arcface_torch's autocast does; the softmax stays fp32) | tf32 (CUDA's TF32 matmul; fp32 on the CPU)
    logits: str = "fp32"

    def validate(self):
        if self.logits not in ("fp32", "bf16", "tf32"):
            raise Invalid("logits", f"must be fp32, bf16 or tf32, got {self.logits!r}")


@dataclass
class OptimConfig:
    RANGES = {
        "lr": "(0, inf)",
        "momentum": "[0, 1)",
        "weight_decay": "[0, inf)",
        "grad_clip": "[0, inf)",
        "max_nonfinite_steps": "[1, inf)",
        "reference_batch": "[0, inf)",
    }  # field → valid interval (check_ranges)
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 0.0  # 0 disables
    # false: no weight decay on normalisation layers' weights and biases (BatchNorm, GroupNorm, LayerNorm), as
    # AdaFace's split_parameters does (the LGAF recipe); true: arcface_torch's decay on every parameter
    norm_weight_decay: bool = True
    # A step whose loss is NaN/inf on any rank is skipped (no update; counted in TensorBoard and on the
    # console); after this many consecutive skipped steps (fp16 overflow skips included) the run stops with a
    # one-line error and exit code 3, keeping its last (finite) checkpoint.
    max_nonfinite_steps: int = 5
    # The global batch `lr` is stated for (the paper's: the recipes set it). With scale_lr: true (the throughput
    # layer, configs/throughput.yaml) the lr follows the actual global batch linearly (Goyal et al. 2017):
    # lr × data.batch_size × world × grad_accum / reference_batch; false: `lr` as written, whatever the batch.
    reference_batch: int = 0
    scale_lr: bool = False

    def validate(self):
        if self.scale_lr and self.reference_batch < 1:
            raise Invalid("scale_lr", "needs optim.reference_batch (the global batch optim.lr is stated for) > 0")
        if self.name not in ("sgd", "adamw"):
            raise Invalid("name", f"unknown optimizer '{self.name}' (known: sgd, adamw)")
        b = self.betas
        if (
            not isinstance(b, list)
            or len(b) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0 for v in b)
        ):
            raise Invalid("betas", f"expects [beta1, beta2], each in [0, 1), got {b}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule stated in epochs, as the papers state it."""

    RANGES = {
        "epochs": "(0, inf)",
        "warmup_epochs": "[0, inf)",
        "gamma": "(0, inf)",
        "power": "(0, inf)",
        "max_steps": "[0, inf)",
    }  # field → valid interval (check_ranges)

    epochs: float = 20.0
    warmup_epochs: float = 0.0
    kind: str = "step"  # step | poly | cosine
    milestones: list = field(default_factory=list)  # epochs at which lr *= gamma (step)
    gamma: float = 0.1
    # step: one factor per milestone instead of gamma, e.g. CQA-Face's MS1MV2 schedule [0.1, 0.1, 0.3333]
    # (÷10, ÷10, then 3e-4 → 1e-4); empty = gamma at every milestone
    factors: list = field(default_factory=list)
    power: float = 2.0  # poly
    max_steps: int = 0  # >0: stop after this many optimizer steps (smoke runs)

    def validate(self):
        if self.kind not in ("step", "poly", "cosine"):
            raise Invalid("kind", f"unknown schedule '{self.kind}' (known: step, poly, cosine)")
        if self.warmup_epochs >= self.epochs:
            raise Invalid("warmup_epochs", f"must be in [0, epochs), got {self.warmup_epochs}")
        if list(self.milestones) != sorted(self.milestones):
            raise Invalid("milestones", f"must be increasing, got {self.milestones}")
        if self.factors and len(self.factors) != len(self.milestones):
            raise Invalid(
                "factors", f"needs one factor per milestone ({len(self.milestones)}), got {len(self.factors)}"
            )
        if any(not f > 0 for f in self.factors):
            raise Invalid("factors", f"factors must be > 0, got {self.factors}")


@dataclass
class AugmentConfig:
    """One augmentation spec shared by the DALI and the torch loader."""

    RANGES = {
        "flip": "[0, 1]: a probability",
        "multires_p": "[0, 1]: a probability",
        "crop_p": "[0, 1]: a probability",
        "blur_p": "[0, 1]: a probability",
        "photometric_p": "[0, 1]: a probability",
        "lowres_p": "[0, 1]: a probability",
        "cutout_p": "[0, 1]: a probability",
        "brightness": "[0, inf)",
        "contrast": "[0, inf)",
        "saturation": "[0, inf)",
        "cutout_size": "[1, inf)",
    }  # field → valid interval (check_ranges)

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
    lowres_p: float = 0.0  # AdaFace low-resolution rescale: down to int(r·S) px and back up (AdaFace/LGAF: 0.2)
    lowres_ratio: list = field(default_factory=lambda: [0.2, 1.0])  # r ~ U(low, high), AdaFace's range
    # interpolation of each resize, drawn uniformly and independently for down and up (no "area": not in DALI)
    lowres_interp: list = field(default_factory=lambda: ["nearest", "linear", "cubic", "lanczos"])
    cutout_p: float = 0.0  # Cutout (DeVries & Taylor 2017): one black square, centre uniform, clipped at borders
    cutout_size: int = 56  # side in px at the input size; 0.5·S, DeVries' CIFAR-10 ratio (16 of 32 px)

    _LOWRES_INTERPS = ("nearest", "linear", "cubic", "lanczos")  # not a field (no annotation)

    def validate(self):
        sizes, weights = self.multires_sizes, self.multires_weights
        if not sizes or len(sizes) != len(weights):
            raise Invalid("multires_weights", f"needs one weight per size in multires_sizes, got {weights} for {sizes}")
        if any((not isinstance(s, int)) or isinstance(s, bool) or s < 1 for s in sizes):
            raise Invalid("multires_sizes", f"sizes must be positive integers (px), got {sizes}")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise Invalid("multires_weights", f"weights must be >= 0 with a positive sum, got {weights}")
        for name in ("crop_scale", "blur_sigma"):
            rng = getattr(self, name)
            if len(rng) != 2 or not (0.0 < rng[0] <= rng[1]):
                raise Invalid(name, f"expects [low, high] with 0 < low <= high, got {rng}")
        if self.crop_scale[1] > 1.0:
            raise Invalid("crop_scale", f"the area fraction cannot exceed 1, got {self.crop_scale}")
        r = self.lowres_ratio
        if not isinstance(r, (list, tuple)) or len(r) != 2 or not (0.0 < r[0] <= r[1] <= 1.0):
            raise Invalid("lowres_ratio", f"expects [low, high] with 0 < low <= high <= 1 (side ratio), got {r}")
        names = self.lowres_interp
        if not isinstance(names, (list, tuple)) or not names:
            raise Invalid("lowres_interp", f"expects a non-empty list of {list(self._LOWRES_INTERPS)}, got {names}")
        for n in names:
            if n not in self._LOWRES_INTERPS:
                why = " (OpenCV's INTER_AREA has no DALI equivalent)" if n == "area" else ""
                raise Invalid("lowres_interp", f"unknown interpolation {n!r}{why}; known: {list(self._LOWRES_INTERPS)}")
        c = self.cutout_size
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise Invalid("cutout_size", f"must be a positive integer (px at the input size), got {c}")


@dataclass
class DataConfig:
    RANGES = {
        "batch_size": "[1, inf)",
        "num_workers": "[0, inf)",
        "shuffle_buffer": "[0, inf)",
        "max_bad_fraction": "[0, 1]",
        "dali_prefetch": "[1, 16]",
        "dali_hw_decoder_load": "[0, 1]",
    }  # field → valid interval (check_ranges)
    train: str = ""  # WebDataset shard directory holding manifest.json
    val: list = field(default_factory=list)  # insightface .bin files
    loader: str = "auto"  # auto (DALI on CUDA when it imports, else torch) | torch | dali
    batch_size: int = 128  # per rank
    num_workers: int = 2
    shuffle_buffer: int = 1000
    # Corrupt or unusable samples (bad JPEG, label >= num_classes, ...) are skipped and counted; above this
    # fraction of what was read (all ranks, checked at each log step) the run stops with a one-line error.
    max_bad_fraction: float = 0.01
    # DALI only: batches prepared ahead (prefetch_queue_depth) and the share of JPEG decoding on the GPU's hardware
    # decoder (fn.decoders.image(device="mixed", hw_decoder_load); DALI's default 0.65). bench_gpu.py --parts dali
    # sweeps both with num_workers (DALI's CPU threads)
    dali_prefetch: int = 2
    dali_hw_decoder_load: float = 0.65
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self):
        if self.loader not in ("auto", "torch", "dali"):
            raise Invalid("loader", f"unknown loader '{self.loader}' (known: auto, torch, dali)")


@dataclass
class DeepSpeedConfig:
    RANGES = {
        "zero_stage": "[0, 2]: the classifier is already sharded",
        "grad_accum": "[1, inf)",
        "initial_scale_power": "[0, 40]",
    }  # field → valid interval (check_ranges)
    # 0: every rank holds the whole optimizer state, DeepSpeed all-reduces gradients (bf16: torch autocast, the lean
    # step, pipeline/train/engine.py); 1 | 2: ZeRO partitions the optimizer state (and gradients) over the ranks
    zero_stage: int = 0
    # auto: bf16 on a CUDA device that has it (the fast path: arcface_torch trains under autocast), fp32 on the
    # CPU; the trainer writes the precision it chose into the run's config.yaml. Or fp32 | fp16 | bf16.
    precision: str = "auto"
    grad_accum: int = 1
    initial_scale_power: int = 16  # fp16: the dynamic loss scale starts at 2**this (DeepSpeed's default 16)

    def validate(self):
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise Invalid("precision", f"unknown precision '{self.precision}' (known: auto, fp32, fp16, bf16)")


@dataclass
class OutputConfig:
    RANGES = {
        "log_every": "[1, inf)",
        "checkpoint_every": "[1, inf)",
        "eval_every": "[0, inf): 0 disables",
        "histogram_every": "[0, inf): 0 disables",
        "keep_checkpoints": "[1, inf)",
    }  # field → valid interval (check_ranges)
    dir: str = "runs/default"
    log_every: int = 10  # steps between TensorBoard scalar writes
    checkpoint_every: int = 1000  # steps; a checkpoint is always written at the end
    eval_every: int = 2000  # steps; 0 disables periodic verification
    histogram_every: int = 200
    keep_checkpoints: int = 2  # this run's newest N checkpoints are kept (by step number); at least 1
    # A fresh run (no --resume) refuses an output.dir that already holds a run; `overwrite: true` clears its
    # checkpoints/ and tb/ first.
    overwrite: bool = False


@dataclass
class Config:
    RANGES = {
        "seed": "[0, inf)",
        "collective_timeout_s": "[10, inf)",
        "collective_warn_s": "[1, inf)",
    }  # field → valid interval (check_ranges)
    recipe: str = "margin"  # the training procedure: margin | lrfr (see pipeline/recipes)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # A collective that waits longer than collective_timeout_s ends the run (every rank); after
    # collective_warn_s of waiting, the console names the ranks that are behind (a stalled or stopped rank).
    collective_timeout_s: int = 1800
    collective_warn_s: int = 120
    model: ModelConfig = field(default_factory=ModelConfig)
    margin: MarginConfig = field(default_factory=MarginConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    method: Any = field(default_factory=dict)  # recipe-specific dataclass, resolved by the registry
    # Extra Python modules that register parts (a lab's own head, insert, ...) without editing this
    # package: imported before the model is resolved, and recorded in every checkpoint's config.yaml so
    # that eval and export find them too. E.g. [mylab.heads]. Built-in parts need no entry here.
    plugins: list = field(default_factory=list)

    def validate(self):
        aug = self.data.augment
        if aug.cutout_p > 0 and aug.cutout_size > self.model.input_size:
            raise Invalid(
                "data.augment.cutout_size",
                f"must be <= model.input_size ({self.model.input_size}) when cutout_p > 0, got {aug.cutout_size}",
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise Invalid("device", f"must be auto, cpu or cuda, got '{self.device}'")
        if self.collective_warn_s >= self.collective_timeout_s:
            raise Invalid("collective_warn_s", f"must be in [1, collective_timeout_s), got {self.collective_warn_s}")


# --------------------------------------------------------------------------- loading


def read_yaml_mapping(path: Path, kind: str = "config", error: type[Exception] = ConfigError, empty_ok: bool = True):
    """A YAML file whose top level is a mapping (a config layer, an ablation spec, ...). Every failure is one
    ``error`` naming the file: missing, binary junk, invalid YAML (with its line), another top level. An empty
    file is an empty mapping where ``empty_ok``."""
    if not path.is_file():
        raise error(f"{path}: {kind} file does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:  # binary junk, NUL bytes
        raise error(f"{path}: not a YAML text file ({type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise error(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: top level must be a mapping of {kind} keys, got {type(data).__name__}")
    return data


PART_BLOCKS = ("model.conv", "model.head")  # blocks whose schema is chosen by their `kind`
KIND_CHANGED = "#kind changed:"  # origin key prefix: the layer that changed a part block's kind


def _merge(dst: dict, src: dict, origin: dict, source: str, prefix: str = "", replace: str = "") -> None:
    """Deep-merge ``src`` into ``dst``; record in ``origin`` which source set each leaf key.

    A part block (``model.conv``, ``model.head``) whose ``kind`` changes keeps the options written for it
    earlier: ``model.head.embedding_size=128`` then ``model.head.kind=lgaf`` is a 128-d LGAF head. An option the
    new kind lacks is a one-line error naming both layers (:func:`_part`), never a silent drop. The dotted key
    ``replace`` (a command-line ``model.head={kind: fc}`` / ``model.conv=plain``) replaces its block whole.
    """
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        old = dst.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and dotted != replace:
            if "kind" in value and "kind" in old and value["kind"] != old["kind"]:
                origin[KIND_CHANGED + dotted] = source  # _part names both layers if an old option does not fit
            _merge(dst[key], value, origin, source, dotted + ".", replace)
        else:
            for stale in [k for k in origin if k.startswith(dotted + ".")]:
                del origin[stale]  # a replaced block's old keys no longer have a source
            dst[key] = copy.deepcopy(value)
            _record_origin(origin, dotted, value, source)


def _record_origin(origin: dict, dotted: str, value: Any, source: str) -> None:
    origin[dotted] = source
    if isinstance(value, dict):
        for sub, v in value.items():
            _record_origin(origin, f"{dotted}.{sub}", v, source)


def _load_layers(path: Path, merged: dict, origin: dict, seen: tuple = ()) -> None:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain")
    data = read_yaml_mapping(path)
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
        _merge(merged, _nest(key, value), origin, "command line", replace=key if key in PART_BLOCKS else "")
    return config_from_dict(merged, origin)


def config_from_dict(merged: dict, origin: dict | None = None) -> Config:
    """Validate a merged dict into a :class:`Config`, resolving the blocks owned by registered parts."""
    from pipeline import registry

    origin = origin or {}
    cfg = from_dict(Config, merged, origin)
    registry.import_plugins(cfg.plugins, origin.get("plugins", "defaults"))
    where = origin.get("recipe", "defaults")
    renamed = RENAMED_VALUES.get(("recipe", cfg.recipe))
    if renamed:
        raise ConfigError(f"{where}: key 'recipe': '{cfg.recipe}' is no longer a recipe; write {renamed}")
    try:
        schema = registry.lookup("recipe", cfg.recipe, "recipe").options
    except ConfigError as exc:
        raise ConfigError(f"{where}: key {exc}") from None
    cfg.method = from_dict(schema, cfg.method or {}, origin, prefix="method.")
    resolve_model(cfg.model, origin)
    check = getattr(cfg.method, "validate_with", None)
    if check is not None:
        _run_validation(lambda: check(cfg), "", origin)
    return cfg


def resolve_model(model: ModelConfig, origin: dict) -> None:
    if model.backbone.startswith(RENAMED_BACKBONE_PREFIX[0]):
        plain = model.backbone[len(RENAMED_BACKBONE_PREFIX[0]) :]
        where = origin.get("model.backbone", "defaults")
        raise ConfigError(
            f"{where}: key 'model.backbone': '{model.backbone}' is now "
            + RENAMED_BACKBONE_PREFIX[1].format(plain=plain)
        )
    model.conv = _part("conv", model.conv, "model.conv", origin)
    model.head = _part("head", model.head, "model.head", origin)
    if not isinstance(model.inserts, list):
        raise ConfigError(
            f"{_nearest_origin('model.inserts', origin)}: key 'model.inserts' expects a list of "
            f"{{kind: ..., at: ...}} mappings, got {model.inserts!r}"
        )
    model.inserts = [_part("insert", ins, f"model.inserts[{i}]", origin) for i, ins in enumerate(model.inserts)]


_DEFAULT_KINDS = {"conv": "plain", "head": "fc"}  # ModelConfig's defaults


def _part(kind: str, block: Any, key: str, origin: dict):
    """A part's block ({kind: NAME, options...}) → the dataclass NAME registered as its schema."""
    from pipeline import registry

    where = origin.get(key + ".kind") or _nearest_origin(key, origin)
    if isinstance(block, PartOptions):
        return block
    if isinstance(block, str):
        block = {"kind": block}  # `model.head=fc` on the command line
    if isinstance(block, dict) and "kind" not in block and kind in _DEFAULT_KINDS:
        block = {"kind": _DEFAULT_KINDS[kind], **block}  # e.g. smoke.yaml's head: {embedding_size: 64}
    if not isinstance(block, dict) or not isinstance(block.get("kind"), str):
        raise ConfigError(
            f"{where}: key '{key}' expects a mapping with a 'kind' ({', '.join(registry.names(kind))}), got {block!r}"
        )
    try:
        schema = registry.lookup(kind, block["kind"], f"{key}.kind").options
    except ConfigError as exc:
        raise ConfigError(f"{where}: key {exc}") from None
    names = {f.name for f in dataclasses.fields(schema)}
    changed_by = origin.get(KIND_CHANGED + key)
    for option in block:
        set_by = origin.get(f"{key}.{option}", "defaults")
        if option not in names and key + "." + option not in RENAMED_KEYS and changed_by and set_by != changed_by:
            # written for another kind in an earlier layer; the kind changed after it (see _merge)
            raise ConfigError(
                f"{set_by}: key '{key}.{option}' is not an option of {kind} kind '{block['kind']}' (set by {changed_by}); "
                f"remove it, or write {key}={{kind: {block['kind']}, ...}} on the command line to start the block afresh"
            )
    return from_dict(schema, block, origin, prefix=key + ".")


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


def check(obj, prefix: str):
    """Validate a config object built in code (not loaded from YAML): its ``validate()`` and those of the
    config objects inside it; a failure is a ConfigError naming ``prefix`` + the key. Returns ``obj``."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check(value, f"{prefix}{f.name}.")
    try:
        check_ranges(obj)
        if hasattr(obj, "validate"):
            obj.validate()
    except Invalid as exc:
        raise ConfigError(f"{prefix}{exc.key}: {exc.message}") from None
    return obj


def _run_validation(check, prefix: str, origin: dict) -> None:
    try:
        check()
    except Invalid as exc:
        dotted = prefix + exc.key
        where = origin.get(dotted) or _nearest_origin(dotted, origin)
        raise ConfigError(f"{where}: key '{dotted}' {exc.message}") from None


def from_dict(cls: type, data: dict, origin: dict | None = None, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown, renamed or ill-typed keys and values that fail the
    class's ``validate()`` raise :class:`ConfigError`."""
    origin = origin or {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            where = origin.get(dotted) or _nearest_origin(dotted, origin)
            if dotted in RENAMED_KEYS:
                raise ConfigError(f"{where}: key '{dotted}' was renamed: write {RENAMED_KEYS[dotted]}")
            raise ConfigError(f"{where}: unknown key '{dotted}' (known: {', '.join(sorted(names))})")
        if cls is Config and key == "method":
            kwargs[key] = value  # validated against the recipe's schema by config_from_dict
            continue
        kwargs[key] = _check_value(hints[key], value, dotted, origin)
    obj = cls(**kwargs)
    _run_validation(lambda: check_ranges(obj), prefix, origin)
    if hasattr(obj, "validate"):
        _run_validation(obj.validate, prefix, origin)
    return obj


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config (what a checkpoint was trained with) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_from_resolved(path: str | Path) -> Config:
    """Load a config written by :func:`dump_config` (a single self-contained layer)."""
    return load_config([path])
