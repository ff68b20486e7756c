"""Two-stage training of the attention-guided classifier on accelerate.

Stage 1 (`freeze_epochs`): the backbone is frozen (no gradients, batch-norm statistics fixed) while the
decoder, enhancer and head learn. Stage 2: everything trains, the backbone at `backbone_lr_scale` times
the learning rate with its own warm-up. `classifier.stages` replaces these two with its own (stages.py: e.g.
frozen backbone, last blocks, everything, each with its own learning rates). AdamW or SGD with momentum (the seed
guide's), warm-up + cosine per parameter group or torch's cosine annealing with warm restarts (the guide's
schedule), gradient accumulation, gradient clipping, mixed precision (accelerate; DINOv3 in bf16 or fp32, never
fp16), optional class-balanced sampling.

After every epoch: validation (macro-F1 picks `best.pt`), `last.pt`, one history row. Exact resume:
`last.pt` holds model, loss weights, optimizer, schedule and scaler states; the data order, augmentation
and dropout are re-seeded from (seed, epoch, batch, rank), so a resumed run ends with the weights of
one that never stopped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from neu_det_pipeline.classifier.backbones import create_backbone
from neu_det_pipeline.classifier.checkpoints import BEST_FILE, LAST_FILE, read_checkpoint, save_checkpoint
from neu_det_pipeline.classifier.data import ClassifierData, ClassifierDataset, EpochSampler, steps_per_epoch
from neu_det_pipeline.classifier.evaluation import metrics, predict_dataset
from neu_det_pipeline.classifier.losses import LossParts, MultiTaskLoss
from neu_det_pipeline.classifier.model import AttentionGuidedClassifier, ModelSpec
from neu_det_pipeline.classifier.stages import Stage, apply_stage, set_train_modes, stage_at, staged_lr_lambdas, training_stages, warmup_cosine
from neu_det_pipeline.config import ClassifierConfig, PipelineConfig
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.training.loop import make_accelerator


def is_dinov3(backbone: str) -> bool:
    """`classifier.backbone` names DINOv3 weights (`dinov3`, `timm:vit_small_patch16_dinov3.lvd1689m`,
    `timm:convnext_tiny.dinov3_lvd1689m`): they are not fp16-safe, so training runs them in bf16 or fp32."""
    return "dinov3" in backbone.lower()


DEFAULT_WEIGHT_DECAY = {"adamw": 0.05, "sgd": 1e-3}  # SGD's: the seed guide's


def make_optimizer(section: ClassifierConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    weight_decay = DEFAULT_WEIGHT_DECAY[section.optimizer] if section.weight_decay is None else section.weight_decay
    if section.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=section.learning_rate, momentum=section.momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=section.learning_rate, weight_decay=weight_decay)


def make_lr_scheduler(
    section: ClassifierConfig, optimizer: torch.optim.Optimizer, warmup: int, total: int, unfreeze: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per optimizer step. `warmup_cosine`: a LambdaLR per group (head, backbone from `unfreeze`, loss
    weights); `cosine_restarts`: torch's CosineAnnealingWarmRestarts after a linear warm-up, one factor for all groups."""
    if section.lr_schedule == "warmup_cosine":
        head = lambda step: warmup_cosine(step, 0, warmup, total)  # noqa: E731
        backbone = lambda step: warmup_cosine(step, unfreeze, warmup, total)  # noqa: E731
        return torch.optim.lr_scheduler.LambdaLR(optimizer, [head, backbone, head][: len(optimizer.param_groups)])
    warmup = warmup if warmup > 1 else 0  # a one-step warm-up is the schedule's own first factor, 1
    cycle = round(section.restart_epochs * steps_per_epoch) if section.restart_epochs is not None else total - warmup
    restarts = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=max(1, cycle), T_mult=section.restart_mult)
    if not warmup:
        return restarts
    # Factor (step + 1) / warmup during the warm-up, as warmup_cosine's.
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, restarts], milestones=[warmup])


class _TrainingModule(nn.Module):
    """Model and loss in one forward, so data-parallel training syncs the loss-weighting parameters too."""

    def __init__(self, model: AttentionGuidedClassifier, loss: MultiTaskLoss, supervise_masks: bool):
        super().__init__()
        self.model, self.loss, self.supervise_masks = model, loss, supervise_masks

    def forward(self, pixels: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, epoch: int) -> LossParts:
        out = self.model(pixels)
        # mask_source=none: the loss sees no mask logits, so it is the classification loss alone.
        return self.loss(out.logits, labels, out.mask_logits if self.supervise_masks else None, masks, epoch)


@dataclass
class TrainingResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_macro_f1: float
    resumed_from_epoch: int | None
    stopped_by_time_budget: bool


