"""The step guard: a step whose loss (or a BatchNorm statistic its forward updated) is NaN/inf on any rank is
skipped whole — no update of the backbone or the classifier, the BatchNorm statistics put back — and counted;
fp16 overflow skips (DeepSpeed's) are counted too. Too many consecutive skips stop the run
(``optim.max_nonfinite_steps``) with :class:`TrainingDiverged`, keeping the last (finite) checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from pipeline import checkpoint as ckpt
from pipeline import collectives, distributed


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite / overflowing steps: the run stops, its last checkpoint kept (exit 3)."""


class StepGuard:
    """``model``: whose floating buffers (BatchNorm statistics) a skipped step restores; ``max_bad``: consecutive
    skipped steps that stop the run; ``ckpt_root``: named in that error. ``writer``: TensorBoard (rank 0), set by
    the trainer once it exists."""

    def __init__(self, model: torch.nn.Module, world_size: int, max_bad: int, ckpt_root: Path):
        self.world, self.max_bad, self.ckpt_root = world_size, max_bad, ckpt_root
        self.writer = None
        self.nonfinite_steps = 0  # optimizer steps skipped for a non-finite loss (train/nonfinite_steps)
        self.skipped_steps = 0  # optimizer steps skipped on fp16 overflow (train/skipped_steps)
        self.consecutive_bad = 0
        self.window_bad = False  # a micro step of the current accumulation window was non-finite
        self._buffers = list(model.buffers())
        self.float_buffers = [b for b in self._buffers if b.is_floating_point()]
        self._buffers_before = [b.detach().clone() for b in self._buffers]

    def window_start(self) -> None:
        """The BatchNorm statistics as an accumulation window starts, for a skip to put back."""
        if self._buffers:
            torch._foreach_copy_(self._buffers_before, self._buffers)  # one fused copy into kept storage

    def check(self, total: torch.Tensor) -> None:
        """Mark the window bad when the loss, or a buffer this forward updated, is NaN/inf on some rank (one
        device→host read per micro step: the price of never applying a poisoned update)."""
        bad = ~torch.isfinite(total.detach())
        if self.float_buffers:  # one fused norm over every buffer: inf/NaN anywhere makes it non-finite
            norms = torch.stack(torch._foreach_norm(self.float_buffers))
            bad = bad | ~torch.isfinite(norms.float()).all()
        flag = bad.to(torch.float32).reshape(1)
        if self.world > 1:
            collectives.all_reduce(flag, "max")
        if flag.item() > 0:
            self.window_bad = True

    def skip(self, step: int, why: str, terms: dict, zero_grads: Callable[[], None]) -> None:
        """Drop this optimizer step (``zero_grads`` clears backbone and classifier gradients); count it; put the
        BatchNorm statistics back; stop after too many in a row."""
        self.window_bad = False
        if self._buffers:  # a skipped step leaves no trace: the forward's BatchNorm statistics too
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._buffers_before)
        zero_grads()
        self.nonfinite_steps += 1
        self.consecutive_bad += 1
        self._note(step, why, {k: float(v.detach()) for k, v in terms.items()})

    def overflow(self, step: int, loss_scale: float) -> None:
        """DeepSpeed skipped an fp16 step on overflow. Skips while the dynamic scale is still coming down are how fp16
        scaling works; only a collapsed scale (at DeepSpeed's minimum, 1) that keeps overflowing counts toward
        divergence."""
        self.skipped_steps += 1
        if loss_scale <= 1.0:
            self.consecutive_bad += 1
            if self.consecutive_bad >= self.max_bad:
                self._note(step, f"fp16 gradient overflow at loss scale {loss_scale:g}", {})

    def good_step(self) -> None:
        self.consecutive_bad = 0

    def _note(self, step: int, why: str, values: dict) -> None:
        step += 1  # the step being skipped
        if distributed.is_main():
            shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
            print(
                f"[train] step {step}: {why} ({shown}): step skipped "
                f"({self.consecutive_bad} in a row, {self.nonfinite_steps + self.skipped_steps} in all)",
                flush=True,
            )
            if self.writer:
                self.writer.add_scalar("train/nonfinite_steps", self.nonfinite_steps, step)
        if self.consecutive_bad >= self.max_bad:
            raise TrainingDiverged(
                f"training diverged: {self.consecutive_bad} consecutive skipped steps ({why}) at step {step} "
                f"(optim.max_nonfinite_steps={self.max_bad}); last checkpoint kept: "
                f"{ckpt.latest_or_none(self.ckpt_root)}"
            )
