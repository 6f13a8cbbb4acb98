"""The trainer's step logic in-process through the public ``Trainer.train_step`` (no subprocess): the gradient
accumulation boundary against plain autograd, the fp16 overflow skip, the non-finite skip and the learning-rate
schedule against an independent formula. Each test builds the real Trainer (DeepSpeed on one gloo rank) on a tiny
iresnet18 in this process's one gloo group (conftest's ``one_rank_group``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeline.config import load_config
from pipeline.train import Trainer, TrainingDiverged
from tests.helpers import REPO, restore_environ

BATCH = 8


@pytest.fixture
def make_trainer(tmp_path, lfw_shards, one_rank_group):
    built = []

    def make(*overrides: str) -> Trainer:
        cfg = load_config(
            [REPO / "configs" / "arcface_r50.yaml", REPO / "configs" / "smoke.yaml"],
            [
                "model.backbone=iresnet18",
                f"data.train={lfw_shards}",
                f"output.dir={tmp_path / f'run{len(built)}'}",
                f"data.batch_size={BATCH}",
                "optim.weight_decay=0",
                "optim.momentum=0",
                *overrides,
            ],
        )
        trainer = Trainer(cfg)
        built.append(trainer)
        return trainer

    with restore_environ():  # Trainer exports RANK, WORLD_SIZE, MASTER_PORT… (distributed.init)
        yield make
        for trainer in built:
            if trainer.writer:
                trainer.writer.close()


def batches(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.rand(BATCH, 3, 112, 112, generator=g) * 2 - 1, "label": torch.arange(BATCH) + i}
        for i in range(n)
    ]


def weights(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def buffers(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([b.detach().float().flatten().clone() for b in module.buffers() if b.is_floating_point()])


def test_accumulation_boundary_applies_the_mean_gradient_once(make_trainer):
    """grad_accum 2: nothing moves after the first micro step; after the second, the backbone and the classifier move
    by -lr × the mean of the two micro batches' gradients (computed here with plain autograd on copies)."""
    lr = 0.1
    trainer = make_trainer("deepspeed.grad_accum=2", f"optim.lr={lr}")
    # the reference: the same network and classifier, the same micro batches, the same per-step seeds
    ref_model, ref_cls = copy.deepcopy(trainer.model), copy.deepcopy(trainer.classifier)
    data = batches(2)
    w0, c0 = weights(trainer.model), weights(trainer.classifier)

    trainer.train_step(data[0], micro=0)
    assert trainer.step == 0
    assert torch.equal(weights(trainer.model), w0) and torch.equal(weights(trainer.classifier), c0)
    trainer.train_step(data[1], micro=1)
    assert trainer.step == 1

    params = list(ref_model.parameters()) + list(ref_cls.parameters())
    trained = [p for p in params if p.requires_grad]
    grads = {id(p): torch.zeros_like(p) for p in trained}
    for micro, batch in enumerate(data):
        torch.manual_seed((trainer.cfg.seed * 1_000_003 + micro) * 1009)  # train_step's per-micro-step seed
        out = ref_model(batch)
        total = sum(head.weight * ref_cls(head.embeddings.float(), head.labels) for head in out.heads.values())
        total = total + sum(loss.float() for loss in out.aux_losses.values())
        for p, g in zip(trained, torch.autograd.grad(total, trained, allow_unused=True)):
            if g is not None:
                grads[id(p)] += g / len(data)
    after = [(p - lr * grads[id(p)] if p.requires_grad else p).detach().flatten() for p in params]
    n_model = sum(1 for _ in ref_model.parameters())
    want_model, want_cls = torch.cat(after[:n_model]), torch.cat(after[n_model:])
    moved = (want_model - w0).abs().max()
    assert moved > 0.1  # the step (1.05 at most, measured) stands far above the tolerance below
    # float32 sums in another order (DeepSpeed scales the loss by 1/2 before backward; here each gradient is halved):
    # measured 1.2e-7 (backbone) and 2.4e-7 (classifier); a missing or doubled 1/2 would be off by ~0.5
    torch.testing.assert_close(weights(trainer.model), want_model, rtol=0, atol=1e-6)
    torch.testing.assert_close(weights(trainer.classifier), want_cls, rtol=0, atol=1e-6)


