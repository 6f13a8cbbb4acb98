"""Shared by tests/unit/test_lcd.py and tests/integration/test_lcd.py: the tiny LCD config and random faces."""

from __future__ import annotations

import torch

from pipeline.config import load_config
from tests.helpers import REPO

LCD_R50 = REPO / "configs" / "lcd_r50.yaml"
TINY = ["model.backbone=iresnet18", "model.width=0.25", "device=cpu"]


def tiny_cfg(*overrides, configs=(LCD_R50,)):
    return load_config(list(configs), [*TINY, *overrides])


def images(n=4, size=112, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
