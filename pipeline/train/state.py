"""The trainer's own checkpoint parts (:class:`pipeline.checkpoint.manager.Stateful`): the run's counters and
resume checks, and the network's checkpoint figures. The engine's and the classifier's parts live with them
(:class:`pipeline.train.engine.EngineState`, :class:`pipeline.losses.sharded_classifier.ClassifierState`)."""

from __future__ import annotations

from pathlib import Path

from pipeline import checkpoint as ckpt
from pipeline import distributed, resume_changes
from pipeline.checkpoint.manager import TRAINER_META
from pipeline.config import ConfigError, dump_config, to_dict


class RunState:
    """The run's counters as a checkpoint part (:class:`pipeline.checkpoint.manager.Stateful`): ``config.yaml`` and
    ``trainer.json`` — the step, world size, schedule length and what a step means in data (global batch, dataset
    size). The loader's position is a function of them: a resumed run starts its loader at micro batch
    ``step × grad_accum`` of the epoch's seeded order (:meth:`Trainer.fit`). ``check`` refuses a checkpoint this run
    cannot continue (another recipe or network, global batch or dataset; a config change pipeline.resume_changes
    refuses)."""

    def __init__(self, trainer):  # a pipeline.train.trainer.Trainer (not imported: it imports this module)
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

    def __init__(self, trainer):  # a pipeline.train.trainer.Trainer (not imported: it imports this module)
        self.trainer = trainer

    def save(self, folder: Path, main: bool) -> None:
        if main:
            faces = self.trainer.validator.probe_faces()
            self.trainer.model.on_checkpoint(folder, self.trainer.step, None if faces is None else faces[:8])

    def check(self, folder: Path, meta: dict) -> None:
        pass

    def load(self, folder: Path, meta: dict) -> None:
        pass
