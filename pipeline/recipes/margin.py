"""The baseline recipe: a backbone trained with a margin softmax (ArcFace / CosFace / combined).

The margin itself lives in the shared classifier (``margin:`` block); this recipe only maps
images to embeddings, so it is also what other recipes reuse for evaluation.
"""
from __future__ import annotations

import torch

from pipeline import registry
from pipeline.recipes.base import ClassifierInput, RecipeModel, StepOutput


class MarginRecipe(RecipeModel):
    def __init__(self, cfg):
        super().__init__()
        self.backbone = registry.build_backbone(cfg.model)

    def forward(self, batch: dict) -> StepOutput:
        emb = self.backbone(batch["image"])
        return StepOutput(heads={"main": ClassifierInput(emb, batch["label"])})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


@registry.register_recipe("margin")
def build(cfg) -> MarginRecipe:
    return MarginRecipe(cfg)
