"""Step 3 training steps/s against a bare diffusers + peft LoRA loop (target ratio >= 0.95).

    python benchmarks/bench_step3_lora.py --config configs/smoke.yaml
    python benchmarks/bench_step3_lora.py --config configs/smoke.yaml lora.use_dora=true lora.optimizer=adamw8bit
    python benchmarks/bench_step3_lora.py --config configs/base.yaml data.root=/data/NEU-DET   # GPU node, real SD 1.5

Both loops train the same LoRA (rank, alpha, targets, DoRA or not) on the same SD 1.5 model, Step 0 training
images, Step 2 prompts and Step 1 tokens (Steps 0-2 run here first, in a temporary folder, Step 1 for one step),
with the same batch size, resolution, optimizer and learning rate. The bare loop is the loop of diffusers'
examples/text_to_image/train_text_to_image_lora.py cut to its training step (accelerate, peft `add_adapter`,
gradient clipping, a gathered loss `.item()` per step for its logs). Each repeat times the steps after
`--warmup`, alternating the two loops; the medians are compared.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from loop_comparison import compare, parse_args, prepared_run
from peft import LoraConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from neu_det_pipeline import step0_prepare, step1_textual_inversion, step2_captions
from neu_det_pipeline.artifacts import CAPTIONS_FILE, train_rows
from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.io import read_jsonl
from neu_det_pipeline.training.loop import make_accelerator, weight_dtype
from neu_det_pipeline.training.lora import LoraTraining
from neu_det_pipeline.training.textual_inversion import load_learned_embeddings

MAX_GRAD_NORM = 1.0  # the example's default, and the shared loop's


def step3_loop(config: PipelineConfig, run_dir: Path, steps: int) -> list[float]:
    """Step 3's own training (library + shared core); returns the end time of every optimizer step."""
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        training = LoraTraining(
            config, run_dir / "step0_prepare", run_dir / "step1_textual_inversion", run_dir / "step2_captions", Path(out)
        )
        training.run(on_step=lambda step, loss: stamps.append(time.perf_counter()))
    return stamps


class _CaptionedImages(Dataset):
    """The example's dataset: an image, a random flip, its caption tokenized."""

    def __init__(self, run_dir: Path, resolution: int, tokenizer):
        step0_dir = run_dir / "step0_prepare"
        prompts = {row["id"]: row["prompt"] for row in read_jsonl(run_dir / "step2_captions" / CAPTIONS_FILE)}
        self.items = [(step0_dir / row["image"], prompts[row["id"]]) for row in train_rows(step0_dir)]
        self.resolution, self.tokenizer = resolution, tokenizer

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path, prompt = self.items[index]
        with Image.open(path) as image:
            image = image.convert("RGB").resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        if random.random() < 0.5:
            pixels = pixels.flip(2)
        ids = self.tokenizer(prompt, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids[0]
        return {"pixel_values": pixels, "input_ids": ids}


def bare_diffusers_loop(config: PipelineConfig, run_dir: Path, steps: int) -> list[float]:
    section = config.lora
    pipe = StableDiffusionPipeline.from_pretrained(config.models.sd15, safety_checker=None)
    load_learned_embeddings(pipe, run_dir / "step1_textual_inversion")  # pipe.load_textual_inversion per class
    tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    noise_scheduler = DDPMScheduler.from_pretrained(config.models.sd15, subfolder="scheduler")
    for module in (vae, unet, text_encoder):
        module.requires_grad_(False)

    accelerator = make_accelerator(config)
    dtype = weight_dtype(accelerator)
    for module in (vae, unet, text_encoder):
        module.to(accelerator.device, dtype=dtype)
    unet.add_adapter(LoraConfig(
        r=section.rank, lora_alpha=section.alpha, lora_dropout=section.dropout, use_dora=section.use_dora,
        init_lora_weights="gaussian", target_modules=section.target_modules,
    ))
    cast_training_params(unet, dtype=torch.float32)
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    if section.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(lora_layers, lr=section.learning_rate, weight_decay=section.weight_decay, min_8bit_size=1)
    else:
        optimizer = torch.optim.AdamW(lora_layers, lr=section.learning_rate, weight_decay=section.weight_decay)
    dataloader = DataLoader(_CaptionedImages(run_dir, section.resolution, tokenizer), batch_size=section.train_batch_size, shuffle=True)
    lr_scheduler = get_scheduler("constant", optimizer)
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    unet.train()

    stamps: list[float] = []
    while len(stamps) < steps:
        for batch in dataloader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(dtype)).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                prediction = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(prediction.float(), noise.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers, MAX_GRAD_NORM)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            accelerator.gather(loss.repeat(section.train_batch_size)).mean().item()  # the example logs it every step
            stamps.append(time.perf_counter())
            if len(stamps) == steps:
                break
    return stamps


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    overrides = [
        "models.pipeline=sd15",
        "textual_inversion.max_train_steps=1", "textual_inversion.validation_inference_steps=1",
        "lora.lr_scheduler=constant_with_warmup", "lora.lr_warmup_steps=0", "lora.gradient_accumulation_steps=1",
        "lora.train_text_encoder=false", f"lora.max_train_steps={args.steps}",
        "lora.checkpointing_steps=1000000", "lora.validation_steps=1000000",
        "lora.validation_inference_steps=1", "lora.num_validation_images=1",
    ]
    with prepared_run(args, overrides, (step0_prepare.STEP, step1_textual_inversion.STEP, step2_captions.STEP)) as (config, run_dir):
        section = config.lora
        print(f"model {config.models.sd15}, {'DoRA' if section.use_dora else 'LoRA'} rank {section.rank} on "
              f"{', '.join(section.target_modules)}, {section.optimizer}, batch {section.train_batch_size}, {section.resolution} px")
        compare({"step3": step3_loop, "bare diffusers": bare_diffusers_loop}, config, run_dir, args)


if __name__ == "__main__":
    main()
