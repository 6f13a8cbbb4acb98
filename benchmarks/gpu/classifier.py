"""The classifier part of bench_gpu: ``ShardedMarginClassifier`` at 1M classes on one device (step time, peak
memory, TF32), and the buffer-count model of its peak that it is checked against (BENCHMARKS.md "Scale on paper"),
with the live-tensor tracer that stands in for the CUDA peak on the CPU."""

from __future__ import annotations

import gc
import math
import statistics

import torch

from benchmarks.gpu.timing import Clock, MiB, Sizes, free, log

# --------------------------------------------------------------------------- the peak on paper


def expected_positive_rows(classes_local: int, global_batch: int, world: int = 1) -> float:
    """Expected distinct positive classes of a uniform-label global batch that fall in one shard."""
    total = classes_local * world
    return classes_local * (1.0 - (1.0 - 1.0 / total) ** global_batch)


def predicted_classifier_peak(classes: int, dim: int, global_batch: int, sample_rate: float, world: int = 1) -> dict:
    """Peak tensor bytes of one ShardedMarginClassifier step on a rank holding ``classes`` rows (all fp32),
    from the buffers live at its three high-water marks (traced op by op; BENCHMARKS.md "Scale on paper"):

    * softmax forward (exp):  weight + momentum + normalised rows (+ gathered rows if sampling) + 4 N×S
      (cosine, s·cosine with the margin, logits − max, exp) + 2 N×D (gathered and normalised embeddings);
    * F.normalize backward:   weight + momentum + 5 S×D (grad of the normalised rows, two quotients, a
      negation, a product) (+ gathered rows if sampling);
    * index backward (sampling only): weight + momentum + 2 C×D (the dense zero gradient and index_put's
      out-of-place result) + S×D.

    S = the sampled rows = max(ceil(rate·C), distinct positives in the shard)."""
    pos = expected_positive_rows(classes, global_batch, world)
    num_sample = classes if sample_rate >= 1.0 else min(classes, max(math.ceil(sample_rate * classes), round(pos)))
    sampled = num_sample < classes
    cd, sd, ns = classes * dim * 4, num_sample * dim * 4, global_batch * num_sample * 4
    marks = {
        "softmax": 2 * cd + (2 if sampled else 1) * sd + 4 * ns + 2 * global_batch * dim * 4,
        "normalize_backward": 2 * cd + (6 if sampled else 5) * sd,
        "index_backward": (4 * cd + sd) if sampled else 0,
    }
    where = max(marks, key=marks.get)
    return {"state_bytes": 3 * cd, "peak_bytes": marks[where], "peak_at": where, "num_sample": num_sample}


class LiveTensorPeak:
    """Peak bytes of live tensor storages during a block of code, on any device (the CPU stand-in for
    ``torch.cuda.max_memory_allocated``): a dispatch mode registers every op's output storage and a weakref
    finalizer drops it when the storage dies. Tensors that exist before the block are passed to ``track``."""

    def __init__(self):
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def track(self, *tensors) -> None:
        import weakref

        for t in tensors:
            st = t.untyped_storage()
            k = st._cdata
            if k in self.live:
                continue
            self.live[k] = st.nbytes()
            self.current += st.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._drop, k)

    def _drop(self, k: int) -> None:
        self.current -= self.live.pop(k, 0)

    def run(self, fn) -> int:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.track(*(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)))
                return out

        self.peak = self.current
        with Mode():
            fn()
        return self.peak


# --------------------------------------------------------------------------- the part


def part_classifier(args, sz: Sizes, device: torch.device, clock: Clock) -> dict:
    res = {"classes": sz.cls_classes, "dim": 512, "batch": sz.cls_batch, "runs": []}
    for rate in sz.cls_rates:
        log(f"classifier: {sz.cls_classes:,} classes, sample rate {rate}, batch {sz.cls_batch}")
        base = _reset_peak(device)
        clf, opt, emb, lab = _classifier_and_batch(sz, rate, device)
        step = _step(clf, opt, emb, lab)
        for _ in range(sz.warmup):
            step()
        times = [clock.per_call(step, sz.steps) for _ in range(sz.repeats)]
        peak, how = _step_peak(device, base, step, clf, opt, emb, lab)
        tf32 = _tf32_step_s(device, rate, clock, step, sz)
        row = _row(sz, rate, times, peak, how, _state_bytes(clf, opt), tf32)
        res["runs"].append(row)
        log(
            f"classifier: rate {rate}: step {row['step_s'] * 1000:.1f} ms, peak "
            + ("n/a" if peak is None else f"{row['peak_mib']:.0f} MiB")
            + f" (predicted {row['predicted_peak_mib']:.0f} MiB), state {row['state_mib']:.0f} MiB"
        )
        del clf, opt, emb, lab, step
        free()
    return res


