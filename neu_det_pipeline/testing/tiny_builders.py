"""The tiny networks behind :mod:`neu_det_pipeline.testing.tiny_models`, one save function per model folder.

Kept apart because importing diffusers, transformers and open_clip takes seconds, and a run whose
tiny models already exist should not pay for it.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import open_clip
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    ControlNetUnionModel,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    DINOv3ViTConfig,
    DINOv3ViTImageProcessor,
    DINOv3ViTModel,
    DPTImageProcessor,
    OPTConfig,
)

from neu_det_pipeline.models import quiet_library_progress
from neu_det_pipeline.testing.make_tokenizer_assets import (
    ASSETS_DIR,
    CLIP_TOKENIZER,
    GPT2_TOKENIZER,
)

logger = logging.getLogger(__name__)
quiet_library_progress()  # no "Writing model shards" bar per tiny model


# Shared by every tiny transformer (text encoders, ViTs, Q-Former, OPT); head dim 8.
TINY_TRANSFORMER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# The noise schedules of the real checkpoints; only the networks are shrunk.
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
SDXL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
SD15_VAE_SCALING, SDXL_VAE_SCALING = 0.18215, 0.13025
SDXL_TIME_EMBED_DIM = 8
SDXL_POOLED_DIM = 32  # text_encoder_2 projection_dim
# The conditioning embedding downsamples once per entry but the last; the VAE has 2 blocks -> factor 2.
CONTROLNET_CONDITIONING_CHANNELS = (16, 32)

CLIP_IMAGE_SIZE = 32
BLIP2_IMAGE_SIZE, BLIP2_QUERY_TOKENS = 32, 4
DINOV3_IMAGE_SIZE, DINOV3_REGISTER_TOKENS = 64, 4
DEPTH_IMAGE_SIZE = 56  # 4 x 4 patches of 14 px
OPEN_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
        # open_clip's bundled SimpleTokenizer has 49408 ids; a width of 16 keeps the embedding at 3 MB.
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD},
}


# ----------------------------------------------------------------------------------- components


def _clip_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(ASSETS_DIR / CLIP_TOKENIZER)


def _clip_text_config(tokenizer: CLIPTokenizer, **overrides: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        **TINY_TRANSFORMER,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        # The special ids of the hub's SD 1.5 / SDXL text-encoder configs: with eos_token_id=2 transformers pools at
        # the highest token id of a prompt (the pipeline must point it at the real EOS, see `pool_at_eos`).
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        **overrides,
    )


def _tiny_vae(seed: int, scaling_factor: float) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def _sd15_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        # SD 1.5 order: attention in the high-resolution blocks, none in the lowest one.
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TRANSFORMER["hidden_size"],
        attention_head_dim=4,
    )


SDXL_UNET_BLOCKS = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    # SDXL order: no attention in the highest-resolution block.
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    # Prompt embeddings are both text encoders' hidden states concatenated.
    "cross_attention_dim": 2 * TINY_TRANSFORMER["hidden_size"],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
    # Six micro-conditioning numbers (original size, crop, target size) + the pooled text embedding.
    "projection_class_embeddings_input_dim": 6 * SDXL_TIME_EMBED_DIM + SDXL_POOLED_DIM,
}
"""The SDXL UNet's down path, shared by the tiny SDXL UNet and the ControlNets built to match it."""


def _sdxl_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=32, up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), **SDXL_UNET_BLOCKS)


def _seeded_clip_text_model(
    model_class: type[CLIPTextModel] | type[CLIPTextModelWithProjection], config: CLIPTextConfig, seed: int
) -> CLIPTextModel | CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return model_class(config)


# ------------------------------------------------------------------------------------- builders


def _save_sd15(folder: Path, seed: int) -> None:
    tokenizer = _clip_tokenizer()
    pipeline = StableDiffusionPipeline(
        unet=_sd15_unet(seed),
        vae=_tiny_vae(seed, SD15_VAE_SCALING),
        text_encoder=_seeded_clip_text_model(CLIPTextModel, _clip_text_config(tokenizer), seed),
        tokenizer=tokenizer,
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)


def _save_sdxl(folder: Path, seed: int) -> None:
    tokenizer = _clip_tokenizer()
    pipeline = StableDiffusionXLPipeline(
        unet=_sdxl_unet(seed),
        vae=_tiny_vae(seed, SDXL_VAE_SCALING),
        text_encoder=_seeded_clip_text_model(CLIPTextModel, _clip_text_config(tokenizer), seed),
        text_encoder_2=_seeded_clip_text_model(
            CLIPTextModelWithProjection, _clip_text_config(tokenizer, projection_dim=SDXL_POOLED_DIM), seed
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
    )
    pipeline.save_pretrained(folder)


def _randomise_zero_outputs(layers: list[torch.nn.Module], seed: int) -> None:
    """ControlNets start with zero output layers, which would make them a no-op; random ones (different per
    control type) let tests see the control image steer generation."""
    generator = torch.Generator().manual_seed(seed)
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=0.1, generator=generator)


def _save_controlnet(folder: Path, seed: int, base_unet: Callable[[int], UNet2DConditionModel], control: str) -> None:
    unet = base_unet(seed)
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONTROLNET_CONDITIONING_CHANNELS)
    zero_layers = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    _randomise_zero_outputs(zero_layers, seed + zlib.crc32(control.encode()))
    controlnet.save_pretrained(folder)


