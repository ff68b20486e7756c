"""Stable Diffusion 1.5 / SDXL components for training: loading, prompt encoding, the denoising loss.

Both families are handled by one code path: SDXL simply has two tokenizer/text-encoder pairs, uses the
penultimate hidden states of both (concatenated) plus the pooled projection and size/crop time ids.

Two precision and pooling traps of the real models are handled here:

- The hub's CLIP text-encoder configs say `eos_token_id: 2`, with which transformers pools at the highest token
  id of each prompt; once Step 1 adds tokens that is the class token, not EOS, and SDXL's pooled `text_embeds`
  would ignore the rest of the prompt. :func:`pool_at_eos` points each encoder at its tokenizer's EOS.
- The VAE runs outside autocast, in its own dtype (fp32 for SDXL, whose VAE overflows in fp16): inside
  accelerate's autocast a VAE kept in fp32 would still run its convolutions in half precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.training_utils import compute_snr
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.errors import ConfigError
from neu_det_pipeline.models import load_model, weights_variant


@dataclass
class DiffusionComponents:
    family: str
    """`sd15` or `sdxl`."""
    model_id: str
    tokenizers: list[CLIPTokenizer]
    text_encoders: list[torch.nn.Module]
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def vae_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The SDXL VAE stays fp32 whatever `dtype`: it overflows in fp16 (NaN latents), which is why diffusers'
        SDXL scripts upcast it too; any VAE whose config asks for it (`force_upcast`) stays fp32 in fp16 runs."""
        upcast = self.family == "sdxl" or (dtype == torch.float16 and self.vae.config.get("force_upcast", False))
        return torch.float32 if upcast else dtype

    def place(self, device: torch.device, dtype: torch.dtype, text_encoder_dtype: torch.dtype | None = None) -> None:
        """Move to `device`: frozen weights in `dtype` (half precision under mixed precision), text encoders in
        `text_encoder_dtype` when they hold trained fp32 weights, the VAE in :meth:`vae_dtype`."""
        moves = [(self.vae, self.vae_dtype(dtype)), (self.unet, dtype)]
        moves += [(encoder, text_encoder_dtype or dtype) for encoder in self.text_encoders]
        for module, module_dtype in moves:
            # Passing a dtype makes diffusers warn about fp32 modules even when nothing is cast.
            module.to(device) if module.dtype == module_dtype else module.to(device, module_dtype)

    def enable_gradient_checkpointing(self, text_encoders: bool) -> None:
        """Recompute activations in the backward pass: in the UNet, and in the text encoders when gradients go
        through them (textual inversion, text-encoder LoRA). Non-reentrant checkpointing, which also carries
        gradients to inputs when every weight of the checkpointed block is frozen (textual inversion's UNet)."""
        self.unet.enable_gradient_checkpointing()
        for encoder in self.text_encoders if text_encoders else []:
            # transformers 5.24 renamed `gradient_checkpointing_enable` (deprecated, removed in v6).
            if hasattr(encoder, "activation_checkpointing_enable"):
                encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def freeze(self) -> None:
        """Freeze every weight; each step then unfreezes exactly what it trains."""
        for module in (self.vae, self.unet, *self.text_encoders):
            module.requires_grad_(False)


def base_model(config: PipelineConfig) -> tuple[str, str]:
    """(config key, model id) of the diffusion base model chosen by `models.pipeline`."""
    family = config.models.pipeline
    if family == "sd3":  # the SD3 generator reads models.sd3 itself; Steps 1 and 3 train UNet models only
        raise ConfigError(
            "models.pipeline=sd3 is for Step 4 only: Steps 1 (textual inversion) and 3 (LoRA) train SD 1.5 / SDXL; "
            "`neu-det run-all` skips them for this config (with generation.prompt_source=template)"
        )
    return f"models.{family}", getattr(config.models, family)


