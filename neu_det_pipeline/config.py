"""Typed, layered pipeline configuration.

A config is a YAML file validated against :class:`PipelineConfig`. A file may start with
``extends: other.yaml`` (a path relative to itself, or a list of them) and then holds only
its differences; command-line overrides ``key.sub=value`` are applied last. Unknown keys and
wrong types fail with one line naming the key, the file it came from and the allowed values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from neu_det_pipeline.errors import ConfigError

NEU_DET_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")

COMMAND_LINE = "the command line"


def check_template(key: str, template: str, slot: str) -> str:
    """`template` must be fillable with `{slot}` alone and must keep it (e.g. a prompt without `{token}` would
    silently train or rank without the class token)."""
    sentinel = "\0"  # cannot occur in a YAML string, so finding it proves the slot was filled
    try:
        filled = template.format(**{slot: sentinel})
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{key}={template!r} is not a valid template ({exc!r}); its only placeholder is {{{slot}}}") from None
    if sentinel not in filled:
        raise ValueError(f"{key}={template!r} must contain {{{slot}}}")
    return template


class Section(BaseModel):
    """Base of every config section: unknown keys are rejected, field docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class RunConfig(Section):
    output_dir: Path = Path("outputs/base")
    """Root of all outputs; each step writes into `<output_dir>/<step name>/`."""
    seed: int = 0
    """Global seed for splits, training and generation; recorded in every summary."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device for inference steps: `auto` takes CUDA when available."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    """Precision of training (autocast, frozen weights) and inference. On GPU as set, except DINOv3 (Steps 5-6),
    which is not fp16-safe and runs in bf16 there (fp32 where the GPU has no bf16). On CPU `bf16` runs in bf16 where
    the CPU has bf16 kernels (slow, but it exercises the half-precision paths); `fp16` runs in fp32 there (CPU fp16
    kernels are slow or missing). Each step's summary records the dtype it really ran in (`dtype`)."""
    tiny_models_dir: Path | None = None
    """If set, tiny random models are built here (once) before any step runs; for offline smoke runs."""

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads an unquoted `no` as false


class SplitConfig(Section):
    train: float = 0.70
    """Fraction of each class's images in the training split."""
    val: float = 0.15
    """Fraction of each class's images in the validation split."""
    test: float = 0.15
    """Fraction of each class's images in the test split."""

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        fractions = (self.train, self.val, self.test)
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"data.split fractions must be >= 0 and sum to 1, got {fractions}")
        return self


class DataConfig(Section):
    root: Path = Path("data/neu-det-sample")
    """NEU-DET folder in the original (`IMAGES/`, `ANNOTATIONS/`) or the Kaggle layout."""
    layout: Literal["auto", "original", "kaggle"] = "auto"
    """Dataset layout; `auto` detects it from the folder structure."""
    classes: list[str] = Field(default_factory=lambda: list(NEU_DET_CLASSES))
    """Defect class names, in YOLO label order."""
    strict: bool = False
    """Fail on the first bad file instead of skipping it and reporting it."""
    split: SplitConfig = Field(default_factory=SplitConfig)
    """Stratified train/val/test split by image class."""
    train_fraction: float = Field(1.0, gt=0, le=1)
    """Low-data protocol: fraction of each class's training split kept for Steps 1-4 (seeded); the rest is held
    back (`split: train_heldout`) and only Step 5's real-data oracle trains on it."""

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, classes: list[str]) -> list[str]:
        if not classes or len(set(classes)) != len(classes):
            raise ValueError("data.classes must be a non-empty list of unique names")
        return classes


class PrepareConfig(Section):
    resolution: int = Field(512, ge=32)
    """Side of the square training copies made for diffusion (PIL bicubic, 3 identical channels)."""
    yolo_export: bool = True
    """Export the real splits in YOLO format with a `data.yaml` ultralytics accepts."""
    contact_sheet_samples: int = Field(6, ge=1)
    """Samples per class (one row each) in the contact sheet."""
    workers: int = Field(0, ge=0)
    """Worker processes for per-image work; 0 uses every available core."""


class ControlNetIds(Section):
    softedge: str | None = None
    """ControlNet trained on soft edges (HED / PiDiNet maps); null where none exists."""
    depth: str | None = None
    """ControlNet conditioned on depth maps."""
    normal: str | None = None
    """ControlNet conditioned on surface normals (NormalBae); null where none exists."""
    canny: str | None = None
    """ControlNet conditioned on Canny edges."""


class ModelsConfig(Section):
    pipeline: Literal["sd15", "sdxl"] = "sd15"
    """Base diffusion family used by steps 1-4."""
    sd15: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Stable Diffusion 1.5 pipeline (hub id or local folder in hub layout)."""
    sdxl: str = "stabilityai/stable-diffusion-xl-base-1.0"
    """SDXL base pipeline (hub id or local folder)."""
    controlnet_sd15: ControlNetIds = Field(
        default_factory=lambda: ControlNetIds(
            softedge="lllyasviel/control_v11p_sd15_softedge",
            depth="lllyasviel/control_v11f1p_sd15_depth",
            normal="lllyasviel/control_v11p_sd15_normalbae",
            canny="lllyasviel/control_v11p_sd15_canny",
        )
    )
    """SD 1.5 ControlNet v1.1 checkpoints, trained at 512 px on: softedge HED and PiDiNet soft edges (and their `safe`
    forms), depth MiDaS / LeReS / ZoeDepth maps, normal NormalBae normals, canny Canny edges with random thresholds."""
    controlnet_sdxl: ControlNetIds = Field(
        default_factory=lambda: ControlNetIds(
            depth="diffusers/controlnet-depth-sdxl-1.0",
            canny="diffusers/controlnet-canny-sdxl-1.0",
        )
    )
    """SDXL ControlNet checkpoints, trained at 1024 px: depth on DPT (MiDaS) depth maps, canny on Canny edges. softedge
    and normal are null: no public ControlNet for SDXL base is trained on HED/PiDiNet soft edges or on normals alone
    (SargeZT's soft-edge model was trained on DexiNed edges); use `generation.union_controlnet` for them."""
    controlnet_union_sdxl: str = "xinsir/controlnet-union-sdxl-1.0"
    """SDXL union ControlNet (`ControlNetUnionModel`, trained at about 1024x1024 px, any aspect ratio): one model whose
    control modes were trained on depth maps, HED/PiDiNet soft edges and scribbles, Canny/lineart edges and normal maps."""
    clip: str = "openai/clip-vit-large-patch14"
    """CLIP model for keyword ranking and CLIP score (ViT-L/14; `-336` also works)."""
    open_clip: str = "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """OpenCLIP model for ranking ensembles (`hf-hub:org/repo` or `local-dir:path`)."""
    blip2: str = "Salesforce/blip2-opt-2.7b"
    """BLIP-2 captioning model."""
    dinov3: str = "timm/vit_small_patch16_dinov3.lvd1689m"
    """DINOv3 ViT-S/16 (Step 6 backbone, Step 5 `dinov3` features): timm weights (DINOv3 licence, not gated), or the
    transformers repo `facebook/dinov3-vits16-pretrain-lvd1689m` (gated: approval by hand); hub id or local folder."""
    depth: str = "depth-anything/Depth-Anything-V2-Small-hf"
    """Depth estimator for depth control maps."""
    annotators: str = "lllyasviel/Annotators"
    """controlnet_aux annotator weights (HED, NormalBae)."""
    yolo: str = "yolov8n.pt"
    """Ultralytics detector weights or model YAML for the downstream detection test."""

    @field_validator("open_clip")
    @classmethod
    def _open_clip_has_a_source(cls, value: str) -> str:
        # open_clip turns a bare architecture name ("ViT-H-14") into random weights with only a log line.
        if not value.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(
                f"models.open_clip={value!r} must be `hf-hub:org/repo` or `local-dir:path`, "
                "e.g. hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
            )
        return value


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

    @classmethod
    def outcome_keys(cls) -> list[str]:
        """Fields that change what is trained: a change re-does the step."""
        return [name for name in cls.model_fields if name not in cls.RESUME_ONLY]


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


class CaptionsConfig(Section):
    prompt_style: Literal["plain", "keywords", "blip2"] = "plain"
    """Final prompt: `plain` template+token, `keywords` adds top-k CLIP keywords, `blip2` adds a BLIP-2 caption."""
    template: str = "a grayscale photo of {token} on a steel strip"
    """Base prompt template; `{token}` is the class token from Step 1."""
    general_keywords: list[str] = Field(
        default_factory=lambda: [
            "hot-rolled steel strip",
            "metal surface",
            "industrial inspection",
            "grayscale",
            "surface texture",
            "macro photography",
        ]
    )
    """General steel-surface keywords (the seed plan's paper keywords)."""
    class_keywords: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "crazing": ["fine cracks", "crack network", "crazed surface"],
            "inclusion": ["dark inclusions", "embedded particles", "elongated spots"],
            "patches": ["irregular patches", "stains", "discoloured areas"],
            "pitted_surface": ["pits", "pitted texture", "small craters"],
            "rolled-in_scale": ["rolled-in scale", "scale flakes", "oxide scale"],
            "scratches": ["scratches", "long thin lines", "scratch marks"],
        }
    )
    """Defect-specific keywords per class."""
    prompt_variants: list[str] = Field(
        default_factory=lambda: [
            "{prompt}",
            "{prompt}, macro photography",
            "{prompt}, industrial inspection, surface texture",
        ]
    )
    """Prompt variants ranked per image; `{prompt}` is the prompt being varied."""
    top_k: int = Field(3, ge=1)
    """Keywords kept per image."""
    ranking_backends: list[Literal["clip", "open_clip"]] = Field(default_factory=lambda: ["clip"])
    """Models that score keywords; with several, normalised scores are averaged (ensemble)."""
    batch_size: int = Field(16, ge=1)
    """Images per model forward pass."""
    blip2_max_new_tokens: int = Field(30, ge=1)
    """Length limit of BLIP-2 captions."""

    @field_validator("template")
    @classmethod
    def _template_has_token_slot(cls, template: str) -> str:
        return check_template("captions.template", template, "token")

    @field_validator("prompt_variants")
    @classmethod
    def _variants_have_prompt_slot(cls, variants: list[str]) -> list[str]:
        return [check_template(f"captions.prompt_variants[{i}]", v, "prompt") for i, v in enumerate(variants)]


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


ControlType = Literal["softedge", "depth", "normal", "canny"]
DetectorName = Literal["hed", "pidinet", "midas", "depth_anything", "normalbae", "canny"]
LayoutAugmentation = Literal["hflip", "vflip", "rot90", "rot180", "rot270"]

DETECTOR_CONTROL: dict[str, str] = {
    "hed": "softedge",
    "pidinet": "softedge",
    "midas": "depth",
    "depth_anything": "depth",
    "normalbae": "normal",
    "canny": "canny",
}
"""The control map each detector makes (`depth_anything` runs `models.depth` through transformers, the others
come from controlnet_aux with the weights in `models.annotators`)."""
SCHEDULERS_WITH_KARRAS = ("unipc", "dpmsolver++")
CONTROLNETS_TRAINED_ON_OTHER_MAPS: dict[str, str] = {
    "SargeZT/controlnet-sd-xl-1.0-softedge-dexined": "DexiNed edges",
}
"""ControlNets trained on maps no `generation.detectors` option makes: fed HED or PiDiNet maps, they would be
conditioned on inputs they never saw, without an error."""


class GenerationConfig(Section):
    controls: list[ControlType] = Field(default_factory=lambda: ["softedge", "depth"])
    """Control maps extracted from each source image, one ControlNet each (several: diffusers' multi-ControlNet)."""
    detectors: dict[ControlType, DetectorName] = Field(
        default_factory=lambda: {"softedge": "hed", "depth": "depth_anything", "normal": "normalbae", "canny": "canny"}
    )
    """Detector per control: softedge `hed`/`pidinet`, depth `depth_anything` (models.depth)/`midas`, normal `normalbae`, canny `canny`."""
    conditioning_scales: dict[ControlType, float] = Field(
        default_factory=lambda: {"softedge": 1.0, "depth": 0.5, "normal": 0.5, "canny": 1.0}
    )
    """ControlNet conditioning scale per control."""
    control_guidance_start: dict[ControlType, float] = Field(
        default_factory=lambda: {"softedge": 0.0, "depth": 0.0, "normal": 0.0, "canny": 0.0}
    )
    """Fraction of the denoising steps after which each ControlNet starts acting."""
    control_guidance_end: dict[ControlType, float] = Field(
        default_factory=lambda: {"softedge": 1.0, "depth": 1.0, "normal": 1.0, "canny": 1.0}
    )
    """Fraction of the denoising steps after which each ControlNet stops acting."""
    union_controlnet: bool = False
    """SDXL only: one union ControlNet (`models.controlnet_union_sdxl`) for every control instead of one per control."""
    control_cache_dir: Path | None = None
    """Folder of cached control maps keyed by (image content, detector, resolution); null: `<step folder>/controls`.
    Point several experiments at one folder to share maps."""
    layout_augmentations: list[LayoutAugmentation] = Field(default_factory=list)
    """Flips / rotations applied to maps, boxes and masks in turn with the unchanged layout (`[]`: off)."""
    mode: Literal["txt2img", "img2img"] = "txt2img"
    """`img2img` starts from the noised source image (keeps more real texture), `txt2img` from pure noise."""
    strength: float = Field(0.75, gt=0.0, le=1.0)
    """img2img: how much of the source is re-generated (1.0 ignores it)."""
    scheduler: Literal["dpmsolver++", "unipc", "euler_a", "ddim"] = "dpmsolver++"
    """Sampler: DPM++ multistep, UniPC, Euler ancestral or DDIM."""
    use_karras_sigmas: bool = False
    """Karras noise levels (`dpmsolver++` and `unipc` only)."""
    num_inference_steps: int = Field(40, ge=1)
    """Denoising steps per image."""
    guidance_scale: float = Field(7.0, ge=1.0)
    """Classifier-free guidance scale."""
    per_class_guidance: dict[str, float] = Field(default_factory=dict)
    """Class-specific guidance scales that override `guidance_scale`."""
    guidance_rescale: float = Field(0.0, ge=0.0, le=1.0)
    """CFG rescale factor phi (Lin et al. 2023; 0 disables it), applied by the step: the ControlNet pipelines ignore it."""
    prompt_source: Literal["captions", "template"] = "captions"
    """`captions`: each source image's Step 2 prompt; `template`: `prompt_template` with the class token."""
    prompt_template: str = "a grayscale photo of {token} on a steel strip"
    """Prompt when `prompt_source: template`; `{token}` is the Step 1 token (the class name without Step 1)."""
    negative_prompt: str = "color, blurry, low quality, text, watermark, jpeg artifacts"
    """Negative prompt of every image."""
    use_textual_inversion: bool = True
    """Load the Step 1 class tokens (required by `prompt_source: captions`)."""
    use_lora: bool = True
    """Load the Step 3 LoRA / DoRA adapters."""
    lora_scale: float = Field(1.0, ge=0.0)
    """Weight of the Step 3 adapters."""
    images_per_source: int = Field(2, ge=1)
    """Synthetic images made from each real training image (when `images_per_class` is null)."""
    images_per_class: int | None = Field(None, ge=1)
    """Balanced output: this many images per class, cycling through the class's sources; overrides `images_per_source`."""
    batch_size: int = Field(4, ge=1)
    """Images per pipeline call (per process); an image's pixels depend on its own seed only."""
    resolution: int = Field(512, ge=32)
    """Generation resolution (a multiple of 8: the VAE downsamples by 8 on real models)."""
    output_size: int | None = Field(None, ge=8)
    """Side of the saved images (boxes scaled to it); null: the source image's size (200 for NEU-DET)."""
    output_mode: Literal["L", "RGB"] = "L"
    """Saved colour mode: `L` grayscale like the real data, or `RGB`."""
    channels_last: bool = False
    """GPU option: channels-last memory format for the UNet and ControlNets."""
    compile: bool = False
    """GPU option: `torch.compile` the UNet and ControlNets (CUDA only; ignored on CPU)."""
    vae_slicing: bool = False
    """Decode a batch one image at a time (less memory)."""
    vae_tiling: bool = False
    """Decode in tiles (less memory at high resolution)."""
    cpu_offload: bool = False
    """GPU option: model CPU offload (accelerate) for small GPUs; single process only; ignored on CPU."""

    @field_validator("prompt_template")
    @classmethod
    def _template_has_token_slot(cls, template: str) -> str:
        return check_template("generation.prompt_template", template, "token")

    @model_validator(mode="after")
    def _consistent(self) -> GenerationConfig:
        if not self.controls or len(set(self.controls)) != len(self.controls):
            raise ValueError(f"generation.controls={self.controls} must be a non-empty list without repeats")
        for control in self.controls:
            detector = self.detectors.get(control)
            if detector is None:
                raise ValueError(f"generation.detectors has no detector for control {control!r}; set generation.detectors.{control}=...")
            if DETECTOR_CONTROL[detector] != control:
                allowed = [name for name, made in DETECTOR_CONTROL.items() if made == control]
                raise ValueError(f"generation.detectors.{control}={detector!r} makes {DETECTOR_CONTROL[detector]} maps; use one of {allowed}")
            for key in ("conditioning_scales", "control_guidance_start", "control_guidance_end"):
                if control not in getattr(self, key):
                    raise ValueError(f"generation.{key} has no value for control {control!r}; set generation.{key}.{control}=...")
            if not 0 <= self.control_guidance_start[control] < self.control_guidance_end[control] <= 1:
                raise ValueError(
                    f"generation.control_guidance_start.{control} must be < control_guidance_end.{control}, both in [0, 1]"
                )
        if self.use_karras_sigmas and self.scheduler not in SCHEDULERS_WITH_KARRAS:
            raise ValueError(
                f"generation.use_karras_sigmas=true needs a scheduler that has them ({', '.join(SCHEDULERS_WITH_KARRAS)}), "
                f"not {self.scheduler!r}"
            )
        if self.prompt_source == "captions" and not self.use_textual_inversion:
            raise ValueError(
                "generation.prompt_source=captions uses the Step 2 prompts, which hold the Step 1 tokens: set "
                "generation.use_textual_inversion=true or generation.prompt_source=template"
            )
        return self

