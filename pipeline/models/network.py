"""The face network: trunk (stem + named stages) → inserts at named points → head → embedding.

One :class:`FaceNetwork` is what training, in-training evaluation, ``pipeline.eval`` and ``pipeline.export``
use, and what a checkpoint's ``model.pt`` holds (its ``state_dict``), rebuilt from ``config.yaml``'s
``model:`` block by :func:`build_network`::

    model:
      backbone: iresnet50            # the trunk (registry kind "backbone")
      conv: {kind: scan, rmo: true}  # how the trunk's 3×3 convs are built ("conv"; default plain)
      inserts:                       # modules at named points of the trunk ("insert")
        - {kind: lcd, at: layer3.branch}
      head: {kind: fc, embedding_size: 512, dropout: 0.0}   # feature maps → embedding ("head")

``FaceNetwork.forward(images)`` returns a :class:`NetOutput`: the embedding *and* the auxiliary losses and
monitoring values that modules inside the network produced during that very call. Modules report
through a :class:`Trace` that the network creates per call and passes down explicitly; nothing is kept
on a module after its call. A module that reports is a :class:`Reporter` (``forward(x, trace)``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline import registry

# --------------------------------------------------------------------------- what one call reports


class Trace:
    """Aux losses and monitors reported by the modules of one forward call.

    ``add_loss(name, value)``: already weighted; several reports under one name are summed (e.g. RMO's
    L_scale of every SAC layer, eq. 7). ``monitor(name, value)``: logged as ``monitor/<name>`` (its mean).
    ``histogram(name, values)``: the trainer writes the last step's values as ``hist/<name>`` every
    ``output.histogram_every`` steps. ``watch(name, tensor)``: a tensor of the graph (a weight, an effective
    kernel) on which the trainer measures, at log steps, each loss term's gradient norm
    (``grad_norm/<name>/<term>``) and its ratio to the classification loss's (``grad_ratio/<name>/<term>``). ``spatial_map(name, maps)`` / ``sample_value(name, values)``: kept only
    on a *probe* trace (:meth:`FaceNetwork.probe`), which draws the maps over a few fixed faces at every
    checkpoint (``attention_maps.png``, each face titled with its sample values).
    """

    def __init__(self, probe: bool = False) -> None:
        self._losses: dict[str, list[torch.Tensor]] = {}
        self.monitors: dict[str, torch.Tensor] = {}
        self.histograms: dict[str, torch.Tensor] = {}
        self.watched: dict[str, torch.Tensor] = {}
        self.probing = probe
        self.maps: dict[str, torch.Tensor] = {}  # name → (N, 1, h, w), probe traces only
        self.sample_values: dict[str, torch.Tensor] = {}  # name → (N,), probe traces only
        # per-call working state of network-wide parts (ConvKind.begin/end: e.g. SCAN's kernels built for every
        # layer at once), keyed by the part; gone with the trace
        self.state: dict[str, object] = {}

    def add_loss(self, name: str, value: torch.Tensor) -> None:
        self._losses.setdefault(name, []).append(value)

    def monitor(self, name: str, value) -> None:
        self.monitors[name] = value

    def histogram(self, name: str, values: torch.Tensor) -> None:
        self.histograms[name] = values.detach()

    def watch(self, name: str, tensor: torch.Tensor) -> None:
        if not self.probing and tensor.requires_grad:
            self.watched[name] = tensor

    def spatial_map(self, name: str, maps: torch.Tensor) -> None:
        if self.probing:
            self.maps[name] = maps.detach()

    def sample_value(self, name: str, values: torch.Tensor) -> None:
        if self.probing:
            self.sample_values[name] = values.detach()

    def aux_losses(self) -> dict[str, torch.Tensor]:
        # summed in at least float32 (a half-precision term is accumulated in float32)
        return {
            k: torch.stack([v if v.dtype == torch.float64 else v.float() for v in vs]).sum()
            for k, vs in self._losses.items()
        }


@dataclass
class NetOutput:
    embedding: torch.Tensor  # (N, D), not normalised
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted; the trainer sums them
    monitors: dict[str, torch.Tensor] = field(default_factory=dict)  # logged as monitor/<name>
    histograms: dict[str, torch.Tensor] = field(default_factory=dict)  # logged as hist/<name>
    watched: dict[str, torch.Tensor] = field(default_factory=dict)  # per-term gradient norms at log steps


class Reporter(nn.Module):
    """A module whose ``forward(x, trace)`` may report aux losses / monitors (``trace`` is None outside training)."""

    def forward(self, x: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def call(module: nn.Module, x: torch.Tensor, trace: Trace | None) -> torch.Tensor:
    """``module(x, trace)`` for a Reporter, ``module(x)`` for any other module (e.g. a plain Conv2d)."""
    return module(x, trace) if isinstance(module, Reporter) else module(x)


# --------------------------------------------------------------------------- parts


@dataclass
class PointInfo:
    """What flows at a named point of a trunk: channels and spatial size (for sizing inserts)."""

    channels: int
    spatial: int


@dataclass(frozen=True)
class PointModules:
    """The trunk modules around one named point, as qualified names inside the trunk (``trunk.get_submodule``);
    None where the trunk has no such module. A trunk answers ``point_modules(at)`` with one, so that an insert or a
    probe that works on the modules around a point (LCD's SR loss, eq. 6, eq. 8) never spells the trunk's internals.
    ``conv``, ``norm`` and ``shortcut`` lie inside ``block``."""

    source: str  # the module whose output is the point's tensor, before the point's inserts (hook it to read/change it)
    block: str | None = None  # the residual block whose branch holds the point, or whose output is the point
    conv: str | None = None  # the last convolution before the point
    norm: str | None = None  # the BatchNorm right after that convolution
    shortcut: str | None = None  # the block's projection shortcut; None: the identity
    next_norm: str | None = None  # the BatchNorm the next residual block opens with, reading the point's tensor first


def point_modules(trunk: nn.Module, at: str) -> PointModules | None:
    """The trunk's :class:`PointModules` of point ``at``; None for a trunk that does not name them, or a name that is
    not one of its points."""
    answer = getattr(trunk, "point_modules", None)
    if not callable(answer):
        return None
    try:
        return answer(at)
    except KeyError:
        return None


def to_model_input(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB → float (N, 3, H, W) in [-1, 1], the network's input (insightface: (x/255 - 0.5)/0.5).
    The one definition: evaluation (:mod:`pipeline.eval.embed`) and the models' own diagnostics both use it."""
    return images_u8.permute(0, 3, 1, 2).float().div(255.0).sub(0.5).div(0.5)


class ConvKind:
    """How a trunk's 3×3 convolutions are built, and the network-wide view of them (monitors, folding).

    Subclasses register with ``@registry.register("conv", name, Options)``; the builder takes the options.
    """

    def conv3x3(self, in_planes: int, out_planes: int, stride: int = 1) -> nn.Module:
        return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)

    def begin(self, net: nn.Module, trace: Trace) -> None:
        """Before a training forward's trunk: work shared by all the convs (e.g. every kernel built at once)."""

    def end(self, net: nn.Module, trace: Trace) -> None:
        """After a training forward's trunk: losses over all the convs at once (e.g. SCAN's eq. 7 sum)."""

    def monitors(self, net: nn.Module) -> dict[str, torch.Tensor]:
        """Values of the convs' parameters (not of a batch), logged as ``monitor/<name>`` at log steps only."""
        return {}

    def histograms(self, net: nn.Module) -> dict[str, torch.Tensor]:
        return {}

    def no_weight_decay(self, net: nn.Module) -> set[str]:
        return set()

    def on_checkpoint(self, net: nn.Module, out_dir: Path, step: int) -> None:
        pass

    def fold(self, net: nn.Module) -> int:
        """Turn the convs into their inference form in place; returns how many were changed."""
        return 0


