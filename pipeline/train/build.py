"""What a run is built with: the optimizers (foreach SGD / AdamW, weight-decay groups, the linearly scaled lr), and
the device settings (precision, cuDNN/TF32 switches, the input batches' device, dtype and memory format)."""

from __future__ import annotations

import torch

from pipeline import distributed
from pipeline.config import Config


def make_optimizer(cfg: Config, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """SGD / AdamW with the multi-tensor (foreach) update on every device: a handful of launches per step, not a
    few per parameter (torch picks foreach by itself only for CUDA tensors; the CPU then runs the same path)."""
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, foreach=True)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, foreach=True)


def param_groups(model: torch.nn.Module, no_decay: set[str], weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if name in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def norm_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of every normalisation layer's parameters (BatchNorm*, GroupNorm, LayerNorm)."""
    norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
    return {
        f"{mod_name}.{p_name}" if mod_name else p_name
        for mod_name, mod in model.named_modules()
        if isinstance(mod, norms)
        for p_name, _ in mod.named_parameters(recurse=False)
    }


def input_memory_format(device: torch.device) -> torch.memory_format:
    """channels-last for image batches on CUDA (issue 21: NHWC convolutions without layout transposes; converting
    the input alone keeps every conv output of the trunk channels-last through the DeepSpeed engine, ×1.45 on an
    iresnet50 bare loop on the H100); NCHW on the CPU, where a channels-last backward aborted torch 2.13
    (scripts/repro/channels_last_cpu_abort.py)."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def batch_to_device(v, device: torch.device, dtype: torch.dtype):
    """One batch entry on the training device in the training dtype; image batches (4-d) in the device's memory
    format (:func:`input_memory_format`)."""
    if not torch.is_tensor(v):
        return v
    v = v.to(device, non_blocking=True)
    if v.is_floating_point():
        v = v.to(dtype)
        if v.dim() == 4:
            v = v.contiguous(memory_format=input_memory_format(device))
    return v


def scaled_lr(optim, global_batch: int) -> float:
    """``optim.lr``, or with ``optim.scale_lr`` the linear scaling rule: lr × global_batch / reference_batch."""
    if optim.scale_lr:
        return optim.lr * global_batch / optim.reference_batch
    return optim.lr


def resolve_precision(setting: str, device: torch.device) -> str:
    """``deepspeed.precision: auto`` → bf16 on a CUDA device that supports it, else fp32 (the CPU: DeepSpeed's
    bf16 optimizer there is slower than fp32 and CPU autocast gains nothing); an explicit setting is kept."""
    if setting != "auto":
        return setting
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def configure_backends(cfg: Config, device: torch.device) -> None:
    """The fast settings for ``device`` (issue 21): ``deepspeed.precision: auto`` resolved and written back into
    the config (so config.yaml and checkpoints name the precision used); on CUDA, cuDNN autotuning
    (``cudnn.benchmark``: fixed input shapes, as arcface_torch sets) and TF32 matmuls for ``classifier.logits:
    tf32``."""
    chosen = resolve_precision(cfg.deepspeed.precision, device)
    if chosen != cfg.deepspeed.precision and distributed.is_main():
        print(f"[train] deepspeed.precision: auto → {chosen} on {device.type}", flush=True)
    cfg.deepspeed.precision = chosen
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if cfg.classifier.logits == "tf32":
            torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls
