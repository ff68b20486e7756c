"""`models`: hub ids (or local folders) of every model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from neu_det_pipeline.config.base import Section


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
    pipeline: Literal["sd15", "sdxl", "sd3"] = "sd15"
    """Base diffusion family used by steps 1-4 (`sd3`: experimental, Step 4 only, see `models.sd3`)."""
    sd15: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Stable Diffusion 1.5 pipeline (hub id or local folder in hub layout)."""
    sdxl: str = "stabilityai/stable-diffusion-xl-base-1.0"
    """SDXL base pipeline (hub id or local folder)."""
    sd15_inpaint: str | None = None
    """Step 4 inpaint modes on SD 1.5: a dedicated inpainting checkpoint (9-channel UNet), e.g.
    `stable-diffusion-v1-5/stable-diffusion-inpainting`; null: `models.sd15` (a 4-channel UNet, which the pipeline
    inpaints by blending the noised source into the latents at every step)."""
    sdxl_inpaint: str | None = None
    """Step 4 inpaint modes on SDXL: a dedicated inpainting checkpoint (9-channel UNet), e.g.
    `diffusers/stable-diffusion-xl-1.0-inpainting-0.1`; null: `models.sdxl`."""
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
    # --- SD3 Medium (experimental, `models.pipeline: sd3`: Step 4 only)
    sd3: str = "stabilityai/stable-diffusion-3-medium-diffusers"
    """Stable Diffusion 3 Medium (MMDiT transformer, CLIP-L + CLIP-G + T5-XXL, 16-channel VAE, flow matching); gated:
    accept its licence on the hub page and `hf auth login` before the first download."""
    controlnet_sd3: ControlNetIds = Field(
        default_factory=lambda: ControlNetIds(canny="InstantX/SD3-Controlnet-Canny", depth="InstantX/SD3-Controlnet-Depth")
    )
    """SD3 Medium ControlNets (`SD3ControlNetModel`, InstantX, 1024 px): canny on Canny edges, depth on depth maps. softedge
    and normal are null: no public SD3 Medium ControlNet is trained on soft edges or normals (InstantX also has tile and pose)."""
    clip: str = "openai/clip-vit-large-patch14"
    """CLIP model for keyword ranking and CLIP score (ViT-L/14; `-336` also works)."""
    open_clip: str = "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """OpenCLIP model for ranking ensembles (`hf-hub:org/repo` or `local-dir:path`)."""
    blip2: str = "Salesforce/blip2-opt-2.7b"
    """BLIP-2 captioning model."""
    llava: str = "llava-hf/llava-1.5-7b-hf"
    """LLaVA-1.5 (`LlavaForConditionalGeneration`) for `captions.prompt_style: llava`'s structured descriptions."""
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