class Head(nn.Module):
    """Feature maps → embedding. ``needs``: extra trunk points it reads besides ``"out"`` (the final map).

    Subclasses set ``embedding_size`` (the classifier's input width is taken from it) and implement
    ``forward(features, trace) -> (N, embedding_size)`` where ``features`` maps point names to tensors.
    """

    needs: tuple[str, ...] = ()
    embedding_size: int

    def histograms(self) -> dict[str, torch.Tensor]:
        return {}

    def on_checkpoint(self, out_dir: Path, step: int) -> None:
        pass

    def validation_monitors(self, net: nn.Module, faces: torch.Tensor) -> dict[str, float]:
        """Values measured on a fixed batch of clean validation faces at every evaluation (``faces``: (N,3,H,W)
        in [-1, 1]; ``net``: the whole network, in eval mode, under no_grad), logged as ``monitor/<name>``."""
        return {}

    def monitor_floors(self) -> dict[str, tuple[float, str]]:
        """``{monitor name: (floor, why)}``: at a log step, a training monitor below its floor prints one warning
        line naming it and ``why`` (a sign the part stopped working, e.g. a collapsed attention)."""
        return {}


class Insert(Reporter):
    """A module placed at a named trunk point by ``model.inserts``; shape-preserving ``forward(x, trace)``.

    Optional ``bind(trunk, at)``: if an insert defines it, :func:`build_network` calls it once, after the trunk
    is built, with the trunk and the insert's point name, so that the insert can reach the modules around its
    point (e.g. LCD's filter-orthogonality loss reads the weight of the 3×3 conv before it), named by the trunk
    (:func:`point_modules`). Keep any such
    reference *unregistered* (``object.__setattr__(self, "_block", block)``), so the trunk's parameters are not
    listed twice in ``state_dict`` / ``parameters()``; raise :class:`~pipeline.config.ConfigError` if the point
    does not offer what the insert needs.
    """

    def histograms(self) -> dict[str, torch.Tensor]:
        return {}

    def on_checkpoint(self, out_dir: Path, step: int) -> None:
        pass

    def validation_monitors(self, net: nn.Module, faces: torch.Tensor) -> dict[str, float]:
        """Values measured on a fixed batch of clean validation faces at every evaluation (``faces``: (N,3,H,W)
        in [-1, 1]; ``net``: the whole network, in eval mode, under no_grad), logged as ``monitor/<name>``."""
        return {}

    def monitor_floors(self) -> dict[str, tuple[float, str]]:
        """``{monitor name: (floor, why)}``: at a log step, a training monitor below its floor prints one warning
        line naming it and ``why`` (a sign the part stopped working, e.g. a collapsed attention)."""
        return {}


