"""Keys and values of earlier releases → what to write now: the config loader turns each into a one-line error
naming the new key (:mod:`pipeline.config.validation`, :mod:`pipeline.config.parts`, :mod:`pipeline.config.load`)."""

from __future__ import annotations

# Keys and values of earlier releases → what to write now (a one-line error says so).
RENAMED_KEYS = {
    "model.embedding_size": "model.head.embedding_size",
    "model.dropout": "model.head.dropout",
    "model.options": "model.conv (e.g. model.conv: {kind: scan, lsc: false})",
}
RENAMED_KEYS.update(
    {
        f"method.{k}": f"model.conv.{k} (with model.conv.kind: scan)"
        for k in (
            "sac",
            "lsc",
            "rmo",
            "rmo_weight",
            "rmo_lambda",
            "gamma_m",
            "efficient_rmo",
            "t_min",
            "gaussian_sum1",
            "t_density_png",
        )
    }
)
RENAMED_KEYS["method.init_backbone"] = "model.init_from"
RENAMED_VALUES = {
    ("recipe", "scan"): "recipe: margin with model.conv: {kind: scan, ...} (the SCAN switches moved from "
    "method: to model.conv:, method.init_backbone to model.init_from)",
}
RENAMED_BACKBONE_PREFIX = ("scan_", "model.backbone: {plain} with model.conv: {{kind: scan}}")

__all__ = ["RENAMED_BACKBONE_PREFIX", "RENAMED_KEYS", "RENAMED_VALUES"]
