"""The one training loop for every recipe (``python -m pipeline.train``: :mod:`pipeline.train.cli`).

Data-parallel backbone under DeepSpeed (:mod:`pipeline.train.engine`); model-parallel class centres in a
:class:`ShardedMarginClassifier` that stays outside DeepSpeed (its rows differ per rank, so its gradients must never
be averaged) with its own optimizer. The recipe (training procedure) is looked up in the registry; it holds the
FaceNetwork built from ``model:`` and hands back its loss terms and monitoring values (the network's own, e.g.
SCAN's RMO, included). This loop only sums and logs: it knows no recipe, trunk, conv kind, insert or head by name.
Its parts: the step guard (:mod:`.guard`), metrics (:mod:`.metrics`), in-training evaluation (:mod:`.validate`),
preemption (:mod:`.preempt`) and the checkpoint parts (:mod:`.state`) under the checkpoint manager.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline import checkpoint as ckpt
from pipeline import collectives, distributed, registry, schedule
from pipeline.checkpoint.manager import CheckpointManager
from pipeline.config import Config, ConfigError, dump_config
from pipeline.grad_probe import TermGradients
from pipeline.losses.sharded_classifier import ClassifierState
from pipeline.runlock import FolderLock, FolderLocked
from pipeline.train import preempt
from pipeline.train.build import (
    batch_to_device,
    configure_backends,
    make_optimizer,
    norm_parameter_names,
    param_groups,
    scaled_lr,
)
from pipeline.train.engine import Engine, EngineState, announce_op_build, report_op_build
from pipeline.train.guard import StepGuard, TrainingDiverged
from pipeline.train.metrics import CLASSIFIER_SHARD_SQ, CORRUPT, TrainMetrics
from pipeline.train.state import NetworkFigures, RunState
from pipeline.train.validate import Validator


def _close(batches) -> None:
    """Close an epoch's batch iterator, so that its DataLoader workers exit now. Left to interpreter exit, a
    worker that ignores SIGTERM (they must: a signal to the process group is the trainer's to handle) makes
    multiprocessing's exit handler wait for it forever."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()
    shutdown = getattr(batches, "_shutdown_workers", None)  # a bare DataLoader iterator
    if shutdown is not None:
        shutdown()


class Trainer:
    """A run: built from a config (the loader, the recipe and its network, the sharded classifier, the engine, the
    checkpoint manager), trained by :meth:`fit`, one micro step at a time by :meth:`train_step`."""

    def __init__(self, cfg: Config, resume: str | None = None, resume_changes: list[str] = ()):
        build_started = announce_op_build()
        self.cfg = cfg
        self.resume_changes = list(resume_changes)  # config keys a --resume may change although they break the run
        self.info = distributed.init(cfg.device, timeout_s=cfg.collective_timeout_s)
        collectives.start_watchdog(cfg.collective_warn_s)
        self.rank, self.world, self.device = self.info.rank, self.info.world_size, self.info.device
        configure_backends(cfg, self.device)
        self.out = Path(cfg.output.dir)
        self.ckpt_root = self.out / "checkpoints"
        torch.manual_seed(cfg.seed)  # identical initial backbone on every rank
        self.loader = self._build_loader()
        self.gas = cfg.deepspeed.grad_accum
        self.steps_per_epoch = max(1, self.loader.steps_per_epoch // self.gas)  # optimizer steps
        self.global_batch = cfg.data.batch_size * self.world * self.gas  # samples per optimizer step
        self.total_steps = schedule.total_steps(cfg.schedule, self.steps_per_epoch)
        self.base_lr = self._base_lr()
        self.model = self._build_model()
        self.classifier = self._build_classifier()
        self.engine, self.cls_optimizer = self._build_optimizers()
        self.dtype = self.engine.param_dtype  # of parameters, buffers and input batches (fp32 under autocast)
        report_op_build(build_started)

        self._run_lock: FolderLock | None = None  # rank 0's lock on output.dir, held until the process ends
        self._claim_output_dir(resume)
        self.step = 0  # optimizer steps done
        self.lr = self.base_lr  # the backbone's learning rate at the last train_step (the schedule's)
        self.preempted = False
        self._backward_scale = 1.0  # the fp16 loss scale of the last backward
        # what the last step measured, for the next log step (every rank)
        self._scalars: dict = {}
        self._step_histograms: dict = {}
        self._grad_probe: dict = {}
        self._cls_grad_norm: torch.Tensor | None = None
        self.guard = StepGuard(self.model, self.world, cfg.optim.max_nonfinite_steps, self.ckpt_root)
        self.validator = Validator(cfg, self.model, self.device, self.dtype, self.engine.autocast, self.out)
        floors = self.model.net.monitor_floors()  # monitor → (floor, why): the parts' signs of a collapse
        self.metrics = TrainMetrics(cfg, self.world, self.device, floors, self.global_batch, self.steps_per_epoch)
        self.checkpoints = CheckpointManager(
            self.ckpt_root,
            [
                RunState(self),
                EngineState(self.engine, self.world, self.device, ckpt.describe(cfg.model)),
                ClassifierState(self.classifier, self.cls_optimizer),
                NetworkFigures(self),
            ],
            keep=cfg.output.keep_checkpoints,
            main=distributed.is_main(),
            barrier=distributed.barrier,
            passthrough=(TrainingDiverged,),
        )
        self.writer = None
        if resume:
            self._resume(resume)
        if distributed.is_main():
            self._open_writer()

    @property
    def nonfinite_steps(self) -> int:
        """Optimizer steps skipped for a non-finite loss or BatchNorm statistic (train/nonfinite_steps)."""
        return self.guard.nonfinite_steps

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps DeepSpeed skipped on fp16 overflow (train/skipped_steps)."""
        return self.guard.skipped_steps

    # ------------------------------------------------------------------ build

    def _build_loader(self):
        from pipeline.data.loader import build_train_loader

        cfg = self.cfg
        loader = build_train_loader(cfg.data, self.rank, self.world, cfg.seed, cfg.model.input_size, device=self.device)
        if distributed.is_main():
            print(
                f"[train] device {self.device} ({self.info.backend}); loader {loader.engine}: {loader.why}", flush=True
            )
        return loader

    def _base_lr(self) -> float:
        """optim.lr, or linearly scaled to this run's global batch (optim.scale_lr)."""
        cfg = self.cfg
        lr = scaled_lr(cfg.optim, self.global_batch)
        if lr != cfg.optim.lr and distributed.is_main():
            print(
                f"[train] optim.scale_lr: lr {cfg.optim.lr:g} is stated for a global batch of "
                f"{cfg.optim.reference_batch}; this run's is {self.global_batch}: lr {lr:g}",
                flush=True,
            )
        return lr

    def _build_model(self):
        cfg = self.cfg
        model = registry.build_recipe(cfg)
        compiled = model.net.compile_regions(cfg.model.compile)  # in place: parameter names are unchanged
        if compiled and distributed.is_main():
            print(
                f"[train] model.compile: {cfg.model.compile} ({compiled} module(s), compiled at the first step)",
                flush=True,
            )
        return model

    def _build_classifier(self):
        from pipeline.losses.margin import CombinedMargin
        from pipeline.losses.sharded_classifier import ShardedMarginClassifier

        cfg = self.cfg
        margin = CombinedMargin(cfg.margin.s, cfg.margin.m1, cfg.margin.m2, cfg.margin.m3)
        torch.manual_seed(cfg.seed + 1)  # the classifier shard init is per rank but reproducible
        return ShardedMarginClassifier(
            self.loader.num_classes,
            self.model.embedding_size,
            margin,
            sample_rate=cfg.classifier.sample_rate,
            rank=self.rank,
            world_size=self.world,
            # DeepSpeed averages backbone gradients over ranks; the all-gathered softmax already
            # sums each sample's gradient from all shards, so scale back up (as arcface_torch does).
            embedding_grad_scale=float(self.world),
            uniform_batch=True,  # every rank's loader yields full batches of data.batch_size
            logits=cfg.classifier.logits,
        ).to(self.device)

    def _build_optimizers(self):
        """The backbone's engine (DeepSpeed around its optimizer) and the classifier's own optimizer."""
        cfg = self.cfg
        no_decay = self.model.no_weight_decay()
        if not cfg.optim.norm_weight_decay:
            no_decay |= norm_parameter_names(self.model)
        groups = param_groups(self.model, no_decay, cfg.optim.weight_decay)
        engine = Engine(cfg, self.model, make_optimizer(cfg, groups, cfg.optim.lr), self.world)
        cls_optimizer = make_optimizer(
            cfg,
            [{"params": list(self.classifier.parameters()), "weight_decay": cfg.optim.weight_decay}],
            cfg.optim.lr * cfg.classifier.lr_scale,
        )
        return engine, cls_optimizer

    def _open_writer(self) -> None:
        """Rank 0: config.yaml and TensorBoard (from the resumed step on, later events of a killed run purged)."""
        from torch.utils.tensorboard import SummaryWriter

        self.out.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.out / "config.yaml")
        self.writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step + 1 if self.step else None)
        self.guard.writer = self.validator.writer = self.metrics.writer = self.writer

    def _claim_output_dir(self, resume: str | None) -> None:
        """A fresh run never writes into another run's output.dir (its pruning and `latest` would mix with
        that run's checkpoints): refuse, unless resuming or output.overwrite clears it first. Before looking,
        rank 0 takes the folder's lock (:mod:`pipeline.runlock`) for the run's life: two runs started at once into
        one folder cannot both pass the look; the second refuses naming the holder."""
        self._lock_output_dir()
        if resume is not None:
            return
        held = self._held_by_another_run()
        distributed.barrier()  # every rank has looked before rank 0 writes config.yaml / tb/
        if not held:
            return
        if not self.cfg.output.overwrite:
            raise ConfigError(
                f"output.dir: {self.out} already holds a run ({' and '.join(held)}): continue it with --resume, "
                "choose another output.dir, or start over with output.overwrite=true"
            )
        if distributed.is_main():
            import shutil

            for sub in ("checkpoints", "tb"):
                shutil.rmtree(self.out / sub, ignore_errors=True)
            print(f"[train] output.overwrite: cleared {self.out} ({' and '.join(held)})", flush=True)
        distributed.barrier()

    def _lock_output_dir(self) -> None:
        refused = ""
        if distributed.is_main():
            try:
                self._run_lock = FolderLock(self.out, "training run").acquire()
            except FolderLocked as exc:
                refused = f"output.dir: {exc}"
        flag = torch.tensor([1.0 if refused else 0.0], device=self.device)
        if self.world > 1:
            collectives.all_reduce(flag, "max")  # every rank stops, not only rank 0
        if flag.item() > 0:
            raise FolderLocked(refused or f"output.dir: {self.out} is held by another run (rank 0 names it)")

    def _held_by_another_run(self) -> list[str]:
        held = []
        if ckpt.checkpoints(self.ckpt_root) or (self.ckpt_root / ckpt.LATEST).exists():
            held.append("checkpoints")
        if (self.out / "tb").is_dir() and any((self.out / "tb").iterdir()):
            held.append("TensorBoard logs")
        return held

    # ------------------------------------------------------------------ schedule

    def _set_lr(self) -> float:
        factor = schedule.lr_factor(self.cfg.schedule, self.step / self.steps_per_epoch)
        lr = self.base_lr * factor
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr
        for g in self.cls_optimizer.param_groups:
            g["lr"] = lr * self.cfg.classifier.lr_scale
        return lr

    # ------------------------------------------------------------------ loop

    def fit(self) -> Path:
        cfg, out = self.cfg, self.cfg.output
        micro_per_epoch = self.steps_per_epoch * self.gas
        epoch, offset = divmod(self.step * self.gas, micro_per_epoch)
        last_ckpt = None
        tick, tick_step = time.perf_counter(), self.step
        self.metrics.start(self.step)
        if distributed.is_main():
            print(
                f"[train] recipe={cfg.recipe} network={ckpt.describe(cfg.model)} world={self.world} "
                f"classes={self.loader.num_classes} images={self.loader.num_images} "
                f"steps/epoch={self.steps_per_epoch} total_steps={self.total_steps} start_step={self.step}",
                flush=True,
            )
        while self.step < self.total_steps:
            self.loader.set_epoch(epoch)
            # resume mid-epoch: the same batches the interrupted run would have seen next
            batches = iter(self.loader.iter_from(offset) if offset else self.loader)
            for micro in range(offset, micro_per_epoch):
                batch = next(batches)
                terms = self.train_step(batch, micro)
                if (micro + 1) % self.gas:
                    continue
                collectives.publish_step(self.step)
                if self._log_due(self.step):
                    now = time.perf_counter()
                    rate = (self.step - tick_step) * self.gas * cfg.data.batch_size * self.world / max(now - tick, 1e-9)
                    self._log(terms, rate)
                    tick, tick_step = now, self.step
                if out.histogram_every and self.step % out.histogram_every == 0:
                    self._log_histograms()
                if preempt.stop_requested(self.world):  # preempted (SIGUSR1/SIGTERM): checkpoint, requeue, leave
                    _close(batches)
                    last_ckpt = self.save()
                    self.preempted = True
                    preempt.requeue(self.step)
                    return last_ckpt
                if self.step % out.checkpoint_every == 0 or self.step == self.total_steps:
                    last_ckpt = self.save()
                if (out.eval_every and self.step % out.eval_every == 0) or self.step == self.total_steps:
                    self.evaluate()
                if self.step >= self.total_steps:
                    break
            _close(batches)  # shut the epoch's loader workers down now, not at interpreter exit
            epoch, offset = epoch + 1, 0
        if self.writer:
            self.writer.close()
        stats = self.loader.stats()
        print(
            f"[train] rank {self.rank} data: {stats['corrupt_samples']} corrupt samples and "
            f"{stats['corrupt_shards']} corrupt shards skipped",
            flush=True,
        )
        if distributed.is_main():
            print(f"[train] done: checkpoint {last_ckpt}  tensorboard --logdir {self.out / 'tb'}", flush=True)
        return last_ckpt

    def train_step(self, batch: dict, micro: int = 0) -> dict[str, torch.Tensor]:
        """One micro step on ``batch`` (a loader's dict: ``image``, ``label``, …): forward, loss terms, the NaN guard,
        backward and, at the end of an accumulation window (``micro`` = its index in the epoch; every call with
        ``deepspeed.grad_accum: 1``), the optimizer steps and ``self.step += 1``. Returns the loss terms (detached);
        ``self.lr`` is the learning rate the step used. The public step: ``fit`` calls it, so do benchmarks and test workers."""
        # Per-step seed: partial-FC sampling and dropout are reproducible after --resume.
        torch.manual_seed((self.cfg.seed * 1_000_003 + self.step * self.gas + micro) * 1009 + self.rank)
        lr = self._set_lr()
        batch = {k: self._to_device(v) for k, v in batch.items()}
        if micro % self.gas == 0:
            self.guard.window_start()
        self.validator.remember_first_batch(batch["image"])  # the fixed faces when there is no data.val
        outputs = self.engine(batch)
        terms: dict[str, torch.Tensor] = {}
        total = 0.0
        for name, head in outputs.heads.items():
            loss = self.classifier(head.embeddings.float(), head.labels)
            terms[f"cls_{name}"] = loss
            total = total + head.weight * loss
        for name, loss in outputs.aux_losses.items():
            terms[name] = loss.float()
            total = total + loss.float()
        terms["total"] = total
        # NaN/inf guard: every rank learns whether any rank's loss is non-finite; such a step is skipped whole
        self.guard.check(total)
        boundary = self.engine.is_boundary()
        if not self.guard.window_bad:
            self._backward_scale = self.engine.loss_scale  # the scale this backward uses (step() may change it)
            if outputs.watched and (micro + 1) % self.gas == 0 and self._log_due(self.step + 1):
                # each loss term's gradient on the watched tensors (every rank: the keys are averaged at the log)
                with TermGradients(outputs.watched, outputs.aux_losses, total) as probe:
                    self.engine.backward(total)
                self._grad_probe = probe.result()
            else:
                self.engine.backward(total)
            self.engine.step()
        else:
            self.engine.skip_micro_step()
        if boundary:
            if self.guard.window_bad:
                self.guard.skip(self.step, "non-finite loss or BatchNorm statistics", terms, self._zero_grads)
            else:
                self._classifier_step()
        terms = {k: v.detach() for k, v in terms.items()}
        self.lr = lr
        self._scalars = outputs.scalars
        self._step_histograms = outputs.histograms
        if (micro + 1) % self.gas == 0:
            self.step += 1  # optimizer steps done
        return terms

    def _log_due(self, step: int) -> bool:
        return step % self.cfg.output.log_every == 0 or step == self.total_steps

    def _classifier_step(self) -> None:
        params = [p for p in self.classifier.parameters() if p.grad is not None]
        if self.cfg.deepspeed.precision == "fp16":
            # engine.backward multiplied the loss by the dynamic loss scale: undo it for the
            # classifier, and skip its step whenever DeepSpeed skipped the backbone's (overflow).
            scale = self._backward_scale
            for p in params:
                p.grad.div_(scale)
            if not self.engine.step_applied():  # fp16 overflow: DeepSpeed skipped the backbone's step
                self.cls_optimizer.zero_grad(set_to_none=True)
                self.guard.overflow(self.step, self.engine.loss_scale)
                return
        self.guard.good_step()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        self._cls_grad_norm = torch.norm(torch.stack([p.grad.detach().norm() for p in params])) if params else None
        self.cls_optimizer.step()
        self.cls_optimizer.zero_grad(set_to_none=True)

    def _zero_grads(self) -> None:
        self.engine.zero_grad()
        self.cls_optimizer.zero_grad(set_to_none=True)

    def _to_device(self, v):
        return batch_to_device(v, self.device, self.dtype)

    # ------------------------------------------------------------------ monitoring

    def _log(self, terms: dict, samples_per_s: float) -> None:
        """A log step (every rank): this step's loss terms, the network's monitors, per-term gradient probes and
        the classifier's gradient norm, averaged over ranks by :class:`TrainMetrics`."""
        scalars = {f"loss/{k}": v for k, v in terms.items()}
        monitors = {**self.model.parameter_monitors(), **self._scalars}
        scalars.update({f"monitor/{k}": torch.as_tensor(v).detach().float().mean() for k, v in monitors.items()})
        scalars.update(self._grad_probe)
        self._grad_probe = {}
        if self._cls_grad_norm is not None:
            scalars[CLASSIFIER_SHARD_SQ] = self._cls_grad_norm.double() ** 2
        scalars[CORRUPT] = torch.tensor(float(self.loader.stats()["corrupt_samples"]))
        self.metrics.log(
            self.step, self.total_steps, scalars, self._host_values() if self.writer else {}, samples_per_s
        )

    def _host_values(self) -> dict[str, float | None]:
        """What rank 0 writes as it is: the lr, fp16's skip count and loss scale, the backbone's gradient norm (a
        device→host read: the writing rank's alone, as before the metrics had a module)."""
        host = {"lr": self.lr}
        if self.cfg.deepspeed.precision == "fp16":
            host.update({"train/skipped_steps": self.skipped_steps, "train/loss_scale": self.engine.loss_scale})
        host["grad_norm/backbone"] = self.engine.grad_norm()
        return host

    def _log_histograms(self) -> None:
        self.metrics.histograms(self.step, {**self.model.histograms(), **self._step_histograms})

    def evaluate(self) -> dict:
        """Every ``data.val`` set at this step (:class:`Validator`; rank 0 evaluates, every rank calls)."""
        return self.validator.evaluate(self.step)

    # ------------------------------------------------------------------ checkpoints

    def _weights_finite(self) -> bool:
        """Every parameter of the network and the classifier finite, on every rank (once per checkpoint)."""
        bad = torch.zeros(1, device=self.device)
        tensors = list(self.model.parameters()) + list(self.classifier.parameters())
        for p in tensors + self.guard.float_buffers:
            bad += (~torch.isfinite(p.detach())).any().float()
        if self.world > 1:
            collectives.all_reduce(bad)
        return bool(bad.item() == 0)

    def save(self) -> Path:
        """Write a checkpoint (every rank takes part) through the checkpoint manager. A failed write (a full disk, a
        quota, a read-only file system, any error) removes the partial ``.tmp_*`` folder, keeps the previous
        checkpoint and raises :class:`CheckpointWriteError` naming the cause."""
        if not self._weights_finite():  # never write a poisoned model over good checkpoints
            raise TrainingDiverged(
                f"the weights are not finite at step {self.step}: no checkpoint written; last checkpoint kept: "
                f"{ckpt.latest_or_none(self.ckpt_root)}"
            )
        return self.checkpoints.save(self.step)

    def _resume(self, where: str) -> None:
        path = self.checkpoints.find(where)
        if path is None:
            if distributed.is_main():
                print(f"[train] --resume: nothing to resume in {self.ckpt_root}; starting fresh", flush=True)
            return
        self.checkpoints.load(path)
        if distributed.is_main():
            print(f"[train] resumed from {path} at step {self.step}", flush=True)
