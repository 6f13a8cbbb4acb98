"""Worker of tests/integration/test_no_hang.py: the real trainer (``pipeline.train``'s own entry point) with one fault
injected on one rank at one stage. Launched as ``torchrun --nproc_per_node=2 tests/fault_worker.py TRAIN_ARGS…``.

Environment: ``FAULT_STAGE`` (loader | forward | backward | step | logging | eval | checkpoint | finalize),
``FAULT_RANK`` (the rank that fails), ``FAULT_AT`` (the call number that fails; 0 = the first). When the fault
fires, ``FAULT_FIRED <unix time>`` is printed on stderr so the test can measure how long the run took to end.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline import train  # noqa: E402
from pipeline.checkpoint import format as checkpoint_format  # noqa: E402
from pipeline.data import loader as loader_module  # noqa: E402
from pipeline.models import network  # noqa: E402

STAGE = os.environ["FAULT_STAGE"]
ON_RANK = int(os.environ.get("FAULT_RANK", "0"))
AT = int(os.environ.get("FAULT_AT", "1"))
RANK = int(os.environ.get("RANK", "0"))
calls = {"n": 0}


def fire(error: BaseException | None = None) -> None:
    calls["n"] += 1
    if RANK == ON_RANK and calls["n"] == AT + 1:
        print(f"FAULT_FIRED {time.time():.3f}", file=sys.stderr, flush=True)
        raise error or RuntimeError(f"injected fault at stage {STAGE}")


def wrap(owner, name: str, error: BaseException | None = None, when=lambda *a, **k: True) -> None:
    original = getattr(owner, name)

    def faulty(*args, **kwargs):
        if when(*args, **kwargs):
            fire(error)
        return original(*args, **kwargs)

    setattr(owner, name, faulty)


class FaultyLoader:
    """The trainer's loader, whose batch iterator raises at the AT-th batch (as a failing worker's error does)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _faulty(self, batches):
        for batch in batches:
            fire()
            yield batch

    def __iter__(self):
        return self._faulty(iter(self._inner))

    def iter_from(self, offset):
        return self._faulty(iter(self._inner.iter_from(offset)))


if STAGE == "loader":
    build = loader_module.build_train_loader
    loader_module.build_train_loader = lambda *a, **k: FaultyLoader(build(*a, **k))
elif STAGE == "forward":
    wrap(network.FaceNetwork, "forward")
elif STAGE == "backward":
    import deepspeed.runtime.engine as ds_engine

    wrap(ds_engine.DeepSpeedEngine, "backward")
elif STAGE == "step":
    wrap(train.Trainer, "_classifier_step")
elif STAGE == "logging":
    wrap(train.Trainer, "_log")
elif STAGE == "eval":
    wrap(train.Trainer, "evaluate")
elif STAGE == "checkpoint":  # a full disk while model.pt is written
    full = OSError(errno.ENOSPC, "No space left on device")
    wrap(torch, "save", full, when=lambda obj, f, *a, **k: str(f).endswith("model.pt"))
elif STAGE == "finalize":  # the file system turned read-only as the checkpoint was being published
    wrap(checkpoint_format, "finalize", OSError(errno.EROFS, "Read-only file system"))
else:
    raise SystemExit(f"unknown FAULT_STAGE {STAGE!r}")

if __name__ == "__main__":
    train.exit_now(train.main(sys.argv[1:]))
