"""The config's sections as typed dataclasses: ``model``, ``margin``, ``classifier``, ``optim``, ``schedule``,
``data`` (with ``data.augment``), ``deepspeed``, ``output`` and the top-level :class:`Config`. Each declares the
valid interval of its numeric fields (``RANGES``, :mod:`pipeline.core.ranges`) and may check its own fields in
``validate()`` (raising :class:`Invalid` with the field name); :mod:`pipeline.config.validation` builds them from
the merged YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.core.errors import Invalid


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


__all__ = [
    "AugmentConfig",
    "ClassifierConfig",
    "Config",
    "DataConfig",
    "DeepSpeedConfig",
    "MarginConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "ScheduleConfig",
]
