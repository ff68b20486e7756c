"""The training loop shared by textual inversion and LoRA, on accelerate.

What differs between the two lives in a :class:`TrainingTask` (what is trained, how its weights are
saved and restored, what happens after each optimizer step, how validation images are made).

Exact resume: a checkpoint holds only the trained tensors (safetensors), the optimizer and LR
scheduler states and the loss history; randomness is re-seeded from (seed, step, micro-batch, rank)
before every micro-batch and the data order depends only on the sample position, so a resumed run
computes the same losses as one that never stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.models import precision_for, resolve_device
from neu_det_pipeline.training.data import (
    DefectImageDataset,
    SeededOrderSampler,
    collate,
)
from neu_det_pipeline.training.diffusion import (
    DiffusionComponents,
    denoising_loss,
    encode_prompts,
)

CHECKPOINT_PREFIX = "checkpoint-"


def training_config_keys(section: str) -> tuple[str, ...]:
    """Config keys a fine-tuning step's result depends on: the base model, classes, seed, precision and the
    section's outcome keys (not its resume and checkpoint cadence, so `resume=latest` keeps the checkpoints)."""
    section_type = PipelineConfig.model_fields[section].annotation
    return (
        "models.pipeline", "models.sd15", "models.sdxl", "data.classes", "run.seed", "run.mixed_precision",
        *(f"{section}.{key}" for key in section_type.outcome_keys()),
    )