class ClassifierTraining:
    def __init__(self, config: PipelineConfig, data: ClassifierData, out_dir: Path):
        self.config, self.section, self.data, self.out_dir = config, config.classifier, data, out_dir
        self.accelerator = make_accelerator(config, fp16_unsafe_model="DINOv3" if is_dinov3(self.section.backbone) else None)
        section = self.section
        torch.manual_seed(config.run.seed)
        backbone, backbone_spec = create_backbone(
            section.backbone, config.models.dinov3, section.pretrained, section.backbone_kwargs, section.image_size
        )
        spec = ModelSpec(
            backbone=backbone_spec, classes=data.classes, image_size=section.image_size, multitask=section.multitask,
            decoder_channels=section.decoder_channels, enhancer_dim=section.enhancer_dim, dropout=section.dropout,
            head=section.head, input=section.input, crop_margin=section.crop_margin,
        )
        self.model = AttentionGuidedClassifier(backbone, spec).to(self.accelerator.device)
        self.loss = MultiTaskLoss(section).to(self.accelerator.device)
        self.train_set = ClassifierDataset(data.splits["train"], section.image_size, config.run.seed, section.augmentation, section.crop_margin)
        self.val_set = self.dataset("val")

        processes = self.accelerator.num_processes
        self.steps_per_epoch = steps_per_epoch(len(self.train_set), section.batch_size, section.gradient_accumulation_steps, processes)
        total = section.epochs * self.steps_per_epoch
        warmup = max(1, round(section.warmup_epochs * self.steps_per_epoch)) if section.warmup_epochs else 0
        groups = [
            {"params": self.model.head_parameters(), "lr": section.learning_rate},
            # Pretrained weights move less; a randomly initialised backbone learns at the full rate.
            {"params": list(self.model.backbone.parameters()), "lr": section.learning_rate * (section.backbone_lr_scale if section.pretrained else 1.0)},
        ]
        if self.loss.log_vars is not None:  # no weight decay: it would pull the log-variances to 0
            groups.append({"params": [self.loss.log_vars], "lr": section.learning_rate, "weight_decay": 0.0})
        self.optimizer = make_optimizer(section, groups)
        self.stages = training_stages(section)
        if section.stages:
            lambdas = staged_lr_lambdas(self.stages, self.steps_per_epoch, section.warmup_epochs, [group["lr"] for group in groups])
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambdas)
        else:
            self.lr_scheduler = make_lr_scheduler(section, self.optimizer, warmup, total, section.freeze_epochs * self.steps_per_epoch, self.steps_per_epoch)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Every learned parameter (model and loss weighting): what data-parallel ranks must agree on."""
        return {name: p.detach() for module in (self.model, self.loss) for name, p in module.named_parameters(prefix=type(module).__name__)}

    # ----------------------------------------------------------------------------------- resume

    def _resume(self) -> tuple[int, list[dict[str, Any]], float, int, float]:
        """(next epoch, history, best macro-F1, best epoch, seconds already trained) from `last.pt`, or a fresh start."""
        path = self.out_dir / LAST_FILE
        if self.section.resume is None or not path.is_file():
            return 0, [], -1.0, -1, 0.0
        state = read_checkpoint(path)
        if state["spec"] != self.model.spec.to_dict():
            raise PipelineError(f"{path} was trained with another model spec; delete it or drop classifier.resume")
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        return state["epoch"], state["history"], state["best_macro_f1"], state["best_epoch"], state["seconds"]

    # ------------------------------------------------------------------------------------ train

    def run(self, on_step: Callable[[int, float], None] = lambda step, loss: None) -> TrainingResult:
        section, accelerator = self.section, self.accelerator
        start_epoch, history, best_f1, best_epoch, seconds = self._resume()
        resumed_from = start_epoch if start_epoch else None
        optimizer = accelerator.prepare_optimizer(self.optimizer)
        stage_module, current_stage = None, None
        stopped = False
        for epoch in range(start_epoch, section.epochs):
            started = time.perf_counter()
            stage = stage_at(self.stages, epoch)
            if stage != current_stage:
                # Data-parallel wrappers track the parameters that need gradients when they are made:
                # a new one per stage.
                apply_stage(self.model.backbone, stage)
                module = _TrainingModule(self.model, self.loss, supervise_masks=section.mask_source != "none")
                stage_module, current_stage = accelerator.prepare_model(module), stage
            learning_rates = self.lr_scheduler.get_last_lr()  # at the epoch's first step
            sums = self._train_epoch(stage_module, optimizer, epoch, stage, on_step)
            seconds += time.perf_counter() - started
            history.append(self._epoch_row(epoch, stage, learning_rates, sums, seconds))
            if accelerator.is_main_process:
                if history[-1]["val_macro_f1"] > best_f1:
                    best_f1, best_epoch = history[-1]["val_macro_f1"], epoch + 1
                    save_checkpoint(self.out_dir / BEST_FILE, self.model, epoch=epoch + 1, val_macro_f1=best_f1)
                save_checkpoint(
                    self.out_dir / LAST_FILE, self.model, epoch=epoch + 1, history=history, best_macro_f1=best_f1,
                    best_epoch=best_epoch, seconds=seconds, loss=self.loss.state_dict(), optimizer=self.optimizer.state_dict(),
                    lr_scheduler=self.lr_scheduler.state_dict(),
                    scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
                )
            accelerator.wait_for_everyone()
            if section.max_train_minutes is not None and seconds > 60 * section.max_train_minutes and epoch + 1 < section.epochs:
                stopped = True
                break
        return TrainingResult(history, best_epoch, best_f1, resumed_from, stopped)

    def _train_epoch(self, module: nn.Module, optimizer, epoch: int, stage: Stage, on_step) -> dict[str, float]:
        section, accelerator = self.section, self.accelerator
        sampler = EpochSampler(self.train_set.labels(), self.config.run.seed, epoch, section.class_balanced)
        loader = accelerator.prepare_data_loader(
            DataLoader(self.train_set, batch_size=section.batch_size, sampler=sampler, num_workers=section.num_workers)
        )
        module.train()
        set_train_modes(self.model.backbone, stage)  # frozen means frozen batch-norm statistics too
        accumulation = section.gradient_accumulation_steps
        sums = {"loss": 0.0, "classification": 0.0, "segmentation": 0.0, "alpha": 0.0, "beta": 0.0, "batches": 0}
        batches = len(loader)
        steps_done = epoch * self.steps_per_epoch  # optimizer steps so far, skipped ones included: the progress
        for i, batch in enumerate(loader):
            # Dropout noise depends on (seed, epoch, batch, rank) only: a resumed run draws the same.
            torch.manual_seed(hash((self.config.run.seed, epoch, i, accelerator.process_index)) % 2**63)
            step_now = (i + 1) % accumulation == 0 or i + 1 == batches
            with accelerator.no_sync(module) if not step_now else contextlib.nullcontext():
                parts = module(batch["pixels"], batch["masks"], batch["labels"], epoch)
                accelerator.backward(parts.total / accumulation)
            if step_now:
                accelerator.clip_grad_norm_([p for group in self.optimizer.param_groups for p in group["params"]], section.max_grad_norm)
                optimizer.step()
                # Under fp16 the gradient scaler skips a step whose gradients hold inf/NaN; the schedule waits too.
                if not optimizer.step_was_skipped:
                    self.lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                steps_done += 1
                on_step(steps_done, parts.total.item())
            for key, value in (("loss", parts.total), ("classification", parts.classification), ("segmentation", parts.segmentation)):
                sums[key] += value.item()
            sums["alpha"] += parts.alpha
            sums["beta"] += parts.beta
            sums["batches"] += 1
        return sums

    def _epoch_row(self, epoch: int, stage: Stage, learning_rates: list[float], sums: dict[str, float], seconds: float) -> dict[str, Any]:
        n = max(1, sums["batches"])
        row = {
            "epoch": epoch + 1,
            "stage": stage.name,
            "lr": learning_rates[0],
            "backbone_lr": learning_rates[1],
            "alpha": sums["alpha"] / n,
            "beta": sums["beta"] / n,
            "train_loss": sums["loss"] / n,
            "train_classification_loss": sums["classification"] / n,
            "train_segmentation_loss": sums["segmentation"] / n,
        }
        result = self.evaluate(self.val_set)
        row.update({f"val_{key}": result[key] for key in ("accuracy", "macro_f1", "mask_iou", "mask_dice")})
        row["seconds"] = round(seconds, 2)
        return row

    def dataset(self, split: str) -> ClassifierDataset:
        """An evaluation split (no augmentation; box crops with the evaluation margin)."""
        return ClassifierDataset(self.data.splits[split], self.section.image_size, self.config.run.seed, crop_margin=self.section.crop_margin)

    def evaluate(self, dataset: ClassifierDataset, model: AttentionGuidedClassifier | None = None) -> dict[str, Any]:
        """Scores per sample: per image, or per object with box crops (counted as `objects`)."""
        predictions = predict_dataset(
            model or self.model, dataset, self.section.eval_batch_size, self.accelerator.device, self.accelerator.autocast
        )
        return metrics(predictions, self.data.classes, unit="objects" if self.section.input == "box_crops" else "images")
