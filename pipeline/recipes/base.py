"""The contract between a training procedure ("recipe") and the trainer.

A recipe is an ``nn.Module`` built from the whole config. It owns one
:class:`~pipeline.models.network.FaceNetwork` (``self.net``, built from ``model:`` — any trunk, conv kind,
inserts and head) and decides how a batch becomes loss terms. Its ``forward(batch)`` returns a
:class:`StepOutput`: the embeddings that go to the shared margin classifier (one or more "heads", each
with its labels and weight), the auxiliary losses (already weighted; the trainer sums them) — the
network's own (e.g. SCAN's ``rmo``) passed through plus the recipe's — and monitoring values. The
trainer knows nothing else about it, and nothing about the network's parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.models.network import build_network


@dataclass
class ClassifierInput:
    embeddings: torch.Tensor  # (N, D), not normalised; the classifier normalises
    labels: torch.Tensor  # (N,) int64 global class ids
    weight: float = 1.0  # the term enters the total loss as weight * CE


@dataclass
class StepOutput:
    heads: dict[str, ClassifierInput]  # each is a 'loss/cls_<name>' term
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted, summed into the loss
    scalars: dict[str, float | torch.Tensor] = field(default_factory=dict)  # logged as 'monitor/<name>'
    histograms: dict[str, torch.Tensor] = field(default_factory=dict)  # last step's, logged as 'hist/<name>'
    watched: dict[str, torch.Tensor] = field(default_factory=dict)  # graph tensors: per-term gradient norms


class RecipeModel(nn.Module):
    """Base class: holds the network; subclasses implement :meth:`forward`."""

    def __init__(self, cfg):
        super().__init__()
        self.net = build_network(cfg.model)
        if cfg.model.init_from:  # fine-tuning: start from a trained network of the same architecture
            from pipeline.checkpoint import load_weights

            load_weights(self.net, cfg.model.init_from, "model.init_from")
            cfg.model.initialised_from, cfg.model.init_from = cfg.model.init_from, ""

    def forward(self, batch: dict) -> StepOutput:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def embedding_size(self) -> int:
        """The classifier's input width: the head's embedding size."""
        return self.net.embedding_size

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings for evaluation (eval mode, no augmentation): (N,3,H,W) in [-1,1] → (N,D)."""
        return self.net.embed(images)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (as in ``named_parameters``) excluded from weight decay."""
        return {f"net.{n}" for n in self.net.no_weight_decay()}

    def parameter_monitors(self) -> dict[str, torch.Tensor]:
        """Monitors of the parameters alone (logged as ``monitor/<name>`` at log steps, not computed every step)."""
        return self.net.parameter_monitors()

    def histograms(self) -> dict[str, torch.Tensor]:
        """Tensors written as TensorBoard histograms every ``output.histogram_every`` steps."""
        return self.net.histograms()

    def on_checkpoint(self, out_dir: Path, step: int, faces: torch.Tensor | None = None) -> None:
        """Called on rank 0 after each checkpoint (e.g. to write PNG plots); ``faces``: a few fixed faces
        for the network's attention-map figure."""
        self.net.on_checkpoint(out_dir, step, faces)
