"""The one training loop for every recipe.

    python -m pipeline.train --config configs/scan_r101_ms1mv2.yaml [--config configs/smoke.yaml] [key=value ...]
    torchrun --nproc_per_node 8 -m pipeline.train --config ...      # one node
    sbatch jobs/scan_r101.sh [--config ...] [key=value ...]         # Slurm (srun)

Data-parallel backbone under DeepSpeed; model-parallel class centres in a
:class:`ShardedMarginClassifier` that stays outside DeepSpeed (its rows differ per rank, so
its gradients must never be averaged) with its own optimizer. The recipe (training procedure) is
looked up in the registry; it holds the FaceNetwork built from ``model:`` and hands back its loss
terms and monitoring values (the network's own, e.g. SCAN's RMO, included). This loop only sums and
logs: it knows no recipe, trunk, conv kind, insert or head by name.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from data_prep.manifest import DataError, read_manifest
from pipeline import checkpoint as ckpt
from pipeline import collectives, distributed, registry, resume_changes, schedule
from pipeline.checkpoint.manager import TRAINER_META, CheckpointManager, CheckpointWriteError
from pipeline.config import Config, ConfigError, dump_config, load_config, to_dict
from pipeline.engine import Engine, EngineState, announce_op_build, report_op_build
from pipeline.grad_probe import TermGradients
from pipeline.progress import hms
from pipeline.runlock import FolderLock, FolderLocked

# Exit codes of `python -m pipeline.train` (README "Reliability"): 0 the run reached its last step; 2 a
# configuration or data error (one line); 3 diverged (optim.max_nonfinite_steps); 4 stopped by a signal
# before its last step outside Slurm (a checkpoint was written; `train && eval` does not evaluate it).
EXIT_DIVERGED = 3
EXIT_STOPPED = 4
EXIT_CHECKPOINT = 5  # a checkpoint could not be written (disk full, quota, read-only, ...): the previous one is kept


def check_inputs(cfg: Config) -> None:
    """The files a run needs exist (the config's own validity is checked by the config types)."""
    if not cfg.data.train:
        raise ConfigError("data.train: not set (a WebDataset shard directory with manifest.json)")
    read_manifest(cfg.data.train)  # missing / empty shard directory → one-line DataError
    from data_prep.bin import read_bin

    for path in cfg.data.val:
        if not Path(path).is_file():
            raise ConfigError(f"data.val: verification file '{path}' does not exist")
        try:  # parsed now (safely: no code runs), not hours later at the first evaluation
            read_bin(path)
        except DataError as exc:
            raise DataError(f"data.val: {exc}") from None


MONITOR_FACES = 64  # fixed validation faces for the networks' validation monitors (the first 8: attention maps)


def make_optimizer(cfg: Config, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """SGD / AdamW with the multi-tensor (foreach) update on every device: a handful of launches per step, not a
    few per parameter (torch picks foreach by itself only for CUDA tensors; the CPU then runs the same path)."""
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, foreach=True)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, foreach=True)