def _save_controlnet_union(folder: Path, seed: int) -> None:
    """An SDXL union ControlNet (xinsir/controlnet-union-sdxl-1.0 layout): one model, a control-type embedding."""
    torch.manual_seed(seed)
    width = SDXL_UNET_BLOCKS["block_out_channels"][0]
    controlnet = ControlNetUnionModel(
        **SDXL_UNET_BLOCKS, conditioning_embedding_out_channels=CONTROLNET_CONDITIONING_CHANNELS,
        num_trans_channel=width, num_proj_channel=width, num_trans_head=2,
    )
    zero_layers = [
        controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
        controlnet.spatial_ch_projs,
    ]
    _randomise_zero_outputs(zero_layers, seed + zlib.crc32(b"union"))
    controlnet.save_pretrained(folder)


def _save_annotators(folder: Path, seed: int) -> None:
    """A PiDiNet soft-edge annotator under the file name lllyasviel/Annotators uses (`PidiNetDetector.from_pretrained`).

    The other annotators' networks are large (HED 15 M, NormalBae 72 M parameters); tests build those in place.
    """
    from neu_det_pipeline.generation.controls import controlnet_aux_modules

    torch.manual_seed(seed)
    network = controlnet_aux_modules().pidi.pidinet()
    torch.save({"state_dict": network.state_dict()}, folder / "table5_pidinet.pth")


def _save_clip(folder: Path, seed: int) -> None:
    tokenizer = _clip_tokenizer()
    config = CLIPConfig(
        text_config=_clip_text_config(tokenizer).to_dict(),
        vision_config=CLIPVisionConfig(**TINY_TRANSFORMER, image_size=CLIP_IMAGE_SIZE, patch_size=8).to_dict(),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": CLIP_IMAGE_SIZE}, crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def _save_blip2(folder: Path, seed: int) -> None:
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": BLIP2_IMAGE_SIZE, "width": BLIP2_IMAGE_SIZE}),
        tokenizer=AutoTokenizer.from_pretrained(ASSETS_DIR / GPT2_TOKENIZER),
        num_query_tokens=BLIP2_QUERY_TOKENS,
    )
    tokenizer = processor.tokenizer  # now holds the "<image>" token the processor adds
    hidden_size = TINY_TRANSFORMER["hidden_size"]
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**TINY_TRANSFORMER, image_size=BLIP2_IMAGE_SIZE, patch_size=8).to_dict(),
        qformer_config=Blip2QFormerConfig(
            **TINY_TRANSFORMER, encoder_hidden_size=hidden_size, cross_attention_frequency=1
        ).to_dict(),
        text_config=OPTConfig(
            hidden_size=hidden_size,
            ffn_dim=TINY_TRANSFORMER["intermediate_size"],
            num_hidden_layers=TINY_TRANSFORMER["num_hidden_layers"],
            num_attention_heads=TINY_TRANSFORMER["num_attention_heads"],
            word_embed_proj_dim=hidden_size,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ).to_dict(),
        num_query_tokens=BLIP2_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


def _save_open_clip(folder: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**OPEN_CLIP_CONFIG["model_cfg"])
    # The file name open_clip looks for first in a local-dir (and that the LAION hub repos use).
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CONFIG, indent=2) + "\n", encoding="utf-8")


def _save_dinov3(folder: Path, seed: int) -> None:
    config = DINOv3ViTConfig(
        **TINY_TRANSFORMER, patch_size=16, image_size=DINOV3_IMAGE_SIZE, num_register_tokens=DINOV3_REGISTER_TOKENS
    )
    torch.manual_seed(seed)
    DINOv3ViTModel(config).save_pretrained(folder)
    DINOv3ViTImageProcessor(size={"height": DINOV3_IMAGE_SIZE, "width": DINOV3_IMAGE_SIZE}).save_pretrained(folder)


def _save_dinov3_timm(folder: Path, seed: int) -> None:
    """timm's DINOv3 ViT-S/16 architecture, only its sizes shrunk, saved by timm's own `save_for_hf` (config.json
    with `architecture` + model.safetensors), the layout of `timm/vit_small_patch16_dinov3.lvd1689m`."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_small_patch16_dinov3",
        pretrained=False,
        num_classes=0,
        embed_dim=TINY_TRANSFORMER["hidden_size"],
        depth=TINY_TRANSFORMER["num_hidden_layers"],
        num_heads=TINY_TRANSFORMER["num_attention_heads"],
        img_size=DINOV3_IMAGE_SIZE,
    )
    save_for_hf(model, folder, safe_serialization=True, data_config={"input_size": (3, DINOV3_IMAGE_SIZE, DINOV3_IMAGE_SIZE)})


def _save_depth(folder: Path, seed: int) -> None:
    # Four backbone stages at four scales, like Depth Anything V2; the neck fuses them coarse to fine.
    backbone = Dinov2Config(
        **{**TINY_TRANSFORMER, "num_hidden_layers": 4},
        image_size=DEPTH_IMAGE_SIZE,
        patch_size=14,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        reassemble_hidden_size=TINY_TRANSFORMER["hidden_size"],
        reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_sizes=[8, 16, 32, 64],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    torch.manual_seed(seed)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(
        size={"height": DEPTH_IMAGE_SIZE, "width": DEPTH_IMAGE_SIZE},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    ).save_pretrained(folder)


BUILDERS: dict[str, Callable[[Path, int], None]] = {
    "sd15": _save_sd15,
    "sdxl": _save_sdxl,
    **{
        f"controlnet-sd15-{control}": partial(_save_controlnet, base_unet=_sd15_unet, control=control)
        for control in ("softedge", "depth", "normal")
    },
    **{
        f"controlnet-sdxl-{control}": partial(_save_controlnet, base_unet=_sdxl_unet, control=control)
        for control in ("softedge", "depth")
    },
    "controlnet-sdxl-union": _save_controlnet_union,
    "annotators": _save_annotators,
    "clip": _save_clip,
    "blip2": _save_blip2,
    "open_clip": _save_open_clip,
    "dinov3": _save_dinov3,
    "dinov3-timm": _save_dinov3_timm,
    "depth": _save_depth,
}
