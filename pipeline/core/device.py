"""The one device resolver: ``device: auto`` (config, CLI ``--device``) → CUDA when there is one, else the CPU."""

from __future__ import annotations

__all__ = ["resolve_device"]


def resolve_device(setting: str) -> str:
    """``auto`` → ``cuda`` if torch sees a CUDA device, else ``cpu``; any other setting (``cpu``, ``cuda``,
    ``cuda:1``) is returned as given."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
