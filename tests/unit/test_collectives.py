"""Every collective goes through pipeline.collectives, which checks devices (issue 9, item 1).

The unit half (in-process, each test under 5 s); the rest is in tests/integration/test_collectives.py.
"""

from __future__ import annotations

import pytest
import torch

from pipeline import collectives


def test_served_devices_and_device_check():
    assert collectives.served_device_types("gloo") == {"cpu"}
    assert collectives.served_device_types("nccl") == {"cuda"}
    assert collectives.served_device_types("cpu:gloo,cuda:nccl") == {"cpu", "cuda"}
    cpu = torch.zeros(1)
    collectives.check_device("all_reduce", cpu, backend="cpu:gloo,cuda:nccl")
    with pytest.raises(RuntimeError, match=r"all_reduce: a tensor on cpu .* backend 'nccl', which serves cuda"):
        collectives.check_device("all_reduce", cpu, backend="nccl")
    meta = torch.empty(1, device="meta")  # a device no backend serves, as a CUDA tensor on a gloo-only group
    with pytest.raises(RuntimeError, match="tensor on meta"):
        collectives.check_device("all_gather", cpu, meta, backend="gloo")
