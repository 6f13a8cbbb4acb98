"""Worker of tests/integration/test_collectives.py: a short real training run that records every collective call.

    torchrun --nproc_per_node 2 tests/collective_audit.py OUT_DIR --config A.yaml ... key=value ...

Every public collective of ``torch.distributed`` is wrapped before the trainer runs; each call is
attributed to the first caller outside torch.distributed: ``pipeline/collectives.py`` (the one module
allowed to issue collectives), DeepSpeed's engine (its own business), or anything else (a violation).
Each rank writes ``OUT_DIR/rank<r>.json`` with the counts, the violations and the devices seen.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

OPS = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "barrier",
    "reduce",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "send",
    "recv",
    "isend",
    "irecv",
)
TORCH_DIST = str(Path(dist.__file__).parent)
COUNTS: Counter = Counter()
VIOLATIONS: list[str] = []
DEVICES: Counter = Counter()


def _caller() -> tuple[str, int]:
    frame = sys._getframe(2)
    while frame is not None and (
        frame.f_code.co_filename.startswith(TORCH_DIST) or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("?", 0)


def _wrap(name: str):
    original = getattr(dist, name)

    def wrapper(*args, **kwargs):
        filename, line = _caller()
        if filename.endswith(os.path.join("pipeline", "collectives.py")):
            who = "collectives"
            for a in args:
                if hasattr(a, "device"):
                    DEVICES[str(a.device)] += 1
        elif f"{os.sep}deepspeed{os.sep}" in filename:
            who = "deepspeed"
        else:
            who = "other"
            VIOLATIONS.append(f"{name} from {filename}:{line}")
        COUNTS[f"{who}:{name}"] += 1
        return original(*args, **kwargs)

    setattr(dist, name, wrapper)


def main() -> int:
    out = Path(sys.argv[1])
    argv = sys.argv[2:]
    for name in OPS:
        if hasattr(dist, name):
            _wrap(name)
    from pipeline import train

    rc = train.main(argv)
    rank = int(os.environ.get("RANK", "0"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(
        json.dumps({"rc": rc, "counts": dict(COUNTS), "violations": VIOLATIONS, "devices": dict(DEVICES)}, indent=1)
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())