class InsertPoint(Reporter):
    """The inserts configured at one point, applied in config order."""

    def __init__(self, inserts: list[nn.Module]):
        super().__init__()
        self.inserts = nn.ModuleList(inserts)

    def forward(self, x: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        for m in self.inserts:
            x = call(m, x, trace)
        return x


# --------------------------------------------------------------------------- the network


class FaceNetwork(nn.Module):
    """trunk → head, with the conv kind's network-wide hooks. See the module docstring."""

    def __init__(self, trunk: nn.Module, head: Head, conv_kind: ConvKind):
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.conv_kind = conv_kind  # plain object (no parameters): monitors / folding of the convs
        self._keep = frozenset(head.needs)

    @property
    def embedding_size(self) -> int:
        return self.head.embedding_size

    def forward(self, images: torch.Tensor) -> NetOutput:
        trace = Trace() if self.training and torch.is_grad_enabled() else None
        if trace is None:
            return NetOutput(self.head(self.trunk(images, None, self._keep), None))
        self.conv_kind.begin(self, trace)
        feats = self.trunk(images, trace, self._keep)
        self.conv_kind.end(self, trace)
        emb = self.head(feats, trace)
        return NetOutput(emb, trace.aux_losses(), trace.monitors, trace.histograms, trace.watched)

    @torch.no_grad()
    def probe(self, images: torch.Tensor) -> Trace:
        """An eval-mode forward over ``images`` that keeps what the modules report for drawing (their
        spatial maps and per-sample values; losses and monitors computed on the way are discarded)."""
        was_training = self.training
        self.eval()
        try:
            trace = Trace(probe=True)
            self.head(self.trunk(images, trace, self._keep), trace)
        finally:
            self.train(was_training)
        return trace

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).embedding

    def embedder(self) -> Embedder:
        """This network as a module whose output is the embedding tensor (eval, ONNX export)."""
        return Embedder(self)

    # ------------------------------------------------------------------ monitoring
    def parts(self) -> list[nn.Module]:
        """The head and every insert (the modules with their own histograms / checkpoint hooks)."""
        return [self.head] + [m for m in self.modules() if isinstance(m, Insert)]

    @torch.no_grad()
    def parameter_monitors(self) -> dict[str, torch.Tensor]:
        """Monitors that depend on the parameters only (the conv kind's, e.g. SCAN's t statistics): the trainer
        logs them at log steps, so that no training step pays for them (issue 21)."""
        return self.conv_kind.monitors(self)

    def histograms(self) -> dict[str, torch.Tensor]:
        out = dict(self.conv_kind.histograms(self))
        for part in self.parts():
            out.update(part.histograms())
        return out

    def no_weight_decay(self) -> set[str]:
        return set(self.conv_kind.no_weight_decay(self))

    def sample_value_means(self, images: torch.Tensor, batch_size: int = 64, transform=None) -> dict[str, float]:
        """Mean over ``images`` of every per-sample value the modules report on a probe forward (LGAF's
        ``gamma_l``, CQA's ``q0``…); {} for a network that reports none (known after the first batch). ``images``:
        (N,3,H,W) in [-1, 1], or anything ``transform`` turns into that batch by batch (e.g. uint8 faces through
        ``pipeline.eval.embed.to_model_input``, so a whole set is never converted at once)."""
        p = next(self.parameters())
        sums: dict[str, float] = {}
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            trace = self.probe((transform(batch) if transform else batch).to(p.device, p.dtype))
            if not trace.sample_values:
                return {}
            for name, values in trace.sample_values.items():
                sums[name] = sums.get(name, 0.0) + float(values.double().sum())
        return {name: total / len(images) for name, total in sums.items()}

    @torch.no_grad()
    def validation_monitors(self, faces: torch.Tensor) -> dict[str, float]:
        """Every part's :meth:`Insert.validation_monitors` on ``faces`` (a fixed batch of clean validation faces,
        (N,3,H,W) in [-1, 1]), in eval mode; {} for a network whose parts measure nothing there."""
        was_training = self.training
        self.eval()
        try:
            out: dict[str, float] = {}
            for part in self.parts():
                out.update(part.validation_monitors(self, faces))
        finally:
            self.train(was_training)
        return out

    def monitor_floors(self) -> dict[str, tuple[float, str]]:
        """Every part's :meth:`Head.monitor_floors` (the trainer warns when a monitor falls under its floor)."""
        out: dict[str, tuple[float, str]] = {}
        for part in self.parts():
            out.update(part.monitor_floors())
        return out

    def on_checkpoint(self, out_dir: Path, step: int, faces: torch.Tensor | None = None) -> None:
        """Each part's checkpoint hook; with ``faces`` ((N,3,H,W) in [-1, 1], a few fixed faces), also
        ``attention_maps.png``: every spatial map the modules report, over those faces."""
        self.conv_kind.on_checkpoint(self, out_dir, step)
        for part in self.parts():
            part.on_checkpoint(out_dir, step)
        if faces is not None:
            trace = self.probe(faces)
            if trace.maps:
                from pipeline.models.attention_png import plot_attention_maps

                plot_attention_maps(faces, trace.maps, trace.sample_values, Path(out_dir) / "attention_maps.png", step)

    # ------------------------------------------------------------------ compilation
    def compile_regions(self, mode: str, **options) -> int:
        """``model.compile``: compile in place (parameter names unchanged) — ``blocks``: each module the trunk
        lists in ``blocks()`` (residual blocks: Dynamo compiles one graph per distinct block shape and reuses it
        for the others), ``full``: the whole network. Returns how many modules were compiled (0 for ``none``).
        ``options``: passed to ``torch.compile`` (tests use ``backend="aot_eager"``)."""
        if mode == "none":
            return 0
        if mode == "full":
            self.compile(**options)
            return 1
        blocks = getattr(self.trunk, "blocks", None)
        if blocks is None:
            from pipeline.config import ConfigError

            raise ConfigError(f"model.compile: blocks: the trunk {type(self.trunk).__name__} lists no blocks")
        regions = list(blocks())
        for module in regions:
            module.compile(**options)
        return len(regions)

    # ------------------------------------------------------------------ inference form
    def folded(self) -> tuple[FaceNetwork, int]:
        """A deep copy with every convolution in its inference form (SCAN: k_u in one Conv2d), and the count."""
        net = copy.deepcopy(self)
        n = net.conv_kind.fold(net)
        net.conv_kind = registry.lookup("conv", "plain", "model.conv.kind").build(None)
        return net, n

    # ------------------------------------------------------------------ published weights
    def published_names(self) -> dict[str, str]:
        """own state-dict key → the key in a published single-module state dict (insightface arcface_torch
        ``backbone.pth``): the part prefix (``trunk.`` / ``head.``) dropped."""
        return {k: k.split(".", 1)[1] for k in self.state_dict()}