def param_groups(model: torch.nn.Module, no_decay: set[str], weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if name in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def norm_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of every normalisation layer's parameters (BatchNorm*, GroupNorm, LayerNorm)."""
    norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
    return {
        f"{mod_name}.{p_name}" if mod_name else p_name
        for mod_name, mod in model.named_modules()
        if isinstance(mod, norms)
        for p_name, _ in mod.named_parameters(recurse=False)
    }


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


class RunState:
    """The run's counters as a checkpoint part (:class:`pipeline.checkpoint.manager.Stateful`): ``config.yaml`` and
    ``trainer.json`` — the step, world size, schedule length and what a step means in data (global batch, dataset
    size). The loader's position is a function of them: a resumed run starts its loader at micro batch
    ``step × grad_accum`` of the epoch's seeded order (:meth:`Trainer.fit`). ``check`` refuses a checkpoint this run
    cannot continue (another recipe or network, global batch or dataset; a config change pipeline.resume_changes
    refuses)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def save(self, folder: Path, main: bool) -> None:
        t = self.trainer
        if not main:
            return
        dump_config(t.cfg, folder / "config.yaml")
        ckpt.save_json(
            folder / TRAINER_META,
            {
                "step": t.step,
                "world_size": t.world,
                "steps_per_epoch": t.steps_per_epoch,
                "total_steps": t.total_steps,
                "recipe": t.cfg.recipe,
                "network": ckpt.describe(t.cfg.model),
                # what a saved step means in data: resume refuses a run where it would mean other samples
                "global_batch": t.global_batch,
                "num_images": t.loader.num_images,
                "num_classes": t.loader.num_classes,
            },
        )

    def check(self, folder: Path, meta: dict) -> None:
        t = self.trainer
        self._check_config_changes(folder)
        network = ckpt.describe(t.cfg.model)
        if (meta["recipe"], meta.get("network")) != (t.cfg.recipe, network):
            raise ConfigError(
                f"--resume: checkpoint {folder} is a {meta['recipe']} run of {meta.get('network')}, "
                f"this config is {t.cfg.recipe} of {network}"
            )
        saved_batch, world, gas = meta.get("global_batch", t.global_batch), t.world, t.gas
        if saved_batch != t.global_batch:
            raise ConfigError(
                f"--resume: {folder} was trained with a global batch of {saved_batch} (data.batch_size × world size × "
                f"deepspeed.grad_accum), this run has {t.global_batch}: its step {meta['step']} would mean other "
                f"samples and another schedule. Resume with data.batch_size="
                f"{saved_batch // (world * gas)} on {world} process(es)"
                if saved_batch % (world * gas) == 0
                else f"--resume: {folder} was trained with a global batch of {saved_batch}, which {world} "
                f"process(es) × deepspeed.grad_accum={gas} cannot reproduce (data.batch_size)"
            )
        images, classes = t.loader.num_images, t.loader.num_classes
        if meta.get("num_images", images) != images or meta.get("num_classes", classes) != classes:
            raise ConfigError(
                f"--resume: {folder} was trained on {meta['num_images']} images of {meta['num_classes']} classes, "
                f"data.train has {images} of {classes}: not the same dataset"
            )

    def _check_config_changes(self, folder: Path) -> None:
        """Refuse a change the checkpoint's run cannot honour (pipeline.resume_changes); print and record the rest."""
        import json

        import yaml

        t = self.trainer
        saved_path = folder / "config.yaml"
        if not saved_path.is_file():
            return  # a checkpoint of an older release: the checks above still apply
        saved = yaml.safe_load(saved_path.read_text()) or {}
        accepted, refused = resume_changes.compare(saved, to_dict(t.cfg), t.resume_changes)
        if refused:
            raise ConfigError(resume_changes.refusal(str(folder), refused))
        if accepted and distributed.is_main():
            for key, (was, now) in accepted.items():
                print(f"[train] --resume: {key} changed from {was!r} to {now!r}", flush=True)
            t.out.mkdir(parents=True, exist_ok=True)
            record = {"checkpoint": str(folder), "changes": {k: list(v) for k, v in accepted.items()}}
            with open(t.out / "resume_changes.jsonl", "a") as f:
                f.write(json.dumps(record, default=str) + "\n")

    def load(self, folder: Path, meta: dict) -> None:
        self.trainer.step = int(meta["step"])


class NetworkFigures:
    """The network's own checkpoint extras (attention maps of fixed faces, :meth:`RecipeModel.on_checkpoint`) as a
    checkpoint part; nothing to restore."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def save(self, folder: Path, main: bool) -> None:
        if main:
            faces = self.trainer._probe_faces()
            self.trainer.model.on_checkpoint(folder, self.trainer.step, None if faces is None else faces[:8])

    def check(self, folder: Path, meta: dict) -> None:
        pass

    def load(self, folder: Path, meta: dict) -> None:
        pass


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None, resume_changes: list[str] = ()):
        build_started = announce_op_build()
        from pipeline.data.loader import build_train_loader
        from pipeline.losses.margin import CombinedMargin
        from pipeline.losses.sharded_classifier import ClassifierState, ShardedMarginClassifier

        self.cfg = cfg
        self.resume_changes = list(resume_changes)  # config keys a --resume may change although they break the run
        self.info = distributed.init(cfg.device, timeout_s=cfg.collective_timeout_s)
        collectives.start_watchdog(cfg.collective_warn_s)
        self.rank, self.world = self.info.rank, self.info.world_size
        self.device = self.info.device
        configure_backends(cfg, self.device)
        self.out = Path(cfg.output.dir)
        self.ckpt_root = self.out / "checkpoints"
        torch.manual_seed(cfg.seed)  # identical initial backbone on every rank

        self.loader = build_train_loader(
            cfg.data, self.rank, self.world, cfg.seed, cfg.model.input_size, device=self.device
        )
        if distributed.is_main():
            print(
                f"[train] device {self.device} ({self.info.backend}); loader {self.loader.engine}: {self.loader.why}",
                flush=True,
            )
        self.gas = cfg.deepspeed.grad_accum
        self.steps_per_epoch = max(1, self.loader.steps_per_epoch // self.gas)  # optimizer steps
        self.global_batch = cfg.data.batch_size * self.world * self.gas  # samples per optimizer step
        self.total_steps = schedule.total_steps(cfg.schedule, self.steps_per_epoch)
        self.base_lr = scaled_lr(cfg.optim, self.global_batch)  # optim.lr, or linearly scaled (optim.scale_lr)
        if self.base_lr != cfg.optim.lr and distributed.is_main():
            print(
                f"[train] optim.scale_lr: lr {cfg.optim.lr:g} is stated for a global batch of "
                f"{cfg.optim.reference_batch}; this run's is {self.global_batch}: lr {self.base_lr:g}",
                flush=True,
            )

        self.model = registry.build_recipe(cfg)
        compiled = self.model.net.compile_regions(cfg.model.compile)  # in place: parameter names are unchanged
        if compiled and distributed.is_main():
            print(
                f"[train] model.compile: {cfg.model.compile} ({compiled} module(s), compiled at the first step)",
                flush=True,
            )
        margin = CombinedMargin(cfg.margin.s, cfg.margin.m1, cfg.margin.m2, cfg.margin.m3)
        torch.manual_seed(cfg.seed + 1)  # the classifier shard init is per rank but reproducible
        self.classifier = ShardedMarginClassifier(
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

        no_decay = self.model.no_weight_decay()
        if not cfg.optim.norm_weight_decay:
            no_decay |= norm_parameter_names(self.model)
        groups = param_groups(self.model, no_decay, cfg.optim.weight_decay)
        optimizer = make_optimizer(cfg, groups, cfg.optim.lr)
        self.engine = Engine(cfg, self.model, optimizer, self.world)
        self.dtype = self.engine.param_dtype  # of parameters, buffers and input batches (fp32 under autocast)
        report_op_build(build_started)
        self.cls_optimizer = make_optimizer(
            cfg,
            [{"params": list(self.classifier.parameters()), "weight_decay": cfg.optim.weight_decay}],
            cfg.optim.lr * cfg.classifier.lr_scale,
        )

        self._run_lock: FolderLock | None = None  # rank 0's lock on output.dir, held until the process ends
        self._claim_output_dir(resume)
        self.step = 0  # optimizer steps done
        self.preempted = False
        self.skipped_steps = 0  # optimizer steps skipped on fp16 overflow (logged as train/skipped_steps)
        # monitor name → (floor, why): the network's parts' signs of a collapse, warned about once each
        self._monitor_floors = self.model.net.monitor_floors()
        self._warned_floors: set[str] = set()
        self.lr = self.base_lr  # the backbone's learning rate at the last train_step (the schedule's)
        self.nonfinite_steps = 0  # optimizer steps skipped for a non-finite loss (train/nonfinite_steps)
        self._consecutive_bad = 0
        self._window_bad = False  # a micro step of the current accumulation window was non-finite
        self._backward_scale = 1.0  # the fp16 loss scale of the last backward
        self._buffers = [b for b in self.model.buffers()]
        self._float_buffers = [b for b in self._buffers if b.is_floating_point()]
        self._buffers_before = [b.detach().clone() for b in self._buffers]
        self.writer = None
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
        if resume:
            self._resume(resume)
        if distributed.is_main():
            from torch.utils.tensorboard import SummaryWriter

            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step + 1 if self.step else None)

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
        self._started, self._start_step = tick, self.step
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
                if self._should_stop():  # preempted (SIGUSR1/SIGTERM): checkpoint, requeue, leave
                    _close(batches)
                    last_ckpt = self.save()
                    self._requeue()
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
        if micro % self.gas == 0 and self._buffers:  # the BatchNorm statistics as the window starts, for a skip
            torch._foreach_copy_(self._buffers_before, self._buffers)  # one fused copy into kept storage
        if not hasattr(self, "_first_batch_faces") and distributed.is_main():  # fallback faces when no data.val
            self._first_batch_faces = batch["image"][:MONITOR_FACES].detach().clone()
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
        # NaN/inf guard: every rank learns whether any rank's loss is non-finite (one device→host read per
        # micro step, the price of never applying a poisoned update); such a step is skipped whole.
        if self._nonfinite_anywhere(total):
            self._window_bad = True
        boundary = self.engine.is_boundary()
        if not self._window_bad:
            self._backward_scale = self._loss_scale()  # the scale this backward uses (step() may change it)
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
            if self._window_bad:
                self._skip_step("non-finite loss or BatchNorm statistics", terms)
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

    def _nonfinite_anywhere(self, total: torch.Tensor) -> bool:
        """The loss, or a BatchNorm statistic this forward updated, is NaN/inf on some rank."""
        bad = ~torch.isfinite(total.detach())
        if self._float_buffers:  # one fused norm over every buffer: inf/NaN anywhere makes it non-finite
            norms = torch.stack(torch._foreach_norm(self._float_buffers))
            bad = bad | ~torch.isfinite(norms.float()).all()
        flag = bad.to(torch.float32).reshape(1)
        if self.world > 1:
            collectives.all_reduce(flag, "max")
        return bool(flag.item() > 0)

    def _skip_step(self, why: str, terms: dict) -> None:
        """Drop this optimizer step's gradients (backbone and classifier); count it; stop after too many."""
        self._window_bad = False
        if self._buffers:  # a skipped step leaves no trace: the forward's BatchNorm statistics too
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._buffers_before)
        self.engine.zero_grad()
        self.cls_optimizer.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        self._consecutive_bad += 1
        self._note_bad_step(why, {k: float(v.detach()) for k, v in terms.items()})

    def _note_bad_step(self, why: str, values: dict) -> None:
        step = self.step + 1
        if distributed.is_main():
            shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
            print(
                f"[train] step {step}: {why} ({shown}): step skipped "
                f"({self._consecutive_bad} in a row, {self.nonfinite_steps + self.skipped_steps} in all)",
                flush=True,
            )
            if self.writer:
                self.writer.add_scalar("train/nonfinite_steps", self.nonfinite_steps, step)
        if self._consecutive_bad >= self.cfg.optim.max_nonfinite_steps:
            raise TrainingDiverged(
                f"training diverged: {self._consecutive_bad} consecutive skipped steps ({why}) at step {step} "
                f"(optim.max_nonfinite_steps={self.cfg.optim.max_nonfinite_steps}); last checkpoint kept: "
                f"{ckpt.latest_or_none(self.ckpt_root)}"
            )

    def _classifier_step(self) -> None:
        params = [p for p in self.classifier.parameters() if p.grad is not None]
        if self.cfg.deepspeed.precision == "fp16":
            # engine.backward multiplied the loss by the dynamic loss scale: undo it for the
            # classifier, and skip its step whenever DeepSpeed skipped the backbone's (overflow).
            scale = self._backward_scale
            for p in params:
                p.grad.div_(scale)
            if not self.engine.step_applied():
                self.skipped_steps += 1  # fp16 overflow: DeepSpeed skipped the backbone's step
                self.cls_optimizer.zero_grad(set_to_none=True)
                # Overflow skips while the dynamic scale is still coming down are how fp16 scaling works; only a
                # collapsed scale (at DeepSpeed's minimum, 1) that keeps overflowing counts toward divergence.
                if self._loss_scale() <= 1.0:
                    self._consecutive_bad += 1
                    if self._consecutive_bad >= self.cfg.optim.max_nonfinite_steps:
                        self._note_bad_step(f"fp16 gradient overflow at loss scale {self._loss_scale():g}", {})
                return
        self._consecutive_bad = 0
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        self._cls_grad_norm = torch.norm(torch.stack([p.grad.detach().norm() for p in params])) if params else None
        self.cls_optimizer.step()
        self.cls_optimizer.zero_grad(set_to_none=True)

    def _loss_scale(self) -> float:
        """DeepSpeed's current dynamic fp16 loss scale (1 outside fp16)."""
        return self.engine.loss_scale

    def _to_device(self, v):
        return batch_to_device(v, self.device, self.dtype)

    # ------------------------------------------------------------------ monitoring

    def _mean_over_ranks(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        names = sorted(values)
        # on the training device (NCCL under CUDA); a log step is the one place the loop syncs with the host
        vec = torch.stack([torch.as_tensor(values[n]).to(self.device, torch.float64).reshape(()) for n in names])
        if self.world > 1:
            collectives.all_reduce(vec)
            vec /= self.world
        return dict(zip(names, vec.tolist()))

    def _log(self, terms: dict, samples_per_s: float) -> None:
        scalars = {f"loss/{k}": v for k, v in terms.items()}
        monitors = {**self.model.parameter_monitors(), **self._scalars}
        scalars.update({f"monitor/{k}": torch.as_tensor(v).detach().float().mean() for k, v in monitors.items()})
        scalars.update(getattr(self, "_grad_probe", {}))
        self._grad_probe = {}
        cls_norm = getattr(self, "_cls_grad_norm", None)
        if cls_norm is not None:
            scalars["grad_norm/classifier_shard_sq"] = cls_norm.double() ** 2
        scalars["data/corrupt_samples"] = torch.tensor(float(self.loader.stats()["corrupt_samples"]))
        means = self._mean_over_ranks(scalars)
        means["data/corrupt_samples"] *= self.world  # the sum over ranks
        self._check_bad_fraction(means["data/corrupt_samples"])
        if "grad_norm/classifier_shard_sq" in means:  # sum of squares over shards = full norm²
            means["grad_norm/classifier"] = math.sqrt(means.pop("grad_norm/classifier_shard_sq") * self.world)
        if self.writer is None:
            return
        self._warn_below_floors(means)
        for k, v in means.items():
            self.writer.add_scalar(k, v, self.step)
        self.writer.add_scalar("lr", self.lr, self.step)
        self.writer.add_scalar("samples_per_s", samples_per_s, self.step)
        if self.cfg.deepspeed.precision == "fp16":
            self.writer.add_scalar("train/skipped_steps", self.skipped_steps, self.step)
            self.writer.add_scalar("train/loss_scale", self._loss_scale(), self.step)
        norm = self.engine.grad_norm()
        if norm is not None and math.isfinite(norm):
            self.writer.add_scalar("grad_norm/backbone", norm, self.step)
        self.writer.flush()
        elapsed = time.perf_counter() - self._started
        done = self.step - self._start_step
        eta = elapsed / done * (self.total_steps - self.step) if done else float("nan")
        print(
            f"[train] step {self.step}/{self.total_steps} epoch {self.step / self.steps_per_epoch:.2f} "
            f"loss {means['loss/total']:.4f} lr {self.lr:.4g} {samples_per_s:.1f} samples/s "
            f"elapsed {hms(elapsed)} eta {hms(eta)}",
            flush=True,
        )

    def _warn_below_floors(self, means: dict[str, float]) -> None:
        for line in floor_warnings(self._monitor_floors, means, self._warned_floors, self.step):
            print(line, flush=True)

    def _check_bad_fraction(self, corrupt: float) -> None:
        """Stop (every rank alike: the count is all-reduced) when too much of what was read was unusable."""
        used = (self.step - self._start_step) * self.global_batch
        frac = corrupt / max(1.0, used + corrupt)
        if corrupt and frac > self.cfg.data.max_bad_fraction:
            raise DataError(
                f"data.train: {int(corrupt)} of the {int(used + corrupt)} samples read so far were skipped as corrupt "
                f"({frac:.1%} > data.max_bad_fraction={self.cfg.data.max_bad_fraction}); the log names them "
                "(a manifest whose num_classes is too small, bad shards?)"
            )

    def _log_histograms(self) -> None:
        if self.writer is None:
            return
        for name, values in {**self.model.histograms(), **getattr(self, "_step_histograms", {})}.items():
            self.writer.add_histogram(f"hist/{name}", values.detach().float().cpu(), self.step)
        self.writer.flush()

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        results = {}
        if self.cfg.data.val and distributed.is_main():
            from pipeline.eval.verify import evaluate_bin, load_bin, to_model_input

            self.model.eval()

            def embed(images: torch.Tensor) -> torch.Tensor:
                # under the autocast engine the weights are fp32: evaluate in bf16 as training does
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.engine.autocast):
                    return self.model.embed(images.to(self.device, self.dtype)).float()

            for path in self.cfg.data.val:
                name = Path(path).stem
                try:
                    res = evaluate_bin(
                        embed,
                        path,
                        batch_size=self.cfg.data.batch_size,
                        device=str(self.device),
                        progress=f"[eval] step {self.step} {name}: embedding",
                    )
                except DataError as exc:  # rank 0 alone evaluates: report, never leave the others at the barrier
                    print(f"[eval] step {self.step} {name}: skipped: {exc}", flush=True)
                    continue
                results[name] = {k: v for k, v in res.items() if not k.startswith("roc_")}
                # the network's own per-sample values on this set (LGAF's γ_l, CQA's quality scores), if any
                images, _ = load_bin(path, self.cfg.model.input_size)
                values = self.model.net.sample_value_means(images, self.cfg.data.batch_size, to_model_input)
                results[name].update({f"mean_{k}": v for k, v in values.items()})
                if self.writer:
                    self.writer.add_scalar(f"val/{name}/accuracy", res["accuracy"], self.step)
                    for far, tar in res.get("tar_at_far", {}).items():  # over the set's pairs; None: too few impostors
                        if tar is not None:
                            self.writer.add_scalar(f"val/{name}/tar@far={far}", tar, self.step)
                    for k, v in values.items():
                        self.writer.add_scalar(f"val/{name}/{k}", v, self.step)
                print(f"[eval] step {self.step} {name}: accuracy {res['accuracy']:.4f} ± {res['std']:.4f}", flush=True)
            # what the network's modules measure on fixed clean faces (LCD's occlusion concentration, …; spec §8)
            faces = self._probe_faces()
            monitors = {} if faces is None else self.model.net.validation_monitors(faces)
            if self.writer:
                for k, v in monitors.items():
                    self.writer.add_scalar(f"monitor/{k}", v, self.step)
            self.model.train()
            if self.writer:
                self.writer.flush()
            record = {"step": self.step, "results": results}
            if monitors:
                record["monitors"] = monitors
            ckpt.save_json(self.out / "eval_latest.json", record)
        distributed.barrier()
        return results

    # ------------------------------------------------------------------ checkpoints

    def _weights_finite(self) -> bool:
        """Every parameter of the network and the classifier finite, on every rank (once per checkpoint)."""
        bad = torch.zeros(1, device=self.device)
        tensors = list(self.model.parameters()) + list(self.classifier.parameters())
        for p in tensors + [b for b in self._buffers if b.is_floating_point()]:
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

    def _probe_faces(self) -> torch.Tensor | None:
        """Up to MONITOR_FACES fixed faces (rank 0): the first image of each of the first pairs of the first
        ``data.val`` set, else the start of the first training batch. The attention-map figure draws the first 8;
        the networks' validation monitors (:meth:`FaceNetwork.validation_monitors`) read them all."""
        if getattr(self, "_faces", None) is None and self.cfg.data.val:
            from pipeline.eval.verify import load_bin, to_model_input

            try:
                images, _ = load_bin(self.cfg.data.val[0], self.cfg.model.input_size)
                self._faces = to_model_input(images[0 : 2 * MONITOR_FACES : 2])
            except DataError as exc:
                print(f"[train] attention maps: no faces from {self.cfg.data.val[0]}: {exc}", flush=True)
        faces = getattr(self, "_faces", None)
        if faces is None:
            faces = getattr(self, "_first_batch_faces", None)
        return None if faces is None else faces.to(self.device, self.dtype)

    def _resume(self, where: str) -> None:
        path = self.checkpoints.find(where)
        if path is None:
            if distributed.is_main():
                print(f"[train] --resume: nothing to resume in {self.ckpt_root}; starting fresh", flush=True)
            return
        self.checkpoints.load(path)
        if distributed.is_main():
            print(f"[train] resumed from {path} at step {self.step}", flush=True)

    # ------------------------------------------------------------------ preemption

    def _should_stop(self) -> bool:
        # A host-side value: a CPU tensor over gloo (served beside NCCL on CUDA runs), so this
        # per-step check never waits for the GPU stream.
        flag = torch.tensor([1.0 if _STOP_SIGNAL else 0.0])
        if self.world > 1:
            collectives.all_reduce(flag)  # every rank stops at the same step
        return bool(flag.item() > 0)

    def _requeue(self) -> None:
        self.preempted = True
        job = os.environ.get("SLURM_JOB_ID")
        if distributed.is_main():
            print(f"[train] stopped by signal at step {self.step}; checkpoint written", flush=True)
            if job and _STOP_SIGNAL == signal.SIGUSR1:
                proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"[train] scontrol requeue {job} failed: {proc.stderr.strip()}", file=sys.stderr, flush=True)


