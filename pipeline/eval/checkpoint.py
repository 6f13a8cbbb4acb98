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
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.checkpoint import find_checkpoint, load_network
from pipeline.config import ConfigError, ModelConfig, _resolve_model


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
        _resolve_model(model_cfg, {})
    net, model_cfg, path = load_network_checked(checkpoint, model_cfg)
    info = {
        "checkpoint": str(path.parent if path.name == "model.pt" else path),
        "backbone": model_cfg.backbone,
        "conv": model_cfg.conv.kind,
        "head": model_cfg.head.kind,
        "input_size": model_cfg.input_size,
    }
    return net.embedder().to(device).eval(), info
