"""Model-parallel margin softmax classifier ("partial FC", An et al., ICCV-W 2021 / CVPR 2022).

The C class centres are split across the W ranks by rows: rank r owns ``shard_range(C, r, W)``
(the first C mod W ranks hold ⌈C/W⌉ rows, the others ⌊C/W⌋). One step:

1. embeddings (with gradient) and labels are all-gathered, so every rank sees the global batch;
2. embeddings and the rank's (sampled) centres are L2-normalised, cos θ = ê·ŵᵀ (ArcFace Eq. 2);
3. partial FC sampling (arcface_torch ``partial_fc_v2``): the sampled row set is the positives of
   the global batch that fall in this shard ∪ random negatives up to ⌈sample_rate·num_local⌉;
   the rows are gathered by indexing the full parameter, so their gradients land in ``weight``;
4. the combined margin (``pipeline.losses.margin``) at the positives;
5. softmax cross-entropy over all shards: the row max and the sum of exponentials are
   all-reduced (MAX, SUM), L = mean_i [log Σ_c exp z_ic − z_iy] over the global batch, with the
   exact backward (p − onehot)/N for this shard's columns. Every rank returns the same value.

Gradients. Each rank's autograd graph only covers its own shard's columns, so the gradient it
gets for the gathered embeddings is a partial sum; the backward of the all-gather all-reduces
(SUM) those partials and returns this rank's rows: that is exactly dL/d(local embeddings). The
backbone's gradients on rank r are then dL/dθ restricted to rank r's samples, and the true
gradient is the SUM over ranks; data-parallel engines (DDP, DeepSpeed) AVERAGE over ranks, so
the trainer passes ``embedding_grad_scale = world_size`` to undo the 1/W (arcface_torch's
``AllGatherFunc.backward`` multiplies by the world size for the same reason). The classifier
shard is not data-parallel: its gradient is already exact and must not be averaged.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline import collectives
from pipeline.config import ConfigError

# the optimizer state kept per class row of the weight (SGD; Adam/AdamW): gathered and re-sharded by these names
ROW_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def shard_range(num_classes: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, end) of the class-centre matrix owned by ``rank`` of ``world``."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_range: rank {rank} is not in a world of size {world}")
    base, extra = divmod(num_classes, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def take_shard(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of a full per-class tensor (weight, momentum, ...), as a new tensor."""
    start, end = shard_range(full.shape[0], rank, world)
    return full[start:end].clone()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``x`` (rank r has ``sizes[r]`` rows); no autograd."""
    n_max = max(sizes)
    if x.shape[0] < n_max:
        x = torch.cat([x, x.new_zeros((n_max - x.shape[0],) + tuple(x.shape[1:]))])
    bufs = [torch.empty_like(x) for _ in sizes]
    collectives.all_gather(bufs, x.contiguous())
    return torch.cat([b[:n] for b, n in zip(bufs, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather rows; backward = SUM over ranks of the gathered gradient, this rank's rows × scale."""

    @staticmethod
    def forward(ctx, x, sizes, rank, scale):
        ctx.sizes, ctx.rank, ctx.scale = sizes, rank, scale
        if len(sizes) == 1:
            return x.view_as(x)
        return _all_gather_rows(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        sizes, rank = ctx.sizes, ctx.rank
        grad = grad.contiguous()
        if len(sizes) > 1:
            grad = grad.clone()
            collectives.all_reduce(grad, "sum")
        offset = sum(sizes[:rank])
        g = grad[offset : offset + sizes[rank]]
        if ctx.scale != 1.0:
            g = g * ctx.scale
        return g, None, None, None


class _ShardedSoftmaxCE(torch.autograd.Function):
    """Mean softmax cross-entropy over the global batch, columns split across ranks.

    forward(logits (N, S) of this shard, target (N,) column of the positive here or −1,
    cosine (N, S) detached, for accuracy only, distributed flag) → (loss, accuracy).
    Every sample's positive is in exactly one shard, so the SUM-reduce of the per-shard target
    values yields each sample's positive logit.
    """

    @staticmethod
    def forward(ctx, logits, target, cosine, distributed):
        n = logits.shape[0]
        has = target >= 0  # rows whose positive is in this shard; gathered at a clamped column, never indexed by
        cols = target.clamp(min=0).unsqueeze(1)  # the mask (boolean indexing would sync with the host)
        maxes = torch.stack([logits.max(dim=1).values, cosine.max(dim=1).values])
        if distributed:
            collectives.all_reduce(maxes, "max")
        row_max, cos_max = maxes[0], maxes[1]
        probs = torch.exp(logits - row_max[:, None])
        sums = logits.new_zeros(3, n)
        sums[0] = probs.sum(dim=1)
        zero = logits.new_zeros(())
        sums[1] = torch.where(has, logits.gather(1, cols).squeeze(1) - row_max, zero)
        sums[2] = torch.where(has, cosine.gather(1, cols).squeeze(1).to(sums.dtype), zero)
        if distributed:
            collectives.all_reduce(sums, "sum")
        sum_exp, target_shifted, target_cos = sums[0], sums[1], sums[2]
        loss = (torch.log(sum_exp) - target_shifted).mean()
        accuracy = (target_cos >= cos_max).to(logits.dtype).mean()
        probs.div_(sum_exp[:, None])
        ctx.save_for_backward(probs, has, cols)
        ctx.n = n
        ctx.used = False
        ctx.mark_non_differentiable(accuracy)
        return loss, accuracy

    @staticmethod
    def backward(ctx, grad_loss, grad_acc):
        if ctx.used:
            raise RuntimeError("ShardedMarginClassifier: backward through the same step twice is not supported")
        ctx.used = True
        probs, has, cols = ctx.saved_tensors
        grad = probs  # reused in place: d mean_i CE_i / d z_ic = (p_ic − 1[c = y_i]) / N
        grad.scatter_add_(1, cols, -has.to(grad.dtype).unsqueeze(1))  # −1 at the positive; −0 adds nothing
        grad.mul_(grad_loss / ctx.n)
        return grad, None, None, None


class ShardedMarginClassifier(nn.Module):
    """Partial-FC margin softmax classifier; this rank holds ``weight`` = rows [class_start, class_start+num_local).

    ``forward(embeddings (N_local, D), labels (N_local,) global ids) -> loss`` (a scalar, the
    mean CE over the global batch, identical on every rank). Per-rank batch sizes may differ, unless
    ``uniform_batch`` promises they never do (the trainer's loaders yield full batches only): then no
    sizes are exchanged, which saves a device→host copy (a host sync) per step.
    ``last_accuracy`` holds the top-1 accuracy of the global batch under the plain cosine
    (no margin; at sample_rate < 1 among the sampled classes) and ``last_sampled_index`` the
    local row indices used in the last step.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: nn.Module,
        sample_rate: float = 1.0,
        rank: int | None = None,
        world_size: int | None = None,
        embedding_grad_scale: float = 1.0,
        uniform_batch: bool = False,
        logits: str = "fp32",
    ):
        super().__init__()
        r, w = _world()
        rank = r if rank is None else int(rank)
        world_size = w if world_size is None else int(world_size)
        if num_classes < world_size:
            raise ConfigError(f"classifier: num_classes ({num_classes}) must be >= the number of ranks ({world_size})")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"ShardedMarginClassifier: sample_rate must be in (0, 1], got {sample_rate}")
        if embedding_size < 1:
            raise ValueError(f"ShardedMarginClassifier: embedding_size must be >= 1, got {embedding_size}")
        if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"ShardedMarginClassifier: world_size={world_size} needs an initialised process group")
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.rank, self.world_size = rank, world_size
        self.margin = margin
        self.sample_rate = float(sample_rate)
        self.embedding_grad_scale = float(embedding_grad_scale)
        self.uniform_batch = bool(uniform_batch)
        if logits not in ("fp32", "bf16", "tf32"):
            raise ValueError(f"ShardedMarginClassifier: logits must be fp32, bf16 or tf32, got {logits!r}")
        self.logits_bf16 = logits == "bf16"  # tf32 is a CUDA backend switch (pipeline.train.configure_backends)
        self.class_start, end = shard_range(self.num_classes, rank, world_size)
        self.num_local = end - self.class_start
        self.num_sample = min(self.num_local, math.ceil(self.sample_rate * self.num_local))
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_local, self.embedding_size)))
        self.last_accuracy: torch.Tensor | None = None
        self.last_sampled_index: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, rank={self.rank}/"
            f"{self.world_size}, rows=[{self.class_start}, {self.class_start + self.num_local}), "
            f"sample_rate={self.sample_rate}"
        )

    # ------------------------------------------------------------------ forward
    def _sample(self, local: torch.Tensor, in_shard: torch.Tensor) -> torch.Tensor:
        """Sorted local row indices: every positive of this shard ∪ random negatives, ``k`` rows in all, where
        k = min(num_local, max(num_sample, global batch)) is known on the host: a batch never has more distinct
        positives than samples, so all of them always fit, and nothing here waits for the device (no unique,
        nonzero or boolean indexing: arcface_torch's PartialFC syncs on its ``torch.unique`` every step).
        Against arcface_torch's variable-size set, a shard with more positives than ``num_sample`` gets some
        negatives on top of them."""
        k = min(self.num_local, max(self.num_sample, local.shape[0]))
        hits = torch.zeros(self.num_local, device=self.weight.device)
        hits.index_add_(0, local.clamp(0, self.num_local - 1), in_shard.to(hits.dtype))
        score = torch.rand(self.num_local, device=self.weight.device)
        score = torch.where(hits > 0, 2.0, score)  # > any uniform draw: positives are always among the top k
        return torch.topk(score, k=k).indices.sort().values

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size or labels.shape != embeddings.shape[:1]:
            raise ValueError(
                f"ShardedMarginClassifier: expected embeddings (N, {self.embedding_size}) and labels (N,), "
                f"got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
            )
        labels = labels.to(device=embeddings.device, dtype=torch.long)
        if labels.is_cuda:  # checked on the device: no host sync in the hot loop
            torch._assert_async(
                ((labels >= 0) & (labels < self.num_classes)).all(),
                f"ShardedMarginClassifier: a label is outside [0, {self.num_classes})",
            )
        elif labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0].item()
            raise ValueError(f"ShardedMarginClassifier: label {bad} is outside [0, {self.num_classes})")
        distributed = self.world_size > 1
        if distributed:
            if self.uniform_batch:
                sizes = [embeddings.shape[0]] * self.world_size
            else:
                n = torch.tensor([embeddings.shape[0]], device=embeddings.device, dtype=torch.long)
                sizes = _all_gather_rows(n, [1] * self.world_size).tolist()
            all_labels = _all_gather_rows(labels, sizes)
        else:
            sizes = [embeddings.shape[0]]
            all_labels = labels
        all_emb = _AllGatherWithGrad.apply(embeddings, sizes, self.rank, self.embedding_grad_scale)

        local = all_labels - self.class_start
        in_shard = (local >= 0) & (local < self.num_local)
        if self.num_sample < self.num_local:
            index = self._sample(local, in_shard)
            weight = self.weight[index]  # gradient flows into the full parameter (index_put backward)
            target = torch.where(
                in_shard, torch.searchsorted(index, local.clamp(0, self.num_local - 1)), torch.full_like(local, -1)
            )
            self.last_sampled_index = index
        else:
            weight = self.weight
            target = torch.where(in_shard, local, torch.full_like(local, -1))
            self.last_sampled_index = None

        if self.logits_bf16:  # the matmul's inputs in bf16 (arcface_torch's autocast); the softmax below in fp32
            cosine = F.linear(F.normalize(all_emb.float()).bfloat16(), F.normalize(weight.float()).bfloat16())
        else:
            cosine = F.linear(F.normalize(all_emb.to(weight.dtype)), F.normalize(weight))
        if cosine.dtype in (torch.float16, torch.bfloat16):  # e.g. under autocast: softmax in fp32
            cosine = cosine.float()
        logits = self.margin(cosine, target)
        loss, acc = _ShardedSoftmaxCE.apply(logits, target, cosine.detach(), distributed)
        self.last_accuracy = acc
        return loss

    # ------------------------------------------------------------------ full-state helpers
    def gather_full(self, shard: torch.Tensor) -> torch.Tensor:
        """The full (num_classes, ...) tensor from every rank's row shard (weight, momentum ...), on every rank."""
        if shard.shape[0] != self.num_local:
            raise ValueError(f"gather_full: expected {self.num_local} rows on rank {self.rank}, got {shard.shape[0]}")
        if self.world_size == 1:
            return shard.detach().clone()
        sizes = [e - s for s, e in (shard_range(self.num_classes, r, self.world_size) for r in range(self.world_size))]
        return _all_gather_rows(shard.detach(), sizes)

    def load_full_(self, full: torch.Tensor) -> None:
        """Copy this rank's rows of a full (num_classes, D) weight into ``weight`` (any saved world size)."""
        if tuple(full.shape) != (self.num_classes, self.embedding_size):
            raise ValueError(
                f"classifier weight: expected shape ({self.num_classes}, {self.embedding_size}), "
                f"got {tuple(full.shape)}"
            )
        with torch.no_grad():
            self.weight.copy_(take_shard(full, self.rank, self.world_size))

    def full_state_dict(self, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """The classifier's state, world-size independent (a collective: call on every rank): ``weight``, the full
        (num_classes, D) matrix; with ``optimizer`` also ``moments``, its per-class state of the weight (SGD's
        ``momentum_buffer``, Adam's ``exp_avg``/``exp_avg_sq``) gathered by name, and ``step`` (Adam's count)."""
        state: dict = {"weight": self.gather_full(self.weight)}
        if optimizer is None:
            return state
        opt_state = optimizer.state.get(self.weight, {})
        unknown = sorted(k for k, v in opt_state.items() if torch.is_tensor(v) and k not in ROW_STATE and k != "step")
        if unknown:  # a new optimizer's per-class state must be named here, or a resume would silently drop it
            raise ValueError(f"classifier optimizer state: unknown keys {unknown} (known: {list(ROW_STATE)})")
        state["moments"] = {k: self.gather_full(opt_state[k]) for k in ROW_STATE if torch.is_tensor(opt_state.get(k))}
        state["step"] = float(opt_state["step"]) if "step" in opt_state else 0.0
        return state

    def load_full_state_dict(self, state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Take this rank's rows of a :meth:`full_state_dict` (saved at any world size); with ``optimizer`` its
        moments too (``step`` restored for optimizers that count steps, e.g. AdamW)."""
        extra = sorted(set(state) - {"weight", "moments", "step"})
        if "weight" not in state or extra:
            raise ValueError(f"classifier state: expected 'weight' (and 'moments', 'step'), got {sorted(state)}")
        self.load_full_(state["weight"])
        if optimizer is None or not state.get("moments"):
            return
        unknown = sorted(set(state["moments"]) - set(ROW_STATE))
        if unknown:
            raise ValueError(f"classifier state: unknown moments {unknown} (known: {list(ROW_STATE)})")
        dev = self.weight.device
        restored = {k: take_shard(v, self.rank, self.world_size).to(dev) for k, v in state["moments"].items()}
        if "exp_avg" in restored:  # Adam's bias correction needs its step count
            restored["step"] = torch.tensor(state.get("step", 0.0), dtype=torch.float32)
        optimizer.state[self.weight] = restored


CLASSIFIER_FILE = "classifier.pt"


class ClassifierState:
    """The classifier as a checkpoint part (:class:`pipeline.checkpoint.manager.Stateful`): ``classifier.pt`` holds
    its :meth:`~ShardedMarginClassifier.full_state_dict` with ``optimizer``'s moments, so any world size re-shards it
    exactly."""

    def __init__(self, classifier: ShardedMarginClassifier, optimizer: torch.optim.Optimizer):
        self.classifier, self.optimizer = classifier, optimizer

    def save(self, folder, main: bool) -> None:
        state = self.classifier.full_state_dict(self.optimizer)  # every rank: a gather
        if main:
            torch.save(
                {
                    "weight": state["weight"].cpu(),
                    "moments": {k: v.cpu() for k, v in state["moments"].items()},
                    "step": state["step"],
                },
                folder / CLASSIFIER_FILE,
            )

    def _read(self, folder) -> dict:
        # memory-mapped: check() looks at the weight's shape only, load() reads the rows; a classifier of millions of
        # classes (and its moments) is not read from disk twice on a resume
        return torch.load(folder / CLASSIFIER_FILE, map_location="cpu", weights_only=True, mmap=True)

    def check(self, folder, meta: dict) -> None:
        rows = self._read(folder)["weight"].shape[0]
        if rows != self.classifier.num_classes:
            raise ConfigError(
                f"--resume: checkpoint {folder} has {rows} classes, data.train has {self.classifier.num_classes}"
            )

    def load(self, folder, meta: dict) -> None:
        self.classifier.load_full_state_dict(self._read(folder), self.optimizer)
