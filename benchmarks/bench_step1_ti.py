"""Step 1 training steps/s against a bare diffusers textual-inversion loop (target ratio >= 0.95).

    python benchmarks/bench_step1_ti.py --config configs/smoke.yaml
    python benchmarks/bench_step1_ti.py --config configs/base.yaml data.root=/data/NEU-DET   # GPU node, real SD 1.5

Both loops train the same SD 1.5 model on Step 0's training images (prepared here, in a temporary folder)
with the same batch size, resolution, AdamW settings and learning rate. The bare loop is the loop of
diffusers' examples/textual_inversion/textual_inversion.py cut to its training step (accelerate, one
text-encoder forward, masked restore of the frozen rows, a loss `.item()` per step for its logs).
Each repeat times the steps after `--warmup`, alternating the two loops; the medians are compared.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from loop_comparison import compare, parse_args, prepared_run
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import CLIPTextModel, CLIPTokenizer

from neu_det_pipeline import step0_prepare
from neu_det_pipeline.artifacts import train_rows
from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.training.loop import make_accelerator, weight_dtype
from neu_det_pipeline.training.textual_inversion import TextualInversion

STEP0 = step0_prepare.STEP.name


def step1_loop(config: PipelineConfig, run_dir: Path, steps: int) -> list[float]:
    """Step 1's own training (library + shared core); returns the end time of every optimizer step."""
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        TextualInversion(config, run_dir / STEP0, Path(out)).run(on_step=lambda step, loss: stamps.append(time.perf_counter()))
    return stamps


class _TemplateImages(Dataset):
    """The diffusers example's dataset: an image, a flip, a random template with the token, tokenized."""

    def __init__(self, step0_dir: Path, config: PipelineConfig, tokenizer: CLIPTokenizer):
        section = config.textual_inversion
        self.rows, self.step0_dir, self.tokenizer = train_rows(step0_dir), step0_dir, tokenizer
        self.tokens, self.templates, self.resolution = section.tokens(config.data.classes), section.templates, section.resolution

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        with Image.open(self.step0_dir / row["image"]) as image:
            image = image.convert("RGB").resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        if random.random() < 0.5:
            pixels = pixels.flip(2)
        prompt = random.choice(self.templates).format(token=self.tokens[row["class"]])
        ids = self.tokenizer(
            prompt, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids[0]
        return {"pixel_values": pixels, "input_ids": ids}


def bare_diffusers_loop(config: PipelineConfig, run_dir: Path, steps: int) -> list[float]:
    section, model_id = config.textual_inversion, config.models.sd15
    tokenizer = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(model_id, subfolder="scheduler")

    tokens = section.tokens(config.data.classes)
    tokenizer.add_tokens(list(tokens.values()))
    token_ids = tokenizer.convert_tokens_to_ids(list(tokens.values()))
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeds = text_encoder.get_input_embeddings().weight.data
    with torch.no_grad():
        for name, token_id in zip(tokens, token_ids):
            embeds[token_id] = embeds[tokenizer.encode(section.initializer_words[name], add_special_tokens=False)].mean(0)
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)  # the example freezes every text-encoder part but the token embedding
    text_encoder.get_input_embeddings().requires_grad_(True)

    accelerator: Accelerator = make_accelerator(config)
    optimizer = torch.optim.AdamW(
        text_encoder.get_input_embeddings().parameters(), lr=section.learning_rate, weight_decay=section.weight_decay
    )
    dataloader = DataLoader(_TemplateImages(run_dir / STEP0, config, tokenizer), batch_size=section.train_batch_size, shuffle=True)
    lr_scheduler = get_scheduler("constant", optimizer)
    text_encoder, optimizer, dataloader, lr_scheduler = accelerator.prepare(text_encoder, optimizer, dataloader, lr_scheduler)
    dtype = weight_dtype(accelerator)
    vae.to(accelerator.device, dtype=dtype)
    unet.to(accelerator.device, dtype=dtype)
    orig_embeds = accelerator.unwrap_model(text_encoder).get_input_embeddings().weight.data.clone()
    text_encoder.train()

    stamps: list[float] = []
    while len(stamps) < steps:
        for batch in dataloader:
            with accelerator.accumulate(text_encoder):
                latents = vae.encode(batch["pixel_values"].to(dtype)).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                hidden = text_encoder(batch["input_ids"])[0].to(dtype)
                prediction = unet(noisy_latents, timesteps, hidden).sample
                loss = F.mse_loss(prediction.float(), noise.float())
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                index_no_updates = torch.ones((len(tokenizer),), dtype=torch.bool)
                index_no_updates[min(token_ids) : max(token_ids) + 1] = False
                with torch.no_grad():
                    accelerator.unwrap_model(text_encoder).get_input_embeddings().weight[index_no_updates] = orig_embeds[index_no_updates]
            loss.detach().item()  # the example logs the loss every step
            stamps.append(time.perf_counter())
            if len(stamps) == steps:
                break
    return stamps


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    overrides = [
        "models.pipeline=sd15", "textual_inversion.lr_scheduler=constant",
        "textual_inversion.gradient_accumulation_steps=1", f"textual_inversion.max_train_steps={args.steps}",
        "textual_inversion.checkpointing_steps=1000000", "textual_inversion.validation_steps=1000000",
        "textual_inversion.validation_inference_steps=1", "textual_inversion.num_validation_images=1",
    ]
    with prepared_run(args, overrides, (step0_prepare.STEP,)) as (config, run_dir):
        section = config.textual_inversion
        print(f"model {config.models.sd15}, batch {section.train_batch_size}, {section.resolution} px")
        compare({"step1": step1_loop, "bare diffusers": bare_diffusers_loop}, config, run_dir, args)


if __name__ == "__main__":
    main()
