"""Every collective goes through pipeline.collectives, which checks devices (issue 9, item 1).

The device check itself is exercised for the backends a CUDA run uses (an NCCL-only group would reject
a CPU tensor, the cpu:gloo,cuda:nccl group accepts both) without a GPU; the audit runs each training
procedure for 2 steps on 2 gloo processes (logging, histograms, a checkpoint and verification included)
with every torch.distributed collective wrapped, and finds none issued outside the module except by
DeepSpeed's engine.
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
