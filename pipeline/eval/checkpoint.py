"""Load an embedding network for evaluation (through :func:`pipeline.checkpoint.load_network`).

Two sources:

- a checkpoint directory written by the trainer (``config.yaml`` + ``model.pt``), or a run's output
  directory / checkpoint root (its ``latest`` checkpoint): the whole network (trunk, inserts, head) is
  rebuilt from ``config.yaml`` and ``model.pt`` is loaded strictly;
- a bare state-dict file (e.g. insightface arcface_torch ``backbone.pth``) with a registry backbone name
  (``--backbone iresnet50``): an ``fc``-head network of that trunk.

A state dict that does not fit the architecture is a one-line :class:`ConfigError` naming the
checkpoint and the first mismatching key; so is an unreadable, truncated or garbage ``model.pt`` /
``config.yaml`` (:func:`load_network_checked`, also used by ``pipeline.export``).

Every benchmark also runs an exported ONNX model (``--onnx MODEL.onnx``, :func:`load_embedder`,
:class:`OnnxEmbedder`) through onnxruntime, so a deployed model is checked with the same tool.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.checkpoint import find_checkpoint, load_network
from pipeline.config import ConfigError, ModelConfig, resolve_model


def load_network_checked(source: str | Path, model_cfg: ModelConfig | None = None):
    """:func:`pipeline.checkpoint.load_network`, with every failure to read the checkpoint's files a
    one-line ConfigError naming the file: a ``config.yaml`` that is not UTF-8 text, an unreadable file
    (OSError), and multi-line messages from the YAML parser folded into one line."""
    path = Path(source)
    try:
        return load_network(source, model_cfg)
    except UnicodeDecodeError as exc:  # the only text a checkpoint holds is its config.yaml
        where = find_checkpoint(path) / "config.yaml" if path.is_dir() else path
        raise ConfigError(f"{where}: not a YAML text file (byte {exc.start} is not UTF-8)") from None
    except ConfigError as exc:
        raise ConfigError(" ".join(str(exc).split())) from None
    except OSError as exc:
        raise ConfigError(f"{exc.filename or path}: cannot read ({exc.strerror or type(exc).__name__})") from None


def load_model(
    checkpoint: str | Path,
    backbone: str | None = None,
    width: float = 1.0,
    embedding_size: int = 512,
    input_size: int = 112,
    dropout: float = 0.0,
    conv: dict | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict]:
    """(embedding module in eval mode on ``device``: images → (N, D), info dict)."""
    model_cfg = None
    if not Path(checkpoint).is_dir() and backbone:
        model_cfg = ModelConfig(
            backbone=backbone,
            width=width,
            input_size=input_size,  # default conv and head
            head={"embedding_size": embedding_size, "dropout": dropout},
        )
        if conv:
            model_cfg.conv = dict(conv)
        resolve_model(model_cfg, {})
    net, model_cfg, path = load_network_checked(checkpoint, model_cfg)
    info = {
        "checkpoint": str(path.parent if path.name == "model.pt" else path),
        "backbone": model_cfg.backbone,
        "conv": model_cfg.conv.kind,
        "head": model_cfg.head.kind,
        "input_size": model_cfg.input_size,
    }
    return net.embedder().to(device).eval(), info


# --------------------------------------------------------------------------- ONNX models


class OnnxEmbedder:
    """An exported ONNX model (``pipeline.export``: input (N, 3, H, W) float32 in [-1, 1], output
    (N, D)) behind the interface of the PyTorch embedder: a callable on a float tensor returning a
    float tensor, so :func:`pipeline.eval.embed.embed_images` and every benchmark run it unchanged.

    Runs on onnxruntime's CUDAExecutionProvider when ``device`` is a CUDA device and the installed
    onnxruntime has that provider, else on CPUExecutionProvider (with ``torch.get_num_threads()``
    intra-op threads). A model with a fixed batch dimension is fed batches of exactly that size."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: ONNX model does not exist")
        device = torch.device(device)
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad models
            raise ConfigError(f"{self.path}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ConfigError(f"{self.path}: expected one input and an output, got {len(inputs)} and {len(outputs)}")
        shape = inputs[0].shape
        if inputs[0].type != "tensor(float)" or len(shape) != 4 or shape[1] != 3:
            raise ConfigError(
                f"{self.path}: input {inputs[0].name!r} is {inputs[0].type} {shape}; expected float (N, 3, H, W)"
            )
        if not (isinstance(shape[2], int) and shape[2] == shape[3]):
            raise ConfigError(f"{self.path}: input {inputs[0].name!r} is {shape}; expected a fixed square H = W")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.input_size = int(shape[2])
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.providers = self.session.get_providers()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().cpu().numpy()
        if x.shape[2:] != (self.input_size, self.input_size):
            raise ConfigError(f"{self.path}: input is {self.input_size} px, got images of {tuple(x.shape[2:])}")
        if self.fixed_batch is None:
            return torch.from_numpy(self.session.run([self.output_name], {self.input_name: x})[0])
        out = []
        for s in range(0, len(x), self.fixed_batch):
            part = x[s : s + self.fixed_batch]
            pad = self.fixed_batch - len(part)
            if pad:
                part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
            out.append(self.session.run([self.output_name], {self.input_name: part})[0][: self.fixed_batch - pad])
        return torch.from_numpy(np.concatenate(out))


def load_embedder(
    checkpoint: str | Path | None = None,
    onnx: str | Path | None = None,
    backbone: str | None = None,
    width: float = 1.0,
    embedding_size: int = 512,
    input_size: int = 112,
    device: str | torch.device = "cpu",
):
    """(embed function: float (N, 3, S, S) in [-1, 1] → (N, D), info dict) from a checkpoint
    (:func:`load_model`) or from an exported ONNX model (:class:`OnnxEmbedder`; ``info["input_size"]``
    is read from the model's input shape). Exactly one of ``checkpoint`` and ``onnx``."""
    if (checkpoint is None) == (onnx is None):
        raise ConfigError("give exactly one of --checkpoint and --onnx")
    if onnx is None:
        return load_model(checkpoint, backbone, width, embedding_size, input_size, device=device)
    if backbone:
        raise ConfigError("--backbone describes a state-dict --checkpoint; an --onnx model describes itself")
    model = OnnxEmbedder(onnx, device)
    return model, {
        "checkpoint": str(model.path),
        "format": "onnx",
        "input_size": model.input_size,
        "providers": model.providers,
    }


def embedder_from_args(args, device: str | torch.device, checkpoint=None, onnx=None):
    """:func:`load_embedder` with the model options of ``python -m pipeline.eval`` (``--checkpoint`` or
    ``--onnx``, ``--backbone``, ``--width``, ``--embedding-size``, ``--input-size``); ``checkpoint`` /
    ``onnx`` override ``args`` (for subcommands that take several models)."""
    if checkpoint is None and onnx is None:
        checkpoint, onnx = args.checkpoint, getattr(args, "onnx", None)
    return load_embedder(
        checkpoint, onnx, args.backbone, args.width, args.embedding_size, args.input_size, device=device
    )