class CurationConfig(Section):
    memorised_similarity: float = Field(0.95, gt=0, le=1)
    """Reject a synthetic image whose correlation with a real training image (or one of its flips and 90-degree
    rotations), both as `memorised_size` px grayscale thumbnails, reaches this value."""
    memorised_size: int = Field(32, ge=8)
    """Side of the grayscale thumbnails compared for memorisation."""
    min_std: float = Field(4.0, ge=0)
    """Reject as degenerate (blank, near-constant, black) below this pixel standard deviation (0-255 levels)."""
    max_saturated_fraction: float = Field(0.5, gt=0, le=1)
    """Reject as degenerate (saturated) when more than this fraction of pixels is 0 or 255."""
    label_consistency: bool = True
    """Reject off-class or label-inconsistent images: the real-data YOLO finds no box of the image's class."""
    min_detector_map50: float = Field(0.3, ge=0, le=1)
    """The label-consistency rule applies only when the real-only detector reaches this test mAP50 (a weak
    detector would reject good images); otherwise it is skipped and the summary says why."""


class UtilityConfig(Section):
    enabled: bool = True
    """Train YOLO on real and on real + curated synthetic data (the headline result); false: image metrics only."""
    synthetic_ratios: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0])
    """Curated synthetic images added per real training image (0 = real only)."""
    seeds: list[int] = Field(default_factory=lambda: [0])
    """Training seeds of every run; with several, mean and spread are reported."""
    oracle: bool = True
    """With `data.train_fraction` < 1, also train on the kept plus the held-back real images (the real-data oracle)."""
    epochs: int = Field(100, ge=1)
    """YOLO training epochs (the same for every run)."""
    imgsz: int = Field(224, ge=32)
    """YOLO training and evaluation image size (NEU-DET images are 200 px)."""
    batch: int = Field(16, ge=1)
    """YOLO batch size."""
    workers: int = Field(2, ge=0)
    """YOLO data-loader workers."""
    conf: float = Field(0.25, gt=0, lt=1)
    """Detection confidence threshold for label consistency."""

    @field_validator("synthetic_ratios")
    @classmethod
    def _ratios(cls, ratios: list[float]) -> list[float]:
        if not ratios or any(r < 0 for r in ratios) or len(set(ratios)) != len(ratios):
            raise ValueError(f"evaluation.utility.synthetic_ratios={ratios} must be distinct numbers >= 0")
        return ratios