def make_accelerator(config: PipelineConfig, fp16_unsafe_model: str | None = None) -> Accelerator:
    """CPU when asked for or when no GPU exists (`accelerate launch --multi_gpu` then runs gloo ranks), in the
    precision `precision_for` picks (bf16 autocast on CPU too when `run.mixed_precision=bf16`)."""
    device = resolve_device(config.run.device)
    precision = precision_for(device, config.run.mixed_precision, fp16_unsafe_model)
    # accelerate keeps one precision per process; a later step (or test) may need another (Step 6 runs DINOv3
    # in bf16 after fp16 diffusion steps): start its state afresh, keeping the process group (PartialState).
    if AcceleratorState._shared_state.get("_mixed_precision") not in (None, precision):
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=device.type == "cpu")


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """Dtype for frozen weights: half precision under mixed precision, fp32 otherwise."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=min(max(warmup_steps / total_steps, 1e-3), 0.5),
        )
    diffusers_name = {"cosine_with_warmup": "cosine"}.get(name, name)
    return get_scheduler(diffusers_name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


class Checkpoints:
    """`checkpoint-<step>` folders under `root`, newest `limit` kept, each written atomically."""

    def __init__(self, root: Path, limit: int):
        self.root, self.limit = root, limit

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
        return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))

    def find(self, resume: str | None) -> Path | None:
        if resume is None:
            return None
        checkpoints = self.all()
        if resume == "latest":
            return checkpoints[-1] if checkpoints else None
        match = self.root / resume
        if match not in checkpoints:
            names = ", ".join(p.name for p in checkpoints) or "none yet"
            raise PipelineError(f"resume={resume}: no such checkpoint in {self.root} (available: {names}); use resume=latest")
        return match

    def save(
        self, step: int, tensors: dict[str, torch.Tensor], optimizer, lr_scheduler, losses: list[float], scaler=None
    ) -> Path:
        """`scaler`: the fp16 gradient scaler, whose loss scale an exact resume needs too."""
        final = self.root / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.root / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "trained.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.all()[: -self.limit]:
            shutil.rmtree(old)
        return final

    @staticmethod
    def load(
        path: Path, optimizer, lr_scheduler, scaler=None, device: torch.device | str = "cpu"
    ) -> tuple[int, dict[str, torch.Tensor], list[float]]:
        """Restore into `optimizer`, `lr_scheduler` (and `scaler`); returns (step, trained tensors, losses).

        Tensors are read onto `device`, the one this process trains on: a checkpoint written on `cuda:0` then
        resumes on another GPU or on a CPU, and the ranks of a multi-GPU run do not all unpickle onto `cuda:0`.
        """
        def read(name: str) -> Any:
            return torch.load(path / name, map_location=device, weights_only=True)

        optimizer.load_state_dict(read("optimizer.pt"))
        lr_scheduler.load_state_dict(read("scheduler.pt"))
        if scaler is not None and (path / "scaler.pt").is_file():
            scaler.load_state_dict(read("scaler.pt"))
        state = json.loads((path / "state.json").read_text())
        return state["step"], load_file(path / "trained.safetensors", device=str(device)), state["losses"]


@dataclass
class TrainingTask:
    """What textual inversion and LoRA do differently inside the shared loop."""

    model: torch.nn.Module
    """The module holding the trained parameters (prepared by accelerate: DDP on several processes)."""
    parameters: list[torch.nn.Parameter]
    """Parameters given to the optimizer and gradient clipping."""
    trained_state: Callable[[], dict[str, torch.Tensor]]
    """The trained tensors to checkpoint."""
    load_trained_state: Callable[[dict[str, torch.Tensor]], None]
    """Restore tensors saved by `trained_state`."""
    validate: Callable[[int], Path]
    """Render validation images after a step; returns the file written."""
    after_optimizer_step: Callable[[], None] = lambda: None
    """Hook run after every optimizer step (textual inversion restores frozen embedding rows)."""


@dataclass
class TrainingSettings:
    """The loop's knobs, taken from the step's config section."""

    max_train_steps: int
    train_batch_size: int
    gradient_accumulation_steps: int
    resolution: int
    checkpointing_steps: int
    checkpoints_total_limit: int
    validation_steps: int
    resume: str | None
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    loss_weighting: str = "uniform"
    foreground_weight: float = 1.0
    foreground_area_exponent: float = 0.0
    max_grad_norm: float = 1.0
    num_workers: int = 0

    @classmethod
    def from_section(cls, section: Any) -> TrainingSettings:
        names = cls.__dataclass_fields__
        return cls(**{name: getattr(section, name) for name in names if hasattr(section, name)})


@dataclass
class TrainingResult:
    losses: list[float]
    resumed_from: str | None
    validation_images: list[str] = field(default_factory=list)


class _LossModule(torch.nn.Module):
    """The denoising loss as the forward of a module holding the trained one.

    DDP averages gradients only for forward passes made through the wrapper `accelerator.prepare`
    returns, and accelerate's autocast wraps that forward too; the frozen components are a plain
    attribute, so DDP neither broadcasts nor tracks them.
    """

    def __init__(self, trained: torch.nn.Module, components: DiffusionComponents, settings: TrainingSettings):
        super().__init__()
        self.trained, self.components, self.settings = trained, components, settings

    def forward(self, pixel_values: torch.Tensor, prompts: list[str], box_areas: torch.Tensor | None = None) -> torch.Tensor:
        settings = self.settings
        hidden, added = encode_prompts(self.components, prompts, settings.resolution, pixel_values.device)
        return denoising_loss(
            self.components, pixel_values, hidden, added, settings.noise_offset, settings.snr_gamma,
            box_areas, settings.loss_weighting, settings.foreground_weight, settings.foreground_area_exponent,
        )


def make_dataloader(dataset: DefectImageDataset, settings: TrainingSettings, num_processes: int, seed: int) -> DataLoader:
    per_step = settings.train_batch_size * settings.gradient_accumulation_steps * num_processes
    sampler = SeededOrderSampler(len(dataset), settings.max_train_steps * per_step, seed)
    # Workers change nothing but speed: every random choice of a sample is seeded by its position.
    return DataLoader(
        dataset, batch_size=settings.train_batch_size, sampler=sampler, collate_fn=collate, num_workers=settings.num_workers
    )


def train(
    accelerator: Accelerator,
    components: DiffusionComponents,
    task: TrainingTask,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    dataloader: DataLoader,
    settings: TrainingSettings,
    out_dir: Path,
    seed: int,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
) -> TrainingResult:
    """Run (or continue) training to `settings.max_train_steps`; returns the loss per optimizer step."""
    checkpoints = Checkpoints(out_dir / "checkpoints", settings.checkpoints_total_limit)
    resume_from = checkpoints.find(settings.resume)
    start, losses = 0, []
    if resume_from is not None:
        start, tensors, losses = Checkpoints.load(resume_from, optimizer, lr_scheduler, accelerator.scaler, accelerator.device)
        task.load_trained_state(tensors)
    model, optimizer, dataloader = accelerator.prepare(_LossModule(task.model, components, settings), optimizer, dataloader)
    if start:
        dataloader = accelerator.skip_first_batches(dataloader, start * settings.gradient_accumulation_steps)
    batches = iter(dataloader)
    validation_images = []
    model.train()
    for step in range(start, settings.max_train_steps):
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(settings.gradient_accumulation_steps):
            batch = next(batches)
            # Per-micro-batch seeding makes noise, timesteps and dropout independent of how we got here.
            torch.manual_seed(hash((seed, step, micro, accelerator.process_index)) % 2**63)
            last_micro = micro == settings.gradient_accumulation_steps - 1
            with accelerator.no_sync(model) if not last_micro else contextlib.nullcontext():
                # The loss moves the box areas to the latents' device itself.
                loss = model(batch["pixel_values"].to(accelerator.device), batch["prompts"], batch.get("box_areas"))
                accelerator.backward(loss / settings.gradient_accumulation_steps)
            step_loss += loss.detach() / settings.gradient_accumulation_steps
        accelerator.clip_grad_norm_(task.parameters, settings.max_grad_norm)
        optimizer.step()
        # Under fp16 the gradient scaler skips a step whose gradients hold inf/NaN; the schedule waits for it too.
        if not optimizer.step_was_skipped:
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        task.after_optimizer_step()
        losses.append(accelerator.gather(step_loss[None]).mean().item())
        done = step + 1
        on_step(done, losses[-1])
        if accelerator.is_main_process:
            if done % settings.checkpointing_steps == 0 or done == settings.max_train_steps:
                checkpoints.save(done, task.trained_state(), optimizer, lr_scheduler, losses, accelerator.scaler)
            if done % settings.validation_steps == 0 or done == settings.max_train_steps:
                validation_images.append(str(task.validate(done)))
        accelerator.wait_for_everyone()
    return TrainingResult(losses, resume_from.name if resume_from else None, validation_images)
