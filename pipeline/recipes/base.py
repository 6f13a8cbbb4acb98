"""The contract between a recipe and the trainer.

A recipe is an ``nn.Module`` built from the config. Its ``forward(batch)`` returns a
:class:`StepOutput`: the embeddings that go to the shared margin classifier (one or more
"heads", each with its labels and weight), its own auxiliary losses (already weighted; the
trainer sums them), and its own monitoring values. The trainer knows nothing else about it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


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


class RecipeModel(nn.Module):
    """Base class: subclasses implement :meth:`forward` and :meth:`embed`."""

    def forward(self, batch: dict) -> StepOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings for evaluation (eval mode, no augmentation): (N,3,H,W) in [-1,1] → (N,D)."""
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Parameter names (as in ``named_parameters``) excluded from weight decay."""
        return set()

    def histograms(self) -> dict[str, torch.Tensor]:
        """Tensors written as TensorBoard histograms every ``output.histogram_every`` steps."""
        return {}

    def on_checkpoint(self, out_dir: Path, step: int) -> None:
        """Called on rank 0 after each checkpoint (e.g. to write PNG plots)."""

    def inference_backbone(self) -> nn.Module:
        """The module to save as ``model.pt`` for evaluation/export (embedding network only)."""
        return self.backbone
