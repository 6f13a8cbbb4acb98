"""The baseline procedure: one view per sample, the network's embedding to the margin softmax.

The margin itself (ArcFace / CosFace / combined) lives in the shared classifier (``margin:`` block); the
network's own aux losses (e.g. SCAN's RMO, eq. 7 of SCAN-CNN) and monitors pass straight through.
"""

from __future__ import annotations

from pipeline import registry
from pipeline.recipes.base import ClassifierInput, RecipeModel, StepOutput


class MarginRecipe(RecipeModel):
    def forward(self, batch: dict) -> StepOutput:
        out = self.net(batch["image"])
        return StepOutput(
            heads={"main": ClassifierInput(out.embedding, batch["label"])},
            aux_losses=out.aux_losses,
            scalars=out.monitors,
            histograms=out.histograms,
            watched=out.watched,
        )


@registry.register_recipe("margin")
def build(cfg) -> MarginRecipe:
    return MarginRecipe(cfg)
