"""Load an embedding network for evaluation.

Two sources:

- a checkpoint directory written by the trainer (``config.yaml`` + ``model.pt``), or a run's
  output directory / checkpoint root (its ``latest`` checkpoint): the recipe is rebuilt from
  ``config.yaml`` and ``model.pt`` is loaded strictly into ``recipe.inference_backbone()``;
- a bare state-dict file (e.g. insightface arcface_torch ``backbone.pth``) with a registry
  backbone name (``--backbone iresnet50``) and its model options.

A state dict that does not fit the architecture is a one-line :class:`ConfigError` naming the
checkpoint and the first mismatching key.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline import registry
from pipeline.config import ConfigError, ModelConfig, load_config


def _find_checkpoint_dir(path: Path) -> Path:
    if (path / "model.pt").is_file() and (path / "config.yaml").is_file():
        return path
    from pipeline import checkpoint as train_ckpt

    try:
        found = train_ckpt.resolve(path)
    except FileNotFoundError:
        found = None
    if found is None or not (found / "model.pt").is_file() or not (found / "config.yaml").is_file():
        raise ConfigError(f"{path}: not a checkpoint (expected config.yaml and model.pt, or a 'latest' file)")
    return found


def _read_state_dict(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure: not a torch checkpoint
        raise ConfigError(f"{path}: not a PyTorch state dict ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{path}: not a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_state_strict(model: nn.Module, state: dict, source: str | Path, arch: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first mismatching key."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in state:
            raise ConfigError(f"{source}: not a checkpoint of {arch}: first mismatching key '{k}' (missing)")
        if tuple(state[k].shape) != tuple(v.shape):
            raise ConfigError(f"{source}: not a checkpoint of {arch}: first mismatching key '{k}' "
                              f"(shape {tuple(state[k].shape)} in checkpoint, {tuple(v.shape)} in model)")
    extra = [k for k in state if k not in own]
    if extra:
        raise ConfigError(f"{source}: not a checkpoint of {arch}: first mismatching key '{extra[0]}' (unexpected)")
    model.load_state_dict(state, strict=True)


def load_model(checkpoint: str | Path, backbone: str | None = None, width: float = 1.0,
               embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0,
               options: dict | None = None, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(network in eval mode on ``device``, info dict) from a checkpoint dir or a state-dict file."""
    path = Path(checkpoint)
    if not path.exists():
        raise ConfigError(f"{path}: checkpoint does not exist")
    if path.is_dir():
        ckpt = _find_checkpoint_dir(path)
        cfg = load_config([ckpt / "config.yaml"])
        net = registry.build_recipe(cfg).inference_backbone()
        arch = f"{cfg.recipe}/{cfg.model.backbone} (width {cfg.model.width})"
        load_state_strict(net, _read_state_dict(ckpt / "model.pt"), ckpt / "model.pt", arch)
        info = {"checkpoint": str(ckpt), "recipe": cfg.recipe, "backbone": cfg.model.backbone,
                "input_size": cfg.model.input_size}
    else:
        if not backbone:
            raise ConfigError(f"{path}: a state-dict file needs --backbone NAME (one of {', '.join(registry.backbone_names())})")
        mcfg = ModelConfig(backbone=backbone, width=width, embedding_size=embedding_size,
                           input_size=input_size, dropout=dropout, options=dict(options or {}))
        net = registry.build_backbone(mcfg)
        load_state_strict(net, _read_state_dict(path), path, f"{backbone} (width {width})")
        info = {"checkpoint": str(path), "recipe": None, "backbone": backbone, "input_size": input_size}
    return net.to(device).eval(), info