def input_memory_format(device: torch.device) -> torch.memory_format:
    """channels-last for image batches on CUDA (issue 21: NHWC convolutions without layout transposes; converting
    the input alone keeps every conv output of the trunk channels-last through the DeepSpeed engine, ×1.45 on an
    iresnet50 bare loop on the H100); NCHW on the CPU, where a channels-last backward aborted torch 2.13
    (scripts/repro/channels_last_cpu_abort.py)."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def batch_to_device(v, device: torch.device, dtype: torch.dtype):
    """One batch entry on the training device in the training dtype; image batches (4-d) in the device's memory
    format (:func:`input_memory_format`)."""
    if not torch.is_tensor(v):
        return v
    v = v.to(device, non_blocking=True)
    if v.is_floating_point():
        v = v.to(dtype)
        if v.dim() == 4:
            v = v.contiguous(memory_format=input_memory_format(device))
    return v


def scaled_lr(optim, global_batch: int) -> float:
    """``optim.lr``, or with ``optim.scale_lr`` the linear scaling rule: lr × global_batch / reference_batch."""
    if optim.scale_lr:
        return optim.lr * global_batch / optim.reference_batch
    return optim.lr


def resolve_precision(setting: str, device: torch.device) -> str:
    """``deepspeed.precision: auto`` → bf16 on a CUDA device that supports it, else fp32 (the CPU: DeepSpeed's
    bf16 optimizer there is slower than fp32 and CPU autocast gains nothing); an explicit setting is kept."""
    if setting != "auto":
        return setting
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def configure_backends(cfg: Config, device: torch.device) -> None:
    """The fast settings for ``device`` (issue 21): ``deepspeed.precision: auto`` resolved and written back into
    the config (so config.yaml and checkpoints name the precision used); on CUDA, cuDNN autotuning
    (``cudnn.benchmark``: fixed input shapes, as arcface_torch sets) and TF32 matmuls for ``classifier.logits:
    tf32``."""
    chosen = resolve_precision(cfg.deepspeed.precision, device)
    if chosen != cfg.deepspeed.precision and distributed.is_main():
        print(f"[train] deepspeed.precision: auto → {chosen} on {device.type}", flush=True)
    cfg.deepspeed.precision = chosen
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if cfg.classifier.logits == "tf32":
            torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls


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


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite / overflowing steps: the run stops, its last checkpoint kept (exit 3)."""


