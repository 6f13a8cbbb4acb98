"""2 processes × batch B == 1 process × batch 2B on the same samples (issue 8, item 9).

The real Trainer (DeepSpeed backbone, class-sharded margin classifier, SGD with momentum and weight decay)
runs 3 optimizer steps on the same 3 global batches of 8 real LFW faces, once on one process and once on
two gloo processes with 4 faces each (tests/workers/world_equivalence.py; BatchNorm frozen, dropout 0, every class
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

from tests.helpers import REPO

WORKER = REPO / "tests" / "workers" / "world_equivalence.py"
NATIVE_ABORT = "terminate called without an active exception"


def _command(world: int, shards: Path, list_file: Path, out: Path, *extra: str) -> list[str]:
    args = [str(WORKER), "--shards", str(shards), "--list", str(list_file), "--out", str(out), *extra]
    if world == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *args]


def _run(world: int, shards: Path, list_file: Path, out: Path, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = _command(world, shards, list_file, out, *extra)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and NATIVE_ABORT in proc.stderr:
        # torch 2.13 CPU + gloo: in 3 of ~12 clean-clone runs (2026-12-04/06) one rank died at start-up with this
        # C++ abort before any step, never with a wrong number; one rerun, said on the console. A second abort, or
        # any other failure, still fails the test. The rerun writes beside the first (``--out`` names the run's
        # output.dir, which the aborted start has already claimed: one run per output folder).
        print(f"world {world}: a rank aborted natively ({NATIVE_ABORT!r}); running it once more")
        out = out.with_name(f"{out.stem}_rerun{out.suffix}")
        cmd = _command(world, shards, list_file, out, *extra)
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


@pytest.mark.slow
def test_resume_across_world_sizes_keeps_weights_and_momentum(lfw_shards, lfw_train, tmp_path):
    """Issue 10 item 5: 2 steps on 2 processes → resume on 3 → resume on 1, against 6 uninterrupted steps on 1
    process with the same global batch of 6 faces: the network, the class centres and the backbone's SGD momentum
    must agree (``optimizer_full.pt``: the optimizer state by parameter name, re-partitioned for the new world).
    Negative control: the same chain without that file (momentum re-initialised at the last resume) disagrees.
    Measured (2-core CPU): network 3.9e-4, momentum 2.5e-3 (a PReLU slope's, float32 reordering over 6 steps),
    centres 4.2e-5 relative; the negative control's momentum 1.15. Bounds 1e-2 / 1e-2 / 1e-3."""
    list_file = lfw_train.parent / "train_list.txt"
    common = ["--global-batch", "6", "--steps", "2"]
    ref = _run(1, lfw_shards, list_file, tmp_path / "ref.pt", "--global-batch", "6", "--steps", "6")
    a = _run(2, lfw_shards, list_file, tmp_path / "a.pt", *common, "--save")
    b = _run(
        3,
        lfw_shards,
        list_file,
        tmp_path / "b.pt",
        *common,
        "--first-batch",
        "2",
        "--resume",
        a["checkpoint"],
        "--save",
    )
    c = _run(1, lfw_shards, list_file, tmp_path / "c.pt", *common, "--first-batch", "4", "--resume", b["checkpoint"])
    net_rel, worst = _worst_rel(ref["net"], c["net"])
    mom_rel, worst_mom = _worst_rel(ref["moments"], c["moments"])
    cen_rel = float((ref["centres"] - c["centres"]).norm() / ref["centres"].norm())
    # without the world-independent state: the third leg resumes with momentum re-initialised
    (Path(b["checkpoint"]) / "optimizer_full.pt").unlink()
    ckpt_sums = Path(b["checkpoint"]) / "checksums.json"
    import json

    sums = json.loads(ckpt_sums.read_text())
    sums.pop("optimizer_full.pt")
    ckpt_sums.write_text(json.dumps(sums))
    d = _run(1, lfw_shards, list_file, tmp_path / "d.pt", *common, "--first-batch", "4", "--resume", b["checkpoint"])
    neg_rel, _ = _worst_rel(ref["moments"], d["moments"])
    print(
        f"chain vs uninterrupted: network {net_rel:.2e} ({worst}), momentum {mom_rel:.2e} ({worst_mom}), "
        f"centres {cen_rel:.2e}; without optimizer_full.pt: momentum {neg_rel:.2e}"
    )
    assert c["losses"] == pytest.approx(ref["losses"][4:], rel=1e-3)
    assert net_rel < 1e-2 and cen_rel < 1e-3, (net_rel, worst, cen_rel)
    assert mom_rel < 1e-2, (mom_rel, worst_mom)
    assert neg_rel > 10 * max(mom_rel, 1e-3), neg_rel
