"""Training stages: which part of the backbone trains in each epoch, and the staged learning-rate schedule.

Two plans share one mechanism:
- the default two stages: `freeze_epochs` with a frozen backbone ("frozen backbone"), then everything ("full");
- `classifier.stages` (the large-dataset preset, 10k+ images): e.g. frozen backbone, then its last blocks, then
  everything, each stage with its own peak learning rates, a linear warm-up of `warmup_epochs` (at most half the
  stage) and a cosine decay to 0 at the stage's end.

A frozen part gets no gradients and keeps its batch-norm statistics (eval mode); the data-parallel wrapper is
rebuilt whenever the trainable set changes (training.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from neu_det_pipeline.classifier.backbones import Backbone, backbone_blocks, final_norm
from neu_det_pipeline.config.classifier import ClassifierConfig


@dataclass(frozen=True)
class Stage:
    name: str
    """As metrics.csv's `stage` column shows it."""
    start_epoch: int
    epochs: int
    train: str
    """`head`, `last_blocks` or `all`."""
    last_blocks: int = 0
    learning_rate: float | None = None
    """Peak head / decoder / enhancer learning rate of a `classifier.stages` stage; None in the default plan."""
    backbone_learning_rate: float | None = None


def training_stages(section: ClassifierConfig) -> list[Stage]:
    """The stages of a run, in order, covering epochs 0 .. `epochs` - 1."""
    if not section.stages:
        plan = [Stage("frozen backbone", 0, section.freeze_epochs, "head"), Stage("full", section.freeze_epochs, section.epochs - section.freeze_epochs, "all")]
        return [stage for stage in plan if stage.epochs]
    stages, start = [], 0
    for number, stage in enumerate(section.stages, 1):
        what = {"head": "frozen backbone", "last_blocks": f"last {stage.last_blocks} blocks", "all": "full"}[stage.train]
        stages.append(Stage(f"{number}: {what}", start, stage.epochs, stage.train, stage.last_blocks, stage.learning_rate, stage.backbone_learning_rate))
        start += stage.epochs
    return stages


def stage_at(stages: list[Stage], epoch: int) -> Stage:
    return next(stage for stage in stages if stage.start_epoch <= epoch < stage.start_epoch + stage.epochs)


def _trainable_parts(backbone: Backbone, stage: Stage) -> list[nn.Module]:
    if stage.train == "all":
        return [backbone]
    if stage.train == "head":
        return []
    blocks = backbone_blocks(backbone)
    norm = final_norm(backbone)
    return blocks[-stage.last_blocks :] + ([norm] if norm is not None else [])


def apply_stage(backbone: Backbone, stage: Stage) -> None:
    """Gradients for the stage's trainable part of the backbone only."""
    backbone.set_trainable(stage.train == "all")
    if stage.train == "last_blocks":
        for part in _trainable_parts(backbone, stage):
            part.requires_grad_(True)


def set_train_modes(backbone: Backbone, stage: Stage) -> None:
    """After `module.train()`: frozen parts back to eval mode, so their batch-norm statistics stay fixed."""
    if stage.train == "all":
        return
    backbone.eval()
    for part in _trainable_parts(backbone, stage):
        part.train()


def warmup_cosine(step: int, start: int, warmup: int, total: int) -> float:
    """LR factor: 0 before `start`, linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < start:
        return 0.0
    if step < start + warmup:
        return (step - start + 1) / warmup
    decay = max(1, total - start - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - start - warmup) / decay)))


def staged_lr_lambdas(stages: list[Stage], steps_per_epoch: int, warmup_epochs: float, base_lrs: list[float]) -> list[Callable[[int], float]]:
    """LambdaLR factors for the groups (head, backbone[, loss weights]) whose initial learning rates are `base_lrs`:
    in each stage, the stage's peak rate (the backbone's for group 1) times a warm-up + cosine shape."""

    def shape(step: int) -> tuple[Stage, float]:
        epoch = min(step // steps_per_epoch, stages[-1].start_epoch + stages[-1].epochs - 1)
        stage = stage_at(stages, epoch)
        length = stage.epochs * steps_per_epoch
        warmup = min(round(warmup_epochs * steps_per_epoch), length // 2)
        start = stage.start_epoch * steps_per_epoch
        return stage, warmup_cosine(step, start, warmup, start + length)

    def factor(group: int) -> Callable[[int], float]:
        def at(step: int) -> float:
            stage, value = shape(step)
            peak = stage.backbone_learning_rate if group == 1 else stage.learning_rate
            return value * peak / base_lrs[group]

        return at

    return [factor(group) for group in range(len(base_lrs))]
