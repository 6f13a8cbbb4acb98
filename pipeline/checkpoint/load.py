"""Loading a network's weights from disk: the one path by which a FaceNetwork gets weights — evaluation
(pipeline.eval), export (pipeline.export), fine-tuning (model.init_from) and resuming on another world size. Tensors
only (``weights_only``): a checkpoint never executes code."""

from __future__ import annotations

from pathlib import Path

from pipeline.checkpoint.format import holds_network, resolve
from pipeline.config import ConfigError


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (config.yaml + model.pt), or a run dir / checkpoint root → its latest."""
    p = Path(path)
    if holds_network(p):
        return p
    try:
        found = resolve(p)
    except FileNotFoundError:
        found = None
    if found is None or not holds_network(found):
        raise ConfigError(f"{p}: not a checkpoint (expected config.yaml and model.pt, or a 'latest' file)")
    return found


def read_state_dict(path: str | Path) -> dict:
    """Tensors only (``weights_only``: a checkpoint never executes code); DDP's ``module.`` prefix dropped.

    Accepts a plain state dict (``model.pt``, arcface_torch's ``backbone.pth``), a dict holding one under
    ``state_dict`` (many training scripts), and insightface arcface_torch's training checkpoint
    ``checkpoint_gpu_<rank>.pt`` (backbone under ``state_dict_backbone``, beside ``state_dict_softmax_fc``,
    ``state_optimizer``, ``state_lr_scheduler``, ``epoch``, ``global_step``: all ignored)."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure: not a torch checkpoint
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"{path}: not a PyTorch state dict ({type(exc).__name__}: {first})") from None
    if isinstance(obj, dict):
        for key in ("state_dict_backbone", "state_dict"):  # arcface_torch checkpoint_gpu_*.pt, then generic
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: not a state dict of tensors (holds a {type(obj).__name__})")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ConfigError(
            f"{path}: not a state dict of tensors (key {str(bad)[:80]!r} holds a {type(obj[bad]).__name__}; "
            "expected a state dict, or one under 'state_dict' / 'state_dict_backbone')"
        )
    if obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):  # saved from DDP
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_state_strict(module, state: dict, source: str | Path, arch: str) -> None:
    """``load_state_dict(strict=True)``, accepting a FaceNetwork's published (arcface_torch) names too;
    a mismatch is a one-line ConfigError naming the first mismatching key."""
    own = module.state_dict()
    published = getattr(module, "published_names", None)
    back = None
    if published is not None and state and not set(state) & set(own):
        # a published flat state dict (insightface backbone.pth): compare under the flat names
        names = published()
        back = {v: k for k, v in names.items()}
        own = {names[k]: v for k, v in own.items()}
    for k, v in own.items():
        if k not in state:
            raise ConfigError(f"{source}: not a checkpoint of {arch}: first mismatching key '{k}' (missing)")
        if tuple(state[k].shape) != tuple(v.shape):
            raise ConfigError(
                f"{source}: not a checkpoint of {arch}: first mismatching key '{k}' "
                f"(shape {tuple(state[k].shape)} in checkpoint, {tuple(v.shape)} in model)"
            )
    extra = [k for k in state if k not in own]
    if extra:
        raise ConfigError(f"{source}: not a checkpoint of {arch}: first mismatching key '{extra[0]}' (unexpected)")
    if back is not None:
        state = {back[k]: v for k, v in state.items()}
    module.load_state_dict(state, strict=True)


def describe(model_cfg) -> str:
    """One line naming a network: backbone, conv kind, inserts, head, widths."""
    ins = "+".join(f"{i.kind}@{i.at}" for i in model_cfg.inserts)
    return (
        f"{model_cfg.backbone} (conv {model_cfg.conv.kind}{', inserts ' + ins if ins else ''}, "
        f"head {model_cfg.head.kind}, width {model_cfg.width}, input {model_cfg.input_size})"
    )


def load_network(source: str | Path, model_cfg=None):
    """(FaceNetwork with weights, its ``model:`` config, the file they came from).

    ``source``: a checkpoint dir / run dir (the network is rebuilt from its ``config.yaml``; ``model_cfg``
    must be None) or a state-dict file (``model_cfg`` describes the network; insightface's flat names
    are accepted for the ``fc`` head)."""
    from pipeline.config import load_config
    from pipeline.models.network import build_network  # torch and the model code: only when a network is loaded

    path = Path(source)
    if not path.exists():
        raise ConfigError(f"{path}: checkpoint does not exist")
    if path.is_dir():
        ckpt = find_checkpoint(path)
        model_cfg = load_config([ckpt / "config.yaml"]).model
        path = ckpt / "model.pt"
    elif model_cfg is None:
        raise ConfigError(f"{path}: a state-dict file needs --backbone NAME (the network it holds)")
    net = build_network(model_cfg)
    load_state_strict(net, read_state_dict(path), path, describe(model_cfg))
    return net, model_cfg, path


def load_weights(net, source: str | Path, key: str) -> Path:
    """Load ``model.pt`` of a checkpoint dir / run dir, or a state-dict file, into ``net`` (strict).
    Errors name the config key the path came from (e.g. ``model.init_from``)."""
    p = Path(source)
    try:
        path = find_checkpoint(p) / "model.pt" if p.is_dir() else p
        if not path.is_file():
            raise ConfigError(f"{path} does not exist")
        load_state_strict(net, read_state_dict(path), path, "this network")
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return path