_STOP_SIGNAL: int | None = None


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def install_signal_handlers() -> None:
    """SIGUSR1 (Slurm's --signal before the time limit), SIGTERM (scancel, torchrun's teardown, a process-group
    kill) or SIGINT (Ctrl-C): finish the step, checkpoint, requeue under Slurm. Installed first thing in main()
    so a signal during start-up is not fatal. DataLoader workers ignore these signals
    (pipeline.data.torch_loader), so a signal to the whole process group cannot kill them under the trainer."""

    def handler(signum, _frame):
        global _STOP_SIGNAL
        if signum == signal.SIGINT and _STOP_SIGNAL is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: leave now, without the checkpoint
        _STOP_SIGNAL = signum
        if signum == signal.SIGINT:
            print("[train] SIGINT: finishing this step and writing a checkpoint (Ctrl-C again to abort)", flush=True)

    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. some launchers)
            pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Train any recipe. Example: python -m pipeline.train --config configs/arcface_r50.yaml "
        "--config configs/smoke.yaml data.train=shards/lfw output.dir=runs/try",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", action="append", default=[], metavar="YAML", help="config layer; repeat to stack (later layers win)"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CKPT",
        help="resume from CKPT, or from output.dir's latest checkpoint when no path is given",
    )
    parser.add_argument(
        "--resume-changes",
        nargs="+",
        default=[],
        metavar="KEY",
        help="with --resume: accept these changes that break the checkpoint's run (e.g. seed, optim.name); "
        "without it such a change is refused, naming the key; other changes (lr, schedule, eval sets) are accepted "
        "and printed",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=0.05 data.batch_size=64")
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("at least one --config is required")
    # `--resume-changes seed seed=5`: what has a '=' is an override, not a key
    args.overrides = [k for k in args.resume_changes if "=" in k] + args.overrides
    args.resume_changes = [k for k in args.resume_changes if "=" not in k]
    if args.resume_changes and args.resume is None:
        parser.error("--resume-changes only means something with --resume")
    return args


def main(argv: list[str] | None = None) -> int:
    """Train; return the exit code. Every failure ends in one ``error: …`` line on stderr (an unexpected one after
    its traceback) and a non-zero code; see :func:`exit_now` for how the process then ends without hanging."""
    install_signal_handlers()
    args = parse_args(argv)
    resume = args.resume
    if resume is None and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        resume = "latest"  # requeued by Slurm after preemption: continue where it stopped
    try:
        cfg = load_config(args.config, args.overrides)
        check_inputs(cfg)
        trainer = Trainer(cfg, resume=resume, resume_changes=args.resume_changes)
        trainer.fit()
        if trainer.preempted and not os.environ.get("SLURM_JOB_ID"):
            # stopped before its last step: a checkpoint is written, but `train && eval` must not go on
            print(f"[train] exit {EXIT_STOPPED}: stopped before the last step; continue with --resume", flush=True)
            distributed.cleanup()
            return EXIT_STOPPED
    except (ConfigError, DataError, FolderLocked) as exc:
        return _fail(str(exc), 2)
    except TrainingDiverged as exc:
        return _fail(str(exc), EXIT_DIVERGED)
    except CheckpointWriteError as exc:
        return _fail(str(exc), EXIT_CHECKPOINT)
    except KeyboardInterrupt:
        return _fail("interrupted (a second Ctrl-C): no checkpoint written for the current step", 130)
    except Exception as exc:  # a bug or an environment failure: its traceback, then the one line
        import traceback

        traceback.print_exc()
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _fail(f"{type(exc).__name__}: {cause}" if cause else type(exc).__name__, 1)
    distributed.cleanup()
    return 0


def _fail(message: str, code: int) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    where = f"rank {os.environ.get('RANK', '?')}: " if world > 1 else ""
    print(f"error: {where}{message}", file=sys.stderr, flush=True)
    return code


def kill_workers() -> None:
    """Kill this process's multiprocessing children (DataLoader workers, which ignore SIGTERM by design): after an
    error nothing else would end them, and Python's exit handler joins them forever."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()


def exit_now(code: int) -> None:
    """End the process with ``code``. On an error, without Python's exit handlers: they join DataLoader workers
    (which ignore SIGTERM by design) forever and may wait on a dead peer's collective. The workers are killed
    first; torchrun / srun --kill-on-bad-exit then end the run's other ranks."""
    if code in (0, EXIT_STOPPED):
        sys.exit(code)
    kill_workers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