def test_nonfinite_loss_skips_the_whole_step(make_trainer):
    """A NaN pixel: the step is skipped whole (weights, classifier and BatchNorm statistics unchanged), counted; the
    next good step trains; max_nonfinite_steps consecutive bad steps stop the run."""
    trainer = make_trainer("optim.max_nonfinite_steps=2")
    good, bad = batches(3)[0], batches(1, seed=1)[0]
    bad["image"][3, 0, 10, 10] = float("nan")
    trainer.train_step(good)
    w, c, b = weights(trainer.model), weights(trainer.classifier), buffers(trainer.model)
    terms = trainer.train_step(bad)
    assert not torch.isfinite(terms["total"])
    assert (trainer.step, trainer.nonfinite_steps) == (2, 1)
    assert torch.equal(weights(trainer.model), w) and torch.equal(weights(trainer.classifier), c)
    assert torch.equal(buffers(trainer.model), b)
    trainer.train_step(good)
    assert not torch.equal(weights(trainer.model), w)
    trainer.train_step(bad)
    with pytest.raises(TrainingDiverged, match="2 consecutive skipped steps"):
        trainer.train_step(bad)
    assert torch.isfinite(weights(trainer.model)).all()


def test_fp16_overflow_skips_the_step_and_halves_the_scale(make_trainer, monkeypatch):
    """fp16 with a loss scale of 2^40: the scaled gradients overflow, DeepSpeed skips the backbone's step and halves
    the scale (at the second); the trainer skips the classifier's step too and counts it (not as a divergence)."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)  # torch's CPU fp16 kernels suffice
    trainer = make_trainer("deepspeed.precision=fp16", "deepspeed.initial_scale_power=40")
    w, c = weights(trainer.model), weights(trainer.classifier)
    scale = trainer.engine.loss_scale
    for n in (1, 2):
        trainer.train_step(batches(1)[0])
        assert trainer.skipped_steps == n and trainer.nonfinite_steps == 0 and trainer.step == n
        assert torch.equal(weights(trainer.model), w) and torch.equal(weights(trainer.classifier), c)
    # DeepSpeed's loss scaler halves the scale at the second overflow in a row (its hysteresis, 2)
    assert trainer.engine.loss_scale == scale / 2


@pytest.mark.parametrize(
    "schedule",
    [
        ["schedule.kind=step", "schedule.milestones=[1,2]", "schedule.gamma=0.1"],
        ["schedule.kind=cosine", "schedule.warmup_epochs=1"],
        ["schedule.kind=poly", "schedule.power=2"],
    ],
    ids=["step", "cosine-warmup", "poly"],
)
def test_lr_schedule_per_step(make_trainer, schedule):
    """The learning rate each step uses (backbone and classifier groups) equals the schedule's formula written
    independently here, on a run of 3 epochs."""
    trainer = make_trainer("schedule.epochs=3", "schedule.max_steps=0", "classifier.lr_scale=2", *schedule)
    spe, base = trainer.steps_per_epoch, trainer.base_lr
    kind = trainer.cfg.schedule.kind

    def expected(step: int) -> float:
        epoch = step / spe
        if kind == "step":
            return base * 0.1 ** sum(epoch >= m for m in (1, 2))
        if kind == "cosine":
            if epoch < 1:  # linear warmup over the first epoch, from lr/1000 at step 0
                return base * (epoch / 1 if step else 1 / 1000)
            return base * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / 2))
        return base * (1 - epoch / 3) ** 2

    steps = sorted({0, 1, spe - 1, spe, spe + 1, 2 * spe, 3 * spe - 1})
    data = batches(1)[0]
    for step in steps:
        trainer.step = step
        trainer.train_step(data)
        lr = trainer.lr
        # rel 1e-9: the warmup adds 1e-12 epochs (2.3e-10 of the lr at step 1 of 226); the rest agrees to 1e-16
        assert lr == pytest.approx(expected(step), rel=1e-9, abs=1e-15), f"step {step} of {3 * spe}"
        assert trainer.engine.optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
        assert trainer.cls_optimizer.param_groups[0]["lr"] == pytest.approx(2 * lr, rel=1e-12)
