"""Tiny, randomly initialised stand-ins for every pretrained model the pipeline loads.

Each model is saved in the Hugging Face hub layout of the real checkpoint it replaces, so the
pipeline loads a folder from here through exactly the code it uses for a hub id:

    sd15                   StableDiffusionPipeline folder (SD 1.5 layout), also for
                           StableDiffusionControlNetPipeline.from_pretrained(folder, controlnet=[...])
    sd15-inpaint           the same with a 9-channel UNet (stable-diffusion-v1-5/stable-diffusion-inpainting), for
                           the ControlNet inpainting pipeline's dedicated-checkpoint path (`models.sd15_inpaint`)
    sdxl                   StableDiffusionXLPipeline folder (two text encoders), also for the ControlNet variant
    sdxl-inpaint           the same with a 9-channel UNet (diffusers/stable-diffusion-xl-1.0-inpainting-0.1), for
                           `models.sdxl_inpaint`
    controlnet-sd15-*      ControlNetModel matching sd15: softedge, depth, normal
    controlnet-sdxl-*      ControlNetModel matching sdxl: softedge, depth (the diffusers SDXL ControlNet
                           architecture); ControlNetUnionModel: union (xinsir's, 6 control types)
    annotators             controlnet_aux annotator weights (lllyasviel/Annotators file names): PiDiNet
    clip                   CLIPModel + CLIPProcessor
    blip2                  Blip2ForConditionalGeneration (OPT language model) + Blip2Processor
    open_clip              open_clip.create_model_and_transforms / get_tokenizer("local-dir:<folder>"),
                           standing in for "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    dinov3                 AutoModel (DINOv3ViTModel) + AutoImageProcessor; DINOv3ViTBackbone.from_pretrained
                           also works (AutoBackbone does not: in transformers 5.23 it rejects local folders);
                           stands in for the transformers form, "facebook/dinov3-vits16-pretrain-lvd1689m"
    dinov3-timm            timm.create_model("local-dir:<folder>") (timm's save_for_hf layout), standing in for
                           "timm/vit_small_patch16_dinov3.lvd1689m", the default models.dinov3
    depth                  AutoModelForDepthEstimation (Depth Anything) + AutoImageProcessor,
                           also pipeline("depth-estimation", model=folder)
    sd3                    StableDiffusion3Pipeline folder (SD3 Medium layout: MMDiT transformer, CLIP-L + CLIP-G + T5,
                           16-channel VAE), also for StableDiffusion3ControlNetPipeline
    controlnet-sd3-*       SD3ControlNetModel matching sd3 (SD3ControlNetModel.from_transformer): canny, depth
    llava                  LlavaForConditionalGeneration (Llama language model) + LlavaProcessor with the real chat
                           template, standing in for "llava-hf/llava-1.5-7b-hf"

Each model is its real checkpoint's configuration (``neu_det_pipeline/testing/real_configs``, sources in
its SOURCES.md) with only size fields changed (``tiny_builders.SIZE_FIELDS``, checked by
``tests/test_tiny_models.py``), so the tiny models take the real models' code paths: SD 1.5's four UNet
blocks, SDXL's three with `text_time` embeddings, the text encoders' `eos_token_id: 2`, the real CLIP
tokenizer (49408 ids, 77 positions; SDXL's second one pads with `!`), DINOv3's 4 register tokens and
BLIP-2's 32 query tokens. Images are 64 px for the diffusion models (UNet sample 32, VAE scale factor 2:
the VAE keeps 2 of its 4 blocks), 56 px for CLIP, BLIP-2 and Depth Anything (4 x 4 patches of 14 px)
and 64 px for DINOv3 (4 x 4 patches of 16 px). Components are built with ``torch.manual_seed(seed)``
before each one, as in the diffusers and transformers test suites, so a seed gives byte-identical weights.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

TINY_MODEL_NAMES: tuple[str, ...] = (
    "sd15",
    "sd15-inpaint",
    "sdxl",
    "sdxl-inpaint",
    "controlnet-sd15-softedge",
    "controlnet-sd15-depth",
    "controlnet-sd15-normal",
    "controlnet-sdxl-softedge",
    "controlnet-sdxl-depth",
    "controlnet-sdxl-union",
    "annotators",
    "clip",
    "blip2",
    "open_clip",
    "dinov3",
    "dinov3-timm",
    "depth",
    "llava",
    "sd3",
    "controlnet-sd3-canny",
    "controlnet-sd3-depth",
)


def build_tiny_models(out_dir: str | Path, seed: int = 0, only: Iterable[str] | None = None) -> dict[str, Path]:
    """Build the tiny models named in ``only`` (default: all of :data:`TINY_MODEL_NAMES`) under
    ``out_dir/<name>/`` and return name -> folder.

    Each model is written to a hidden sibling folder and renamed into place when complete, so a
    crash never leaves a half-written model behind. Existing model folders are kept as they are
    (whatever seed built them), which makes a repeated call nearly free.
    """
    names = _selected_names(only)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folders = {name: out_dir / name for name in names}
    for name, folder in folders.items():
        if not folder.is_dir():
            _build_into_place(name, folder, seed)
    return folders


def _selected_names(only: Iterable[str] | None) -> list[str]:
    if only is None:
        return list(TINY_MODEL_NAMES)
    requested = {only} if isinstance(only, str) else set(only)
    unknown = sorted(requested - set(TINY_MODEL_NAMES))
    if unknown:
        raise ValueError(f"unknown tiny model name(s) {unknown}; allowed: {', '.join(TINY_MODEL_NAMES)}")
    return [name for name in TINY_MODEL_NAMES if name in requested]


def _build_into_place(name: str, folder: Path, seed: int) -> None:
    staging = folder.with_name(f".{name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # left by a crashed earlier process with the same pid
    staging.mkdir()
    logger.info("building tiny model %s into %s", name, folder)
    try:
        # Imported here: diffusers, transformers and open_clip take seconds, needed only for a missing model.
        from neu_det_pipeline.testing.tiny_builders import BUILDERS

        BUILDERS[name](staging, seed)
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
            # Another process finished the same model first; its copy is equally valid.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
