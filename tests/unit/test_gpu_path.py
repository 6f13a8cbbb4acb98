"""The GPU path's choices, checked on the CPU (issue 9, item 2): the loader `auto` resolves to DALI on CUDA
when DALI imports and to the torch loader elsewhere, and it is the default of every recipe."""

from __future__ import annotations

import torch

from pipeline.config import load_config
from pipeline.data.loader import build_train_loader, resolve_loader
from tests.helpers import REPO


def test_auto_loader_resolution():
    assert resolve_loader("auto", "cpu")[0] == "torch"
    engine, why = resolve_loader("auto", torch.device("cuda", 0))  # DALI is installed here (CPU wheel of the GPU build)
    assert engine == "dali" and "mixed" in why and "GPU" in why
    assert resolve_loader("torch", "cuda") == ("torch", "data.loader=torch")
    assert resolve_loader("dali", "cpu")[0] == "dali"


def test_auto_is_the_default_of_every_recipe_and_the_smoke_layer_pins_torch():
    for cfg_file in sorted((REPO / "configs").glob("*.yaml")):
        if cfg_file.name == "smoke.yaml":
            continue
        layers = [REPO / "configs" / "base.yaml", cfg_file] if cfg_file.name == "throughput.yaml" else [cfg_file]
        assert load_config(layers).data.loader == "auto", cfg_file.name
    assert load_config([REPO / "configs" / "base.yaml", REPO / "configs" / "smoke.yaml"]).data.loader == "torch"


def test_build_reports_engine(lfw_shards):
    cfg = load_config(
        [REPO / "configs" / "base.yaml"], [f"data.train={lfw_shards}", "data.batch_size=8", "data.num_workers=0"]
    )
    loader = build_train_loader(cfg.data, 0, 1, seed=0, device="cpu")
    assert loader.engine == "torch" and "auto on cpu" in loader.why