class Embedder(nn.Module):
    """``FaceNetwork`` with a tensor output: (N, 3, H, W) in [-1, 1] → (N, D)."""

    def __init__(self, net: FaceNetwork):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).embedding


# --------------------------------------------------------------------------- building


@registry.register("conv", "plain")
def build_plain_conv(opts=None) -> ConvKind:
    """``model.conv: {kind: plain}``: every 3×3 conv an ``nn.Conv2d`` (padding 1, no bias), as arcface_torch."""
    return ConvKind()


def build_network(model_cfg) -> FaceNetwork:
    """Build the network of a validated ``model:`` config block (see :class:`pipeline.config.ModelConfig`)."""
    from pipeline.config import ConfigError

    conv_kind = registry.lookup("conv", model_cfg.conv.kind, "model.conv.kind").build(model_cfg.conv)
    trunk_entry = registry.lookup("backbone", model_cfg.backbone, "model.backbone")
    points = trunk_entry.build.points(model_cfg)  # name → PointInfo, in forward order
    inserts: dict[str, list[nn.Module]] = {}
    for i, ins in enumerate(model_cfg.inserts):
        if ins.at not in points or ins.at == "out":
            names = ", ".join(p for p in points if p != "out")
            raise ConfigError(
                f"model.inserts[{i}].at: '{ins.at}' is not a point of {model_cfg.backbone} (known: {names})"
            )
        module = registry.lookup("insert", ins.kind, f"model.inserts[{i}].kind").build(ins, points[ins.at])
        inserts.setdefault(ins.at, []).append(module)
    trunk = trunk_entry.build(model_cfg, conv_kind, {k: InsertPoint(v) for k, v in inserts.items()})
    for at, modules in inserts.items():  # inserts that read modules around their point (Insert.bind)
        for module in modules:
            bind = getattr(module, "bind", None)
            if callable(bind):
                bind(trunk, at)
    head_entry = registry.lookup("head", model_cfg.head.kind, "model.head.kind")
    head = head_entry.build(model_cfg.head, points, model_cfg)
    for need in head.needs:
        if need not in points:
            raise ConfigError(
                f"model.head: head '{model_cfg.head.kind}' reads trunk point '{need}', "
                f"which {model_cfg.backbone} does not have"
            )
    net = FaceNetwork(trunk, head, conv_kind)
    init = getattr(trunk_entry.build, "init_weights", None)
    if init is not None:
        init(net)
    return net