class EvaluationConfig(Section):
    features: list[Literal["inception", "clip", "dinov3"]] = Field(default_factory=lambda: ["inception", "dinov3"])
    """Feature spaces of FID, KID and precision/recall: `inception` (torch-fidelity weights), `clip`
    (`models.clip`), `dinov3` (`models.dinov3`); the first one also picks LPIPS nearest-neighbour candidates."""
    inception_weights: Path | None = None
    """Local torch-fidelity Inception-v3 weights file; null downloads them on first use."""
    batch_size: int = Field(32, ge=1)
    """Images per feature-extractor and LPIPS forward pass."""
    kid_subsets: int = Field(100, ge=2)
    """KID subsets (mean and std over them)."""
    kid_subset_size: int = Field(1000, ge=2)
    """Images per KID subset, capped at half the smaller side so that subsets differ (the size used is reported)."""
    pr_neighbourhood: int = Field(3, ge=1)
    """k of the k-NN manifolds of precision and recall (Kynkäänniemi et al. 2019)."""
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    """LPIPS backbone."""
    lpips_pretrained_backbone: bool = True
    """ImageNet weights for the LPIPS backbone (torchvision downloads them once); false only for offline tests."""
    lpips_pairs: int = Field(200, ge=1)
    """Random image pairs per class for intra-class LPIPS diversity."""
    lpips_candidates: int = Field(5, ge=1)
    """Nearest real training images (in the first feature space) among which LPIPS picks the nearest one."""
    lbp_radii: list[int] = Field(default_factory=lambda: [1, 2, 3])
    """Uniform-LBP radii (8 * radius points each); their histograms are concatenated."""
    clip_score: bool = True
    """CLIP score of each synthetic image against its prompt (`models.clip`)."""
    report_samples: int = Field(6, ge=1)
    """Images per class in the report's real-vs-synthetic contact sheets."""
    curation: CurationConfig = Field(default_factory=CurationConfig)
    """Which synthetic images enter the curated training set."""
    utility: UtilityConfig = Field(default_factory=UtilityConfig)
    """YOLO trained on real vs real + curated synthetic, tested on the real test split."""

    @field_validator("features")
    @classmethod
    def _distinct_features(cls, features: list[str]) -> list[str]:
        if not features or len(set(features)) != len(features):
            raise ValueError(f"evaluation.features={features} must be a non-empty list without repeats")
        return features

    @field_validator("lbp_radii")
    @classmethod
    def _positive_radii(cls, radii: list[int]) -> list[int]:
        if not radii or any(r < 1 for r in radii):
            raise ValueError(f"evaluation.lbp_radii={radii} must be a non-empty list of radii >= 1")
        return radii


