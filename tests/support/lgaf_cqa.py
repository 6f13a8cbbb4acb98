"""Shared by tests/unit/test_lgaf_cqa.py and tests/integration/test_lgaf_cqa.py: fixtures and helpers of both halves."""

from __future__ import annotations

import torch

from pipeline.config import ModelConfig, resolve_model
from pipeline.models.lgaf import LocalGlobalFusion
from pipeline.models.network import build_network


def net_for(head: dict, backbone: str = "iresnet18", width: float = 0.125, input_size: int = 32):
    cfg = ModelConfig(backbone=backbone, width=width, input_size=input_size, head=head)
    resolve_model(cfg, {})
    return build_network(cfg)


def lgf(mean=(20.0, 25.0), std=(10.0, 5.0), std_eps=0.0, alpha=0.01) -> LocalGlobalFusion:
    m = LocalGlobalFusion(h=0.333, alpha=alpha, init=[20.0, 100.0], std_eps=std_eps)
    m.ema_mean.copy_(torch.tensor(mean))
    m.ema_std.copy_(torch.tensor(std))
    return m
