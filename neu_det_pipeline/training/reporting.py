"""What a fine-tuning step shows: seeded validation grids and the loss curve."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.utils import make_image_grid

from neu_det_pipeline.config import TrainingSection
from neu_det_pipeline.io import atomic_write_bytes, save_image, write_json
from neu_det_pipeline.training.diffusion import DiffusionComponents, decode_latents, inference_pipeline

LOSSES_FILE = "losses.json"
LOSS_PLOT_FILE = "loss.png"
VALIDATION_DIR = "validation"


@torch.no_grad()
def save_validation_grid(
    components: DiffusionComponents, accelerator: Accelerator, prompts: list[str], section: TrainingSection,
    seed: int, out_dir: Path, step: int,
) -> Path:
    """One row per prompt, `section.num_validation_images` seeded images per row, as `validation/step-<N>.png`.

    The denoising runs under the training's autocast (fp32 text encoders feed a half-precision UNet); the VAE
    decodes outside it, in its own dtype, as in training (the SDXL VAE gives NaN, black images, in fp16).
    """
    pipe = inference_pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for prompt in prompts:
        # CPU generators give the same starting noise on every device.
        generators = [torch.Generator().manual_seed(seed + i) for i in range(section.num_validation_images)]
        with accelerator.autocast():
            latents = pipe(
                prompt,
                num_images_per_prompt=section.num_validation_images,
                num_inference_steps=section.validation_inference_steps,
                height=section.resolution,
                width=section.resolution,
                generator=generators,
                output_type="latent",
            ).images
        images += decode_latents(components.vae, latents)
    grid = make_image_grid(images, rows=len(prompts), cols=section.num_validation_images)
    return save_image(grid, out_dir / VALIDATION_DIR / f"step-{step:06d}.png")


def save_losses(losses: list[float], out_dir: Path, title: str) -> None:
    """`losses.json` and a `loss.png` plot of the loss per optimizer step."""
    from matplotlib.figure import (
        Figure,  # imported here: only rank 0 plots, once, at the end
    )
    from matplotlib.ticker import MaxNLocator

    write_json(out_dir / LOSSES_FILE, losses)
    figure = Figure(figsize=(6, 3), layout="tight")
    axes = figure.subplots()
    axes.plot(range(1, len(losses) + 1), losses, linewidth=0.8)
    axes.set(xlabel="optimizer step", ylabel="loss", title=title)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(out_dir / LOSS_PLOT_FILE, buffer.getvalue())