class ClassifierAugmentationConfig(Section):
    hflip: bool = True
    """Random horizontal flips (image and mask together)."""
    vflip: bool = True
    """Random vertical flips."""
    rot90: bool = True
    """Random 90-degree rotations (steel textures have no up direction)."""
    max_rotation: float = Field(10.0, ge=0, le=45)
    """Small affine: rotation drawn from [-max_rotation, max_rotation] degrees."""
    max_translate: float = Field(0.05, ge=0, le=0.5)
    """Small affine: shift drawn up to this fraction of the image side."""
    max_scale: float = Field(0.1, ge=0, lt=1)
    """Small affine: zoom drawn from [1 - max_scale, 1 + max_scale]."""
    brightness: float = Field(0.2, ge=0, lt=1)
    """Brightness factor drawn from [1 - brightness, 1 + brightness] (image only; no colour changes on grayscale)."""
    contrast: float = Field(0.2, ge=0, lt=1)
    """Contrast factor drawn from [1 - contrast, 1 + contrast] (image only)."""


class ClassifierConfig(Section):
    RESUME_ONLY: ClassVar[frozenset[str]] = frozenset({"resume", "num_workers", "eval_batch_size"})
    """How to get there, not where: changing these neither changes the result nor wipes `last.pt`."""

    backbone: str = "dinov3"
    """`dinov3`: the DINOv3 ViT at `models.dinov3` (timm or transformers weights); `timm:<name>`: a timm model, e.g.
    `timm:vit_small_patch16_dinov3.lvd1689m`, `timm:convnext_tiny.dinov3_lvd1689m`, `timm:resnet18` (CNNs give feature maps)."""
    pretrained: bool = True
    """Start from the backbone's pretrained weights; false: same architecture, random weights (from-scratch training)."""
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra `timm.create_model` arguments, e.g. `{output_stride: 16}` or `{drop_path_rate: 0.1}`; must be empty for `dinov3`."""
    image_size: int = Field(224, ge=32)
    """Square input side (a multiple of the patch size for ViTs); the 200 px images are resized."""
    multitask: bool = True
    """Segmentation decoder + mask-guided attention pooling; false: plain classifier on the CLS/global feature."""
    decoder_channels: int = Field(128, ge=1)
    """Channels of the segmentation decoder on the patch/feature grid."""
    enhancer_dim: int = Field(256, ge=1)
    """Width of the feature enhancer between the fused features and the classifier head."""
    dropout: float = Field(0.3, ge=0, lt=1)
    """Dropout before the classifier head (half of it inside the enhancer)."""
    classification_loss: Literal["ce", "label_smoothing", "focal", "ls_focal"] = "ls_focal"
    """`ls_focal`: 1/6 label-smoothing CE + 5/6 focal loss (the seed's mix)."""
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    """Label smoothing of `label_smoothing` and `ls_focal`."""
    focal_gamma: float = Field(2.0, ge=0)
    """Focusing parameter gamma of `focal` and `ls_focal` (0 gives cross-entropy)."""
    loss_weighting: Literal["fixed", "dynamic", "uncertainty"] = "dynamic"
    """Total = alpha * classification + beta * segmentation with `fixed` alpha/beta; `dynamic`: (0.5, 1.0) before
    `switch_epoch`, (1.0, 0.3) from it on; `uncertainty`: learned log-variances (Kendall et al. 2018)."""
    alpha: float = Field(1.0, ge=0)
    """Classification loss weight of `fixed` weighting."""
    beta: float = Field(0.5, ge=0)
    """Segmentation loss weight (BCE + Dice) of `fixed` weighting."""
    switch_epoch: int = Field(10, ge=0)
    """`dynamic` weighting: first epoch (0-based) with the classification-heavy weights."""
    epochs: int = Field(30, ge=1)
    """Training epochs (both stages)."""
    freeze_epochs: int = Field(5, ge=0)
    """Stage 1: epochs with a frozen backbone (head and decoder only); then everything trains. 0 for from-scratch."""
    batch_size: int = Field(32, ge=1)
    """Images per device per micro-batch."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    learning_rate: float = Field(1e-3, gt=0)
    """Peak AdamW learning rate of the head, decoder and enhancer (and of a randomly initialised backbone)."""
    backbone_lr_scale: float = Field(0.1, gt=0)
    """Pretrained backbone's learning rate = learning_rate * this, once unfrozen (a random one uses learning_rate)."""
    weight_decay: float = Field(0.05, ge=0)
    """AdamW weight decay."""
    warmup_epochs: float = Field(1.0, ge=0)
    """Linear warm-up before the cosine decay (again for the backbone when it is unfrozen)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    class_balanced: bool = False
    """Draw training images with probability inversely proportional to their class frequency."""
    augmentation: ClassifierAugmentationConfig = Field(default_factory=ClassifierAugmentationConfig)
    """Joint image + mask augmentation of training images."""
    synthetic: Literal["none", "step4", "step5"] = "none"
    """Synthetic training images: `step4` (all generated) or `step5` (the curated set); validation and test stay real."""
    synthetic_ratio: float = Field(1.0, ge=0)
    """Synthetic images added per real training image (per class, seeded; capped by what exists)."""
    synthetic_only: bool = False
    """Train on the synthetic images alone, test on real: the generator's classification accuracy score."""
    normal_dir: Path | None = None
    """Folder of defect-free images: the task becomes binary normal/defect (split like `data.split`)."""
    own_data: Path | None = None
    """Folder in the seed guide's layout (`images/`, `masks/`, `train_labels.txt`, `val_labels.txt` [, `test_labels.txt`]);
    replaces Step 0's NEU-DET splits."""
    num_workers: int = Field(0, ge=0)
    """Data-loader worker processes (results do not depend on it)."""
    eval_batch_size: int = Field(64, ge=1)
    """Images per forward pass in evaluation."""
    max_train_minutes: float | None = Field(None, gt=0)
    """Stop after the first epoch that ends past this wall time (benchmarks under a time budget); null: all epochs."""
    resume: Literal["latest"] | None = None
    """`latest` to continue an interrupted run from `last.pt`."""

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if value != "dinov3" and not (value.startswith("timm:") and len(value) > len("timm:")):
            raise ValueError(f"classifier.backbone={value!r} must be `dinov3` or `timm:<model name>`, e.g. timm:resnet18")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ClassifierConfig:
        if self.backbone == "dinov3" and self.backbone_kwargs:
            raise ValueError("classifier.backbone_kwargs applies to timm backbones only; set it to {} for backbone=dinov3")
        if self.freeze_epochs >= self.epochs:
            raise ValueError(f"classifier.freeze_epochs={self.freeze_epochs} must be below classifier.epochs={self.epochs}")
        if self.synthetic_only and self.synthetic == "none":
            raise ValueError("classifier.synthetic_only=true needs classifier.synthetic=step4 or step5")
        return self

    @classmethod
    def outcome_keys(cls) -> list[str]:
        """Fields that change what is trained: a change re-does the step."""
        return [name for name in cls.model_fields if name not in cls.RESUME_ONLY]


class PipelineConfig(Section):
    """The whole pipeline's configuration: one section per concern."""

    run: RunConfig = Field(default_factory=RunConfig)
    """Output folder, seed, device, precision."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Where NEU-DET lives and how it is split."""
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    """Hub ids (or local folders) of every model."""
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    """Step 0: validation, masks, resized copies, YOLO export."""
    textual_inversion: TextualInversionConfig = Field(default_factory=TextualInversionConfig)
    """Step 1: one learned token per defect class."""
    captions: CaptionsConfig = Field(default_factory=CaptionsConfig)
    """Step 2: keyword ranking, BLIP-2 captions, prompts."""
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection)
    """Step 3: LoRA / DoRA fine-tuning."""
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    """Step 4: ControlNet generation."""
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    """Step 5: fidelity and diversity metrics, curation, YOLO utility, report."""
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    """Step 6: the DINOv3 attention-guided multitask classifier (train, evaluate, predict, export)."""

    @model_validator(mode="after")
    def _controlnets_exist_for_the_pipeline(self) -> PipelineConfig:
        family = self.models.pipeline
        if self.generation.union_controlnet and family != "sdxl":
            raise ValueError("generation.union_controlnet=true needs models.pipeline=sdxl (the union ControlNet is an SDXL model)")
        union_hint = " or set generation.union_controlnet=true (its modes cover every control)" if family == "sdxl" else ""
        for control, (key, model_id) in self.controlnet_ids().items():
            if model_id is None:
                raise ValueError(
                    f"generation.controls has {control!r} but {key} is null: set it to a {family} ControlNet trained on "
                    f"{self.generation.detectors[control]} maps, remove {control!r} from generation.controls{union_hint}"
                )
            if model_id in CONTROLNETS_TRAINED_ON_OTHER_MAPS:
                raise ValueError(
                    f"{key}={model_id!r} was trained on {CONTROLNETS_TRAINED_ON_OTHER_MAPS[model_id]}, not the "
                    f"{self.generation.detectors[control]} maps generation.detectors.{control} makes: set {key} to a "
                    f"ControlNet trained on them{union_hint}"
                )
        return self

    def controlnet_ids(self) -> dict[str, tuple[str, str]]:
        """Control (or `union`) -> (config key, model id) of the ControlNets Step 4 loads."""
        if self.generation.union_controlnet:
            return {"union": ("models.controlnet_union_sdxl", self.models.controlnet_union_sdxl)}
        family = self.models.pipeline
        ids = getattr(self.models, f"controlnet_{family}")
        return {control: (f"models.controlnet_{family}.{control}", getattr(ids, control)) for control in self.generation.controls}

    def section(self, dotted: str) -> Any:
        """The value at a dotted key such as `data.split`."""
        value: Any = self
        for part in dotted.split("."):
            value = getattr(value, part)
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; pass an existing YAML file with --config") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not a {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], update: dict[str, Any], origins: dict[str, str], source: str, prefix: str = "") -> None:
    """Deep-merge `update` into `base` (lists are replaced), remembering where each key came from."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            if not isinstance(base.get(key), dict):
                base[key] = {}  # recurse even into a new section, so every leaf key records its own source
            _merge(base[key], value, origins, source, f"{dotted}.")
        else:
            base[key] = value
        origins[dotted] = source


def _load_layers(path: Path, origins: dict[str, str], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config file {path} extends itself through {' -> '.join(map(str, seen))}")
    data = _read_yaml(path)
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict[str, Any] = {}
    for parent in parents:
        _merge(merged, _load_layers(path.parent / parent, origins, (*seen, path)), {}, "")
    _merge(merged, data, origins, str(path))
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value) with value parsed as YAML (`3`, `true`, `[a, b]`, `null`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' on {COMMAND_LINE} must look like key.subkey=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _apply_override(data: dict[str, Any], key: str, value: Any, origins: dict[str, str]) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}' on {COMMAND_LINE}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value
    origins[key] = COMMAND_LINE


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: Any = PipelineConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            break
        model = field.annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _explain(error: dict[str, Any], origins: dict[str, str]) -> str:
    loc = tuple(p for p in error["loc"] if not isinstance(p, int)) or ("<root>",)
    key = ".".join(str(p) for p in error["loc"])
    dotted_loc = ".".join(str(p) for p in loc)
    source = "the defaults"
    if any(name.startswith(f"{dotted_loc}.") and origin == COMMAND_LINE for name, origin in origins.items()):
        source = COMMAND_LINE  # a section-level check that a key below it, set on the command line, failed
    else:
        for i in range(len(loc), 0, -1):
            found = origins.get(".".join(str(p) for p in loc[:i]))
            if found:
                source = found
                break
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = ".".join(str(p) for p in loc[:-1]) or "the top level"
        allowed = ", ".join(_allowed_keys(loc[:-1]))
        return f"unknown config key '{key}' in {source}; allowed keys under {parent}: {allowed}"
    if kind == "value_error":  # the project's validators name the key and the value themselves
        return f"{error['ctx']['error']} (set in {source})"
    got = error.get("input")
    if kind in ("literal_error", "enum"):
        return f"invalid value {got!r} for '{key}' in {source}; allowed values: {error['ctx']['expected']}"
    return f"invalid value {got!r} for '{key}' in {source}: {error['msg']}"


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a config file (following `extends:`; None: the defaults), apply `key=value` overrides and validate."""
    origins: dict[str, str] = {}
    data = _load_layers(Path(path), origins) if path is not None else {}
    for text in overrides:
        _apply_override(data, *parse_override(text), origins)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc.errors()[0], origins)) from None


def config_hash(payload: Any) -> str:
    """Short stable hash of any JSON-able payload (configs, fingerprints)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dump_config(config: PipelineConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
