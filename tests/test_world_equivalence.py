"""2 processes × batch B == 1 process × batch 2B on the same samples (issue 8, item 9).

The real Trainer (DeepSpeed backbone, class-sharded margin classifier, SGD with momentum and weight decay)
runs 3 optimizer steps on the same 3 global batches of 8 real LFW faces, once on one process and once on
two gloo processes with 4 faces each (tests/world_equivalence.py; BatchNorm frozen, dropout 0, every class
kept, the same initial class centres). Losses, the whole network and the full class-centre matrix must agree.

What this catches: the sharded softmax's all-gathers and the ×world scaling of the embedding gradient
(DeepSpeed averages backbone gradients over ranks while each sample's gradient already arrives summed from
all shards). Measured on the 2-core CI machine kind: worst per-tensor relative difference of the network
4.2e-4 after 3 steps (4e-6 after 1 step: float32 reordering, amplified by lr 0.1 on losses of ~25), of
the centres 7.5e-6, of the losses 4e-6. Bounds: 1e-2 (network), 1e-3 (centres), 1e-4 (losses). The
negative control, the same 2-process run with the ×world scaling removed, differs by 0.64 (network) and
0.56 relative on the third loss, so the bounds separate the two cases by more than 20×.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "world_equivalence.py"


def _run(world: int, shards: Path, list_file: Path, out: Path, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [str(WORKER), "--shards", str(shards), "--list", str(list_file), "--out", str(out), *extra]
    cmd = (
        [sys.executable, *args]
        if world == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *args]
    )
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return torch.load(out, weights_only=True)


def _worst_rel(a: dict, b: dict) -> tuple[float, str]:
    return max(
        (float((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-12)), k)
        for k in a
        if a[k].is_floating_point()
    )


@pytest.mark.slow
def test_two_processes_equal_one_process_with_twice_the_batch(lfw_shards, lfw_train, tmp_path):
    list_file = lfw_train.parent / "train_list.txt"
    one = _run(1, lfw_shards, list_file, tmp_path / "w1.pt")
    two = _run(2, lfw_shards, list_file, tmp_path / "w2.pt")
    loss_rel = max(abs(a - b) / abs(a) for a, b in zip(one["losses"], two["losses"]))
    net_rel, worst = _worst_rel(one["net"], two["net"])
    cen_rel = float((one["centres"] - two["centres"]).norm() / one["centres"].norm())
    print(
        f"1×8 vs 2×4: losses {one['losses']} vs {two['losses']} (rel {loss_rel:.1e}); network worst rel "
        f"{net_rel:.1e} ({worst}); centres rel {cen_rel:.1e}"
    )
    assert len(one["losses"]) == 3 and one["centres"].shape == two["centres"].shape == (111, 64)
    assert loss_rel <= 1e-4 and net_rel <= 1e-2 and cen_rel <= 1e-3

    # negative control: without the ×world embedding-gradient scale the same comparison fails
    bad = _run(2, lfw_shards, list_file, tmp_path / "w2_unscaled.pt", "--no-grad-scale")
    bad_rel, _ = _worst_rel(one["net"], bad["net"])
    print(f"without the ×world scale: network worst rel {bad_rel:.2f}")
    assert bad_rel > 0.2
