"""Training metrics: the logged scalars averaged over ranks (one host sync, at log steps only), TensorBoard, the
console line, the monitors' collapse floors and the corrupt-sample budget (``data.max_bad_fraction``)."""

from __future__ import annotations

import math
import time

import torch

from data_prep.manifest import DataError
from pipeline import collectives
from pipeline.config import Config
from pipeline.progress import hms

CORRUPT = "data/corrupt_samples"
CLASSIFIER_SHARD_SQ = "grad_norm/classifier_shard_sq"


def floor_warnings(
    floors: dict[str, tuple[float, str]], means: dict[str, float], warned: set[str], step: int
) -> list[str]:
    """One warning line per monitor that fell under its part's floor (:meth:`FaceNetwork.monitor_floors`), the
    first time it does (``warned`` remembers); ``means``: the logged ``monitor/<name>`` values."""
    lines = []
    for name, (floor, why) in floors.items():
        value = means.get(f"monitor/{name}")
        if value is not None and value < floor and name not in warned:
            warned.add(name)
            lines.append(f"[train] warning: step {step}: monitor/{name} = {value:.3g} < {floor:g}: {why}")
    return lines


class TrainMetrics:
    """``floors``: monitor name → (floor, why), warned about once each; ``writer``: TensorBoard (rank 0, set by the
    trainer); ``start(step)`` when the loop starts (elapsed time, ETA and the corrupt fraction count from there)."""

    def __init__(
        self, cfg: Config, world_size: int, device: torch.device, floors: dict, global_batch: int, steps_per_epoch: int
    ):
        self.cfg, self.world, self.device, self.floors = cfg, world_size, device, floors
        self.global_batch, self.steps_per_epoch = global_batch, steps_per_epoch
        self.writer = None
        self.warned: set[str] = set()
        self.started, self.start_step = time.perf_counter(), 0

    def start(self, step: int) -> None:
        self.started, self.start_step = time.perf_counter(), step

    def mean_over_ranks(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        names = sorted(values)
        # on the training device (NCCL under CUDA); a log step is the one place the loop syncs with the host
        vec = torch.stack([torch.as_tensor(values[n]).to(self.device, torch.float64).reshape(()) for n in names])
        if self.world > 1:
            collectives.all_reduce(vec)
            vec /= self.world
        return dict(zip(names, vec.tolist()))

    def log(self, step: int, total_steps: int, scalars: dict, host: dict[str, float], samples_per_s: float) -> None:
        """``scalars``: this rank's tensors (``loss/*``, ``monitor/*``, ``data/corrupt_samples`` — summed over
        ranks —, ``grad_norm/classifier_shard_sq`` — summed into the full norm); ``host``: values written as they
        are, when finite (``lr``; fp16's ``train/skipped_steps`` and ``train/loss_scale``; ``grad_norm/backbone``),
        read on the writing rank only (empty elsewhere). Every rank calls (the mean is a collective)."""
        means = self.mean_over_ranks(scalars)
        means[CORRUPT] *= self.world  # the sum over ranks
        self.check_bad_fraction(step, means[CORRUPT])
        if CLASSIFIER_SHARD_SQ in means:  # sum of squares over shards = full norm²
            means["grad_norm/classifier"] = math.sqrt(means.pop(CLASSIFIER_SHARD_SQ) * self.world)
        if self.writer is None:
            return
        for line in floor_warnings(self.floors, means, self.warned, step):
            print(line, flush=True)
        for k, v in means.items():
            self.writer.add_scalar(k, v, step)
        for k, v in {"lr": host["lr"], "samples_per_s": samples_per_s, **host}.items():
            if v is not None and math.isfinite(v):  # e.g. no backbone gradient norm on a skipped step
                self.writer.add_scalar(k, v, step)
        self.writer.flush()
        elapsed = time.perf_counter() - self.started
        done = step - self.start_step
        eta = elapsed / done * (total_steps - step) if done else float("nan")
        print(
            f"[train] step {step}/{total_steps} epoch {step / self.steps_per_epoch:.2f} loss {means['loss/total']:.4f} "
            f"lr {host['lr']:.4g} {samples_per_s:.1f} samples/s elapsed {hms(elapsed)} eta {hms(eta)}",
            flush=True,
        )

    def check_bad_fraction(self, step: int, corrupt: float) -> None:
        """Stop (every rank alike: the count is all-reduced) when too much of what was read was unusable."""
        used = (step - self.start_step) * self.global_batch
        frac = corrupt / max(1.0, used + corrupt)
        if corrupt and frac > self.cfg.data.max_bad_fraction:
            raise DataError(
                f"data.train: {int(corrupt)} of the {int(used + corrupt)} samples read so far were skipped as corrupt "
                f"({frac:.1%} > data.max_bad_fraction={self.cfg.data.max_bad_fraction}); the log names them "
                "(a manifest whose num_classes is too small, bad shards?)"
            )

    def histograms(self, step: int, values: dict[str, torch.Tensor]) -> None:
        if self.writer is None:
            return
        for name, v in values.items():
            self.writer.add_histogram(f"hist/{name}", v.detach().float().cpu(), step)
        self.writer.flush()