def _reset_peak(device: torch.device) -> int | None:
    """Collect, and on the GPU empty the cache and reset the peak: the allocation before the classifier (None on
    the CPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return base
    return None


def _classifier_and_batch(sz: Sizes, rate: float, device: torch.device):
    """The classifier (ArcFace margin, ``rate`` sampling), its SGD, and one batch of embeddings and labels."""
    from pipeline.losses.margin import CombinedMargin
    from pipeline.losses.sharded_classifier import ShardedMarginClassifier

    torch.manual_seed(0)
    clf = ShardedMarginClassifier(sz.cls_classes, 512, CombinedMargin(64.0, 1.0, 0.5, 0.0), sample_rate=rate)
    clf = clf.to(device)
    opt = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(sz.cls_batch, 512, generator=g).to(device).requires_grad_(True)
    lab = torch.randint(0, sz.cls_classes, (sz.cls_batch,), generator=g).to(device)
    return clf, opt, emb, lab


def _step(clf, opt, emb, lab):
    """One classifier step: loss, backward, SGD step, gradients dropped."""

    def step(clf=clf, opt=opt, emb=emb, lab=lab):
        loss = clf(emb, lab)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        emb.grad = None

    return step


def _step_peak(device: torch.device, base: int | None, step, clf, opt, emb, lab) -> tuple[int, str]:
    """The peak bytes of a step and how they were measured: the CUDA peak since ``base``, or on the CPU one more
    step under the live-tensor tracer (RSS is allocator noise at smoke sizes)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        return peak, "torch.cuda.max_memory_allocated above the allocation before the classifier was built"
    tracer = LiveTensorPeak()
    tracer.track(clf.weight, emb, lab, *(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)))
    peak = tracer.run(step)
    return peak, "live tensor bytes at the peak of one step (dispatch-mode tracer, CPU)"


def _tf32_step_s(device: torch.device, rate: float, clock: Clock, step, sz: Sizes) -> float | None:
    """The step time with TF32 matmuls (GPU, rate 1.0 only; the trainer's classifier is fp32), else None."""
    if not (device.type == "cuda" and rate == 1.0):  # lever: the fp32 matmuls on TF32 tensor cores
        return None
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        step()
        return statistics.median([clock.per_call(step, sz.steps) for _ in range(sz.repeats)])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _state_bytes(clf, opt) -> int:
    """Parameters + optimiser state + the gradient (freed by zero_grad(set_to_none) at the end of the step)."""
    return (
        sum(p.numel() * p.element_size() for p in clf.parameters())
        + sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        + clf.weight.numel() * 4
    )  # + the gradient, freed by zero_grad(set_to_none) at the end of the step


def _row(sz: Sizes, rate: float, times: list, peak, how: str, state: int, tf32: float | None) -> dict:
    """One sample rate's figures, with the predicted peak beside the measured one."""
    pred = predicted_classifier_peak(sz.cls_classes, 512, sz.cls_batch, rate)
    return {
        "sample_rate": rate,
        "step_s": statistics.median(times),
        "blocks_s": times,
        "peak_mib": None if peak is None else peak / MiB,
        "peak_how": how,
        "state_mib": state / MiB,
        "predicted_peak_mib": pred["peak_bytes"] / MiB,
        "predicted_state_mib": pred["state_bytes"] / MiB,
        "peak_over_predicted": None if peak is None else peak / pred["peak_bytes"],
        "predicted_peak_at": pred["peak_at"],
        "tf32_step_s": tf32,
        "tf32_speedup": None if tf32 is None else statistics.median(times) / tf32,
    }