def load_components(
    config: PipelineConfig, dtype: torch.dtype = torch.float32, text_encoder_dtype: torch.dtype | None = None
) -> DiffusionComponents:
    """The base model's components; `dtype` and `text_encoder_dtype` are what `place` will hold them in: a network
    held in half precision loads the repo's fp16 variant files where it has them (`place` casts either way)."""
    key, model_id = base_model(config)
    sdxl = config.models.pipeline == "sdxl"

    def load(cls, subfolder, **kwargs):
        return load_model(key, model_id, lambda: cls.from_pretrained(model_id, subfolder=subfolder, **kwargs))

    def load_network(cls, subfolder, held_in):
        return load(cls, subfolder, variant=weights_variant(model_id, held_in, subfolder))

    encoder_dtype = text_encoder_dtype or dtype
    tokenizers = [load(CLIPTokenizer, "tokenizer")]
    text_encoders = [load_network(CLIPTextModel, "text_encoder", encoder_dtype)]
    if sdxl:
        tokenizers.append(load(CLIPTokenizer, "tokenizer_2"))
        text_encoders.append(load_network(CLIPTextModelWithProjection, "text_encoder_2", encoder_dtype))
    components = DiffusionComponents(
        family=config.models.pipeline,
        model_id=model_id,
        tokenizers=tokenizers,
        text_encoders=text_encoders,
        vae=load_network(AutoencoderKL, "vae", torch.float32 if sdxl else dtype),  # as `place` holds it
        unet=load_network(UNet2DConditionModel, "unet", dtype),
        # The training schedule comes from the model's own scheduler config (betas, prediction type).
        noise_scheduler=load(DDPMScheduler, "scheduler"),
    )
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        pool_at_eos(tokenizer, encoder)
    components.freeze()
    return components


