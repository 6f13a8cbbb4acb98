"""The option schemas every registered part extends (the registry and the config both read them)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PartOptions", "InsertOptions"]


@dataclass
class PartOptions:
    """Base of the option schemas of conv kinds, heads and inserts: ``kind`` names the registered part."""

    kind: str = ""


@dataclass
class InsertOptions(PartOptions):
    """Base of insert schemas: ``at`` is the trunk point (e.g. ``layer3``, ``layer3.branch``)."""

    at: str = ""
