"""`textual_inversion` and `lora`: the diffusion training sections (Steps 1 and 3) and what they share."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from neu_det_pipeline.config.base import Section, check_template


class TrainingSection(Section):
    """Fields every fine-tuning step shares: schedule, checkpoints, validation, resume."""

    RESUME_ONLY: ClassVar[frozenset[str]] = frozenset(
        {"resume", "checkpointing_steps", "checkpoints_total_limit", "num_workers", "gradient_checkpointing"}
    )
    """How to get there, not where: changing these must not wipe the checkpoints a resume needs (e.g. turning on
    gradient checkpointing after running out of memory)."""

    resolution: int = Field(512, ge=32)
    """Training resolution (Step 0 copies are resized if needed)."""
    train_batch_size: int = Field(4, ge=1)
    """Images per device per step."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    max_train_steps: int = Field(2000, ge=1)
    """Optimizer steps."""
    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(1e-2, ge=0)
    """AdamW weight decay."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine_with_warmup", "onecycle"] = "constant_with_warmup"
    """Learning-rate schedule."""
    lr_warmup_steps: int = Field(100, ge=0)
    """Warm-up steps of the schedule (OneCycle: its rising phase)."""
    checkpointing_steps: int = Field(500, ge=1)
    """Save a resumable checkpoint every N steps."""
    checkpoints_total_limit: int = Field(2, ge=1)
    """Checkpoints kept; older ones are deleted."""
    validation_steps: int = Field(500, ge=1)
    """Render validation images every N steps (and at the end)."""
    num_validation_images: int = Field(1, ge=1)
    """Seeded images per class in each validation grid."""
    validation_inference_steps: int = Field(25, ge=1)
    """Denoising steps for validation images."""
    resume: str | None = None
    """`latest` (or a checkpoint folder name) to continue an interrupted run."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (UNet and text encoders): much less memory (SDXL at 1024 px),
    about a third more compute, the same result."""
    num_workers: int = Field(0, ge=0)
    """Data-loader worker processes (results do not depend on it: augmentation is seeded per sample)."""
    loss_weighting: Literal["uniform", "box", "box_weighted"] = "uniform"
    """Spatial weighting of the denoising loss from the Step 0 boxes (moved with every flip and rotation):
    `uniform` every latent pixel alike; `box` the boxes only (the background gets no gradient); `box_weighted`
    `foreground_weight` inside the boxes and 1 outside (GeoDiffusion), normalised to mean 1 per image."""
    foreground_weight: float = Field(2.0, gt=0)
    """`loss_weighting: box_weighted`: weight of box pixels relative to the background (GeoDiffusion used 2)."""
    foreground_area_exponent: float = Field(0.0, ge=0)
    """`loss_weighting: box_weighted`: GeoDiffusion's area re-weighting p: box pixels weigh
    `foreground_weight / area^p` (area: the box's fraction of the image), so small defects count more; 0 is off,
    GeoDiffusion used 0.2."""


class TextualInversionConfig(TrainingSection):
    placeholder_format: str = "<neu-{cls}>"
    """Placeholder token per class; `{cls}` is replaced by the class name."""
    initializer_words: dict[str, str] = Field(
        default_factory=lambda: {
            "crazing": "cracks",
            "inclusion": "spots",
            "patches": "stains",
            "pitted_surface": "pits",
            "rolled-in_scale": "scale",
            "scratches": "scratches",
        }
    )
    """Word whose embedding initialises each class token (multi-token words are averaged)."""
    templates: list[str] = Field(
        default_factory=lambda: [
            "a grayscale photo of {token} on a steel strip",
            "a close-up photo of {token} defects on hot-rolled steel",
            "an industrial inspection image of {token}",
            "a macro photo of a steel surface with {token}",
        ]
    )
    """Training prompt templates; `{token}` is replaced by the class token."""
    max_train_steps: int = Field(3000, ge=1)
    """Optimizer steps."""
    learning_rate: float = Field(5e-4, gt=0)
    """Learning rate of the token embeddings (they move far from their initial word)."""
    num_validation_images: int = Field(2, ge=1)
    """Seeded images per class token in each validation grid."""

    @field_validator("placeholder_format")
    @classmethod
    def _has_class_slot(cls, value: str) -> str:
        if "{cls}" not in value:
            raise ValueError(f"textual_inversion.placeholder_format={value!r} must contain {{cls}}, e.g. <neu-{{cls}}>")
        return value

    @field_validator("templates")
    @classmethod
    def _templates_have_token_slot(cls, templates: list[str]) -> list[str]:
        return [check_template(f"textual_inversion.templates[{i}]", t, "token") for i, t in enumerate(templates)]

    def tokens(self, classes: list[str]) -> dict[str, str]:
        """Class name -> placeholder token, e.g. `crazing` -> `<neu-crazing>`."""
        return {name: self.placeholder_format.format(cls=name) for name in classes}




class LoraConfigSection(TrainingSection):
    rank: int = Field(16, ge=1)
    """LoRA rank r."""
    alpha: int = Field(16, ge=1)
    """LoRA alpha (scaling = alpha / rank)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA dropout."""
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet attention projections that get adapters."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    train_text_encoder: bool = False
    """Also put LoRA on the text encoder(s)."""
    text_encoder_target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    """Text-encoder projections that get adapters when `train_text_encoder` is on."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """`adamw8bit` uses bitsandbytes AdamW8bit with 8-bit state for every LoRA tensor."""
    snr_gamma: float | None = None
    """Min-SNR loss weighting gamma (5.0 is typical); null disables it."""
    noise_offset: float = Field(0.0, ge=0)
    """Noise offset added to the training noise."""
    hflip: bool = True
    """Random horizontal flips."""
    vflip: bool = True
    """Random vertical flips."""
    rot90: bool = True
    """Random 90-degree rotations (textures have no up direction)."""