def pool_at_eos(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel | CLIPTextModelWithProjection) -> None:
    """Make `text_encoder` pool (SDXL's `text_embeds`) at the first EOS token of each prompt.

    transformers' CLIP reads `eos_token_id` from the text model at forward time; the hub's configs (SD 1.5,
    SDXL) carry the legacy value 2, which means "pool at the highest token id" (EOS in the original vocabulary,
    the class token once textual inversion adds tokens). Every pipeline and training run that may see added
    tokens calls this after loading; the config file is left alone.
    """
    text_model = text_encoder.text_model if isinstance(text_encoder, CLIPTextModelWithProjection) else text_encoder
    text_model.eos_token_id = tokenizer.eos_token_id


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_prompts(
    components: DiffusionComponents, prompts: list[str], resolution: int, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Text conditioning for the UNet: (encoder_hidden_states, added_cond_kwargs or None for SD 1.5)."""
    if components.family == "sd15":
        ids = tokenize(components.tokenizers[0], prompts).to(device)
        return components.text_encoders[0](ids)[0], None
    hidden_states, pooled = [], None
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders):
        output = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
        pooled = output[0]  # the last encoder (with projection) gives the pooled text embedding
    # Original size, crop top-left, target size: square training images, no crop.
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device)
    added = {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1).to(pooled.dtype)}
    return torch.cat(hidden_states, dim=-1), added


def box_loss_weights(
    box_areas: torch.Tensor, latent_size: tuple[int, int], weighting: str, foreground_weight: float = 1.0,
    foreground_area_exponent: float = 0.0,
) -> torch.Tensor:
    """Per-latent-pixel loss weights (B, 1, h, w), mean 1 per image, from pixel box-area maps (B, 1, H, W).

    `box_areas` holds, at each pixel of a box, the area of the smallest box covering it (fraction of the
    image) and 0 elsewhere (:func:`~neu_det_pipeline.training.data.box_area_map`). Pixel weights:

    - `box`: 1 inside the boxes, 0 outside (the loss is the mean over box pixels only);
    - `box_weighted`: `foreground_weight * area ** -p` inside (p: `foreground_area_exponent`), 1 outside. With
      p = 0 this is GeoDiffusion's constant foreground re-weighting (w inside, 1 outside); with p > 0 its area
      re-weighting (m = w / c^p inside, 1 / (HW)^p outside, c the box area in latent pixels, normalised to
      mean 1) written with areas as fractions of the image: the common factor (HW)^-p cancels.

    The pixel weights are averaged over each latent pixel's footprint (a latent pixel half covered by a box
    gets the mean of its pixels' weights), then divided by their per-image mean, so the loss keeps the scale of
    the uniform one. An image without boxes gets uniform weights (nothing to focus on).
    """
    inside = box_areas > 0
    if weighting == "box":
        pixel_weights = inside.float()
    elif weighting == "box_weighted":
        foreground = foreground_weight * box_areas.clamp(min=torch.finfo(box_areas.dtype).tiny) ** -foreground_area_exponent
        pixel_weights = torch.where(inside, foreground, torch.ones_like(box_areas))
    else:
        raise ValueError(f"unknown loss weighting {weighting!r}")
    weights = F.adaptive_avg_pool2d(pixel_weights.float(), latent_size)
    mean = weights.mean(dim=(2, 3), keepdim=True)
    return torch.where(mean > 0, weights / mean.clamp(min=1e-12), torch.ones_like(weights))


def weighted_mse(
    prediction: torch.Tensor, target: torch.Tensor, pixel_weights: torch.Tensor | None,
    image_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean_b( image_weights[b] * mean_{c,h,w}( pixel_weights[b, :, h, w] * (prediction - target)^2 ) ).

    `pixel_weights` (B, 1, h, w) or None (all 1), `image_weights` (B,) or None (all 1): Min-SNR weights multiply
    the spatially weighted per-image losses, so both weightings compose.
    """
    squared_error = (prediction.float() - target.float()) ** 2
    if pixel_weights is not None:
        squared_error = squared_error * pixel_weights
    per_image = squared_error.mean(dim=(1, 2, 3))
    if image_weights is not None:
        per_image = per_image * image_weights
    return per_image.mean()


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023), as in the diffusers training examples."""
    snr = compute_snr(scheduler, timesteps)
    return torch.clamp(snr, max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)


def denoising_loss(
    components: DiffusionComponents,
    pixel_values: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
    box_areas: torch.Tensor | None = None,
    loss_weighting: str = "uniform",
    foreground_weight: float = 1.0,
    foreground_area_exponent: float = 0.0,
) -> torch.Tensor:
    """The standard latent-diffusion training loss (epsilon or v target), with optional noise offset, Min-SNR
    and, with `loss_weighting` `box` / `box_weighted`, per-latent-pixel weights from `box_areas`
    (:func:`box_loss_weights`)."""
    vae, scheduler = components.vae, components.noise_scheduler
    with torch.no_grad(), outside_autocast(pixel_values.device):
        latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    if components.prediction_type == "epsilon":
        target = noise
    elif components.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {components.prediction_type!r}")
    prediction = components.unet(
        noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    ).sample.float()
    pixel_weights = None
    if loss_weighting != "uniform":
        if box_areas is None:
            raise ValueError(f"loss weighting {loss_weighting!r} needs the batch's box-area maps")
        pixel_weights = box_loss_weights(
            box_areas.to(latents.device), tuple(latents.shape[-2:]), loss_weighting, foreground_weight, foreground_area_exponent
        )
    snr_weights = None
    if snr_gamma is not None:
        snr_weights = min_snr_weights(scheduler, timesteps, snr_gamma, components.prediction_type)
    return weighted_mse(prediction, target, pixel_weights, snr_weights)


def outside_autocast(device: torch.device) -> torch.autocast:
    """A block where autocast is off: the VAE then runs in its own dtype even inside the loss's autocast."""
    return torch.autocast(device_type=device.type, enabled=False)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> list[Image.Image]:
    """PIL images from a pipeline's `output_type="latent"` result, decoded outside autocast in the VAE's dtype.

    Unscales as the SD 1.5 and SDXL pipelines do (SDXL VAEs may carry `latents_mean` / `latents_std`).
    """
    config = vae.config
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device)
        latents = latents.float() * std / config.scaling_factor + mean
    else:
        latents = latents.float() / config.scaling_factor
    with outside_autocast(latents.device):
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    processor = VaeImageProcessor(vae_scale_factor=2 ** (len(config.block_out_channels) - 1))
    return processor.postprocess(images.float(), output_type="pil")


def inference_pipeline(components: DiffusionComponents) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A text-to-image pipeline around the components being trained, for validation images."""
    scheduler = UniPCMultistepScheduler.from_config(components.noise_scheduler.config)
    if components.family == "sd15":
        return StableDiffusionPipeline(
            vae=components.vae, text_encoder=components.text_encoders[0], tokenizer=components.tokenizers[0],
            unet=components.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=components.vae, text_encoder=components.text_encoders[0], text_encoder_2=components.text_encoders[1],
        tokenizer=components.tokenizers[0], tokenizer_2=components.tokenizers[1], unet=components.unet,
        scheduler=scheduler,
    )
