"""Golden per-step losses of every training procedure (torchtitan-style loss comparison across commits).

``python -m tests.golden.losses --shards DIR`` runs each case below through the real trainer (smoke layer,
fixed seed, 1 and 2 gloo processes, real LFW faces) and writes ``tests/golden/losses.json``: every
``loss/*`` TensorBoard term at every optimizer step (rank-mean). ``tests/integration/test_golden_losses.py`` reruns
the same commands and compares. The file was recorded on the commit *before* the composable-model
redesign (issue 8), so the test proves the redesign changed no number beyond float noise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("losses.json")
STEPS = 6
COMMON = [
    "--config",
    "configs/smoke.yaml",
    f"schedule.max_steps={STEPS}",
    "output.log_every=1",
    "output.checkpoint_every=1000",
    "output.histogram_every=0",
    "data.num_workers=1",
    "seed=3",
]
# case name → config layers / overrides placed before COMMON (the smoke layer is stacked last)
CASES = {
    "margin": ["--config", "configs/arcface_r50.yaml", "model.backbone=iresnet18"],
    "scan": ["--config", "configs/scan_r18_casia.yaml"],
    "lrfr": ["--config", "configs/lrfr_r34_casia.yaml", "model.backbone=iresnet18"],
}
WORLDS = (1, 2)


def command(case: str, world: int, shards: Path, out: Path) -> list[str]:
    args = [*CASES[case][:2], *COMMON[:2], *CASES[case][2:], *COMMON[2:], f"data.train={shards}", f"output.dir={out}"]
    if world == 1:
        return [sys.executable, "-m", "pipeline.train", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world}",
        "-m",
        "pipeline.train",
        *args,
    ]


def losses_of(tb_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        if tag.startswith("loss/"):
            events = sorted(acc.Scalars(tag), key=lambda e: e.step)
            out[tag] = [e.value for e in events]
    return out


def run_case(case: str, world: int, shards: Path, out: Path) -> dict[str, list[float]]:
    # The recording's kernels: AVX2 for ATen and oneDNN. On an AVX-512 CPU (this machine kind's AMD EPYC varies:
    # some have avx512_bf16) torch picks AVX-512 kernels whose float sums differ in the last bits, which 3 SGD
    # steps grow to 1e-4 relative (measured 2026-12-05: HEAD 01e6669 itself then failed the recording); capped
    # at AVX2, every machine of the kind reproduces it bit for bit. No-ops on an AVX2-only CPU.
    env = dict(os.environ, OMP_NUM_THREADS="1", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    cmd = command(case, world, shards, out)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return losses_of(out / "tb")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="LFW View-1 train shards (tests/conftest.py lfw_shards)")
    ap.add_argument("--work", default="/tmp/golden_losses", help="scratch directory for the runs")
    ap.add_argument(
        "--cases",
        nargs="+",
        choices=list(CASES),
        default=list(CASES),
        help="re-record only these (after a deliberate change of their numbers)",
    )
    ap.add_argument("--why", default="", help="with --cases: the deliberate change, recorded beside the numbers")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if set(args.cases) != set(CASES):
        if not args.why:
            ap.error("--cases needs --why (what deliberately changed these losses)")
        result = json.loads(GOLDEN.read_text())
        result.setdefault("rerecorded", [])
    else:
        result = {"commit": commit, "steps": STEPS, "cases": {}}
    for case in args.cases:
        for world in WORLDS:
            key = f"{case}/world{world}"
            result["cases"][key] = run_case(case, world, Path(args.shards), Path(args.work) / key)
            print(key, {k: [round(x, 5) for x in v] for k, v in result["cases"][key].items()}, flush=True)
    if "rerecorded" in result:
        result["rerecorded"].append({"cases": args.cases, "on_top_of": commit, "why": args.why})
    GOLDEN.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
