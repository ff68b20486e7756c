"""The tiny networks behind :mod:`neu_det_pipeline.testing.tiny_models`, one save function per model folder.

Every tiny model is its real checkpoint's configuration (kept under ``real_configs/``, sources in
``real_configs/SOURCES.md``) with only size fields changed: widths, depths, heads, vocabulary, image size, and
dimensions that must follow them (cross-attention widths, SDXL's pooled-embedding input). :data:`SIZE_FIELDS`
lists, per configuration kind, the only fields a tiny model may change; ``tests/test_tiny_models.py`` compares
every tiny configuration with its real one and fails on any other difference, so tests walk the code
branches the real models take (CLIP's `eos_token_id: 2` pooling, SDXL's `force_upcast` VAE, the second
tokenizer's `!` padding, BLIP-2's newline end token, ...).

Kept apart because importing diffusers, transformers and open_clip takes seconds, and a run whose
tiny models already exist should not pay for it.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import open_clip
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    ControlNetUnionModel,
    EulerDiscreteScheduler,
    ModelMixin,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from neu_det_pipeline.captions.clip_tokens import write_clip_vocabulary
from neu_det_pipeline.models import quiet_library_progress
from neu_det_pipeline.testing.make_tokenizer_assets import ASSETS_DIR, GPT2_TOKENIZER

quiet_library_progress()  # no "Writing model shards" bar per tiny model

REAL_CONFIGS_DIR = Path(__file__).resolve().parent / "real_configs"

# ------------------------------------------------------------------------- what a tiny model may change


def _nested(prefix: str, fields: frozenset[str]) -> frozenset[str]:
    return frozenset(f"{prefix}.{field}" for field in fields)


_TRANSFORMER = frozenset({"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"})
_CLIP_TEXT = _TRANSFORMER | {"projection_dim"}  # vocab_size and max_position_embeddings stay: the real tokenizer
_VIT = _TRANSFORMER | {"image_size"}
_UNET_WIDTHS = frozenset({
    "block_out_channels", "layers_per_block", "attention_head_dim", "transformer_layers_per_block",
    # Cross-attention reads the text encoders' (tiny) hidden states; SDXL's added embedding reads its time
    # embedding width and the pooled text embedding, so both follow the tiny widths.
    "cross_attention_dim", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
})  # fmt: skip

SIZE_FIELDS: dict[str, frozenset[str]] = {
    "unet": _UNET_WIDTHS | {"sample_size"},
    # The VAE keeps its block type but has 2 blocks (scale factor 2) instead of 4, so 64 px images have 32 px latents.
    "vae": frozenset({"block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "sample_size"}),
    # As many conditioning-embedding stages as the tiny VAE has blocks (the control image meets the latents).
    "controlnet": _UNET_WIDTHS | {"conditioning_embedding_out_channels"},
    # The union ControlNet's control-type transformer is as wide as the first UNet block.
    "controlnet_union": _UNET_WIDTHS | {"conditioning_embedding_out_channels", "num_trans_channel", "num_proj_channel"},
    "clip_text": _CLIP_TEXT,
    "clip": frozenset({"projection_dim"}) | _nested("text_config", _CLIP_TEXT) | _nested("vision_config", _VIT | {"projection_dim"}),
    "blip2": (
        _nested("vision_config", _VIT)
        | _nested("qformer_config", _TRANSFORMER | {"encoder_hidden_size"})
        # The OPT vocabulary is a small byte-level stand-in (no OPT tokenizer offline), so the ids that name
        # tokens in it (end token = newline, `<image>`) move with it.
        | _nested("text_config", {"hidden_size", "ffn_dim", "num_hidden_layers", "num_attention_heads",
                                  "word_embed_proj_dim", "vocab_size", "eos_token_id"})
        | {"image_token_index"}
    ),  # fmt: skip
    "dinov3": frozenset({"hidden_size", "intermediate_size", "num_attention_heads", "image_size"}),
    "depth_anything": (
        _nested("backbone_config", {"hidden_size", "num_attention_heads", "image_size"})
        | {"reassemble_hidden_size", "neck_hidden_sizes", "fusion_hidden_size", "head_hidden_size"}
    ),
    "image_processor": frozenset({"size", "crop_size"}),
}
"""Configuration kind -> the size fields a tiny model may change (dotted paths inside nested configs)."""

METADATA_FIELDS = frozenset({
    "_name_or_path", "_diffusers_version", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
    "processor_class",
})  # fmt: skip
"""Fields that record where and how a file was written, not what the model is: never compared."""


@dataclass(frozen=True)
class DerivedConfig:
    """One configuration file of a tiny model and the real file it is derived from."""

    tiny_model: str
    """Folder under the tiny-model root (a :data:`~neu_det_pipeline.testing.tiny_models.TINY_MODEL_NAMES` entry)."""
    file: str
    """Path inside the tiny model's folder."""
    real: str
    """Path under :data:`REAL_CONFIGS_DIR`."""
    kind: str
    """:data:`SIZE_FIELDS` key."""


def _pipeline_files(tiny_model: str, real: str, text_encoders: tuple[str, ...]) -> list[DerivedConfig]:
    files = [DerivedConfig(tiny_model, "unet/config.json", f"{real}/unet/config.json", "unet"),
             DerivedConfig(tiny_model, "vae/config.json", f"{real}/vae/config.json", "vae")]
    files += [DerivedConfig(tiny_model, f"{name}/config.json", f"{real}/{name}/config.json", "clip_text") for name in text_encoders]
    return files


DERIVED_CONFIGS: list[DerivedConfig] = [
    *_pipeline_files("sd15", "sd15", ("text_encoder",)),
    *_pipeline_files("sdxl", "sdxl", ("text_encoder", "text_encoder_2")),
    # The inpainting checkpoint: SD 1.5's VAE and text encoder, a UNet with 9 input channels (latents, mask, masked image).
    DerivedConfig("sd15-inpaint", "unet/config.json", "sd15-inpaint/unet/config.json", "unet"),
    DerivedConfig("sd15-inpaint", "vae/config.json", "sd15/vae/config.json", "vae"),
    DerivedConfig("sd15-inpaint", "text_encoder/config.json", "sd15/text_encoder/config.json", "clip_text"),
    # SDXL's inpainting checkpoint: the base model's VAE and text encoders, a UNet with 9 input channels.
    DerivedConfig("sdxl-inpaint", "unet/config.json", "sdxl-inpaint/unet/config.json", "unet"),
    DerivedConfig("sdxl-inpaint", "vae/config.json", "sdxl/vae/config.json", "vae"),
    DerivedConfig("sdxl-inpaint", "text_encoder/config.json", "sdxl/text_encoder/config.json", "clip_text"),
    DerivedConfig("sdxl-inpaint", "text_encoder_2/config.json", "sdxl/text_encoder_2/config.json", "clip_text"),
    DerivedConfig("controlnet-sd15-softedge", "config.json", "controlnet-sd15-softedge/config.json", "controlnet"),
    DerivedConfig("controlnet-sd15-depth", "config.json", "controlnet-sd15-depth/config.json", "controlnet"),
    DerivedConfig("controlnet-sd15-normal", "config.json", "controlnet-sd15-normal/config.json", "controlnet"),
    # The SDXL soft-edge stand-in has the diffusers SDXL ControlNet architecture (see SOURCES.md).
    DerivedConfig("controlnet-sdxl-softedge", "config.json", "controlnet-sdxl-canny/config.json", "controlnet"),
    DerivedConfig("controlnet-sdxl-depth", "config.json", "controlnet-sdxl-depth/config.json", "controlnet"),
    DerivedConfig("controlnet-sdxl-union", "config.json", "controlnet-sdxl-union/config.json", "controlnet_union"),
    DerivedConfig("clip", "config.json", "clip/config.json", "clip"),
    DerivedConfig("clip", "preprocessor_config.json", "clip/preprocessor_config.json", "image_processor"),
    DerivedConfig("blip2", "config.json", "blip2/config.json", "blip2"),
    DerivedConfig("blip2", "preprocessor_config.json", "blip2/preprocessor_config.json", "image_processor"),
    DerivedConfig("dinov3", "config.json", "dinov3/config.json", "dinov3"),
    DerivedConfig("dinov3", "preprocessor_config.json", "dinov3/preprocessor_config.json", "image_processor"),
    DerivedConfig("depth", "config.json", "depth/config.json", "depth_anything"),
    DerivedConfig("depth", "preprocessor_config.json", "depth/preprocessor_config.json", "image_processor"),
]
"""Every tiny configuration file and its real counterpart, for the difference test."""

# ------------------------------------------------------------------------------------ size overrides

TEXT_WIDTH = 32
TINY_TEXT = {"hidden_size": TEXT_WIDTH, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "projection_dim": TEXT_WIDTH}  # fmt: skip
"""CLIP text encoders: head dim 8; the vocabulary stays CLIP's 49408 ids (the real tokenizer)."""
TINY_VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}

SD15_UNET = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "cross_attention_dim": TEXT_WIDTH}
SDXL_TIME_EMBED_DIM = 8
SDXL_UNET = {
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": [2, 4, 8],
    "transformer_layers_per_block": [1, 1, 2],  # the last block and the mid block stack two transformer layers
    # Prompt embeddings are both text encoders' hidden states concatenated.
    "cross_attention_dim": 2 * TEXT_WIDTH,
    "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
    # Six micro-conditioning numbers (original size, crop, target size) + text_encoder_2's pooled projection.
    "projection_class_embeddings_input_dim": 6 * SDXL_TIME_EMBED_DIM + TEXT_WIDTH,
}
UNET_SAMPLE_SIZE = 32
VAE = {"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
       "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "sample_size": 64}  # fmt: skip
# One entry per VAE block: the conditioning embedding downsamples once per entry but the last -> factor 2.
CONTROLNET_CONDITIONING_CHANNELS = [16, 32]

CLIP_IMAGE_SIZE = 56  # 4 x 4 patches of CLIP ViT-L/14's 14 px
CLIP_PROJECTION = 16
BLIP2_IMAGE_SIZE = 56  # 4 x 4 patches of 14 px
DINOV3_IMAGE_SIZE = 64  # 4 x 4 patches of 16 px
DINOV3 = {"hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 4, "image_size": DINOV3_IMAGE_SIZE}
DEPTH_IMAGE_SIZE = 56  # 4 x 4 patches of 14 px
DEPTH = {
    "backbone_config": {"hidden_size": 32, "num_attention_heads": 4, "image_size": DEPTH_IMAGE_SIZE},
    "reassemble_hidden_size": 32,
    "neck_hidden_sizes": [8, 16, 32, 64],
    "fusion_hidden_size": 16,
    "head_hidden_size": 8,
}

OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
OPEN_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
        # open_clip's bundled SimpleTokenizer has 49408 ids; a width of 16 keeps the embedding at 3 MB.
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD},
}


def real_config(path: str) -> dict[str, Any]:
    return json.loads((REAL_CONFIGS_DIR / path).read_text(encoding="utf-8"))


def derived_config(path: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The real configuration at `path` with `overrides` applied (nested configs are updated key by key)."""
    return _merged(real_config(path), overrides)


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------- components


def _seeded(build: Callable[[], Any], seed: int) -> Any:
    torch.manual_seed(seed)
    return build()


def _write_clip_tokenizer(folder: Path, real_tokenizer: str) -> None:
    """The real CLIP tokenizer in hub layout: open_clip's BPE vocabulary as vocab.json + merges.txt, and the real
    folder's tokenizer_config.json (and special_tokens_map.json where the hub has one)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_clip_vocabulary(folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (REAL_CONFIGS_DIR / real_tokenizer / name).is_file():
            shutil.copyfile(REAL_CONFIGS_DIR / real_tokenizer / name, folder / name)


def clip_tokenizer(real_tokenizer: str) -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as folder:
        _write_clip_tokenizer(Path(folder), real_tokenizer)
        return CLIPTokenizer.from_pretrained(folder)


def _clip_text_config(real: str) -> CLIPTextConfig:
    # SDXL's files say float16 (the weights on the hub are float32), and transformers builds some submodules
    # in the config's dtype: the tiny weights are float32 like the hub's.
    return CLIPTextConfig.from_dict(derived_config(real, {**TINY_TEXT, "torch_dtype": "float32"}))


def _vae(real: str, seed: int) -> AutoencoderKL:
    return _seeded(lambda: AutoencoderKL.from_config(derived_config(real, VAE)), seed)


def _unet(real: str, overrides: dict[str, Any], seed: int) -> UNet2DConditionModel:
    config = derived_config(real, {**overrides, "sample_size": UNET_SAMPLE_SIZE})
    # The inpainting config was saved by diffusers 0.6: with that stamp and the shrunk sample size diffusers warns
    # that the checkpoint predates 0.9 (the real one, at 64, does not). The stamp is metadata, not a size.
    config.pop("_diffusers_version", None)
    return _seeded(lambda: UNet2DConditionModel.from_config(config), seed)


_sd15_unet = partial(_unet, "sd15/unet/config.json", SD15_UNET)
_sd15_inpaint_unet = partial(_unet, "sd15-inpaint/unet/config.json", SD15_UNET)
_sdxl_unet = partial(_unet, "sdxl/unet/config.json", SDXL_UNET)
_sdxl_inpaint_unet = partial(_unet, "sdxl-inpaint/unet/config.json", SDXL_UNET)


# ------------------------------------------------------------------------------------------- builders


def save_pipeline(pipeline: Any, folder: Path, tokenizers: dict[str, str]) -> None:
    """`save_pretrained`, then the tokenizer folders as on the hub (vocab.json, merges.txt and the real
    tokenizer_config.json rather than transformers' tokenizer.json), so loading converts them as it does there."""
    pipeline.save_pretrained(folder)
    for name, real in tokenizers.items():
        shutil.rmtree(folder / name)
        _write_clip_tokenizer(folder / name, real)


def _save_sd15(folder: Path, seed: int, unet: Callable[[int], UNet2DConditionModel] = _sd15_unet) -> None:
    tokenizer = clip_tokenizer("sd15/tokenizer")
    text_config = _clip_text_config("sd15/text_encoder/config.json")
    pipeline = StableDiffusionPipeline(
        unet=unet(seed),
        vae=_vae("sd15/vae/config.json", seed),
        text_encoder=_seeded(lambda: CLIPTextModel(text_config), seed),
        tokenizer=tokenizer,
        scheduler=PNDMScheduler.from_config(real_config("sd15/scheduler/scheduler_config.json")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pipeline(pipeline, folder, {"tokenizer": "sd15/tokenizer"})


def _save_sdxl(folder: Path, seed: int, unet: Callable[[int], UNet2DConditionModel] = _sdxl_unet,
               pipeline_class: type = StableDiffusionXLPipeline) -> None:
    tokenizer = clip_tokenizer("sdxl/tokenizer")
    tokenizer_2 = clip_tokenizer("sdxl/tokenizer_2")  # pads with "!", as on the hub
    text_config = _clip_text_config("sdxl/text_encoder/config.json")
    text_config_2 = _clip_text_config("sdxl/text_encoder_2/config.json")
    pipeline = pipeline_class(
        unet=unet(seed),
        vae=_vae("sdxl/vae/config.json", seed),
        text_encoder=_seeded(lambda: CLIPTextModel(text_config), seed),
        text_encoder_2=_seeded(lambda: CLIPTextModelWithProjection(text_config_2), seed),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=EulerDiscreteScheduler.from_config(real_config("sdxl/scheduler/scheduler_config.json")),
    )
    save_pipeline(pipeline, folder, {"tokenizer": "sdxl/tokenizer", "tokenizer_2": "sdxl/tokenizer_2"})


def _copy_unet_weights(controlnet: ModelMixin, unet: UNet2DConditionModel) -> None:
    """What `ControlNetModel.from_unet` copies: a ControlNet starts as its UNet's encoder half."""
    for name in ("conv_in", "time_proj", "time_embedding", "add_embedding"):
        if hasattr(controlnet, name):
            getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
    controlnet.down_blocks.load_state_dict(unet.down_blocks.state_dict(), strict=False)
    controlnet.mid_block.load_state_dict(unet.mid_block.state_dict(), strict=False)


def _randomise_zero_outputs(layers: list[torch.nn.Module], seed: int) -> None:
    """ControlNets start with zero output layers, which would make them a no-op; random ones (different per
    control type) let tests see the control image steer generation."""
    generator = torch.Generator().manual_seed(seed)
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=0.1, generator=generator)


def _zero_layers(controlnet: ModelMixin) -> list[torch.nn.Module]:
    layers = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    return [*layers, controlnet.spatial_ch_projs] if isinstance(controlnet, ControlNetUnionModel) else layers


def _save_controlnet(
    folder: Path,
    seed: int,
    real: str,
    unet_overrides: dict[str, Any],
    base_unet: Callable[[int], UNet2DConditionModel],
    control: str,
    model_class: type[ModelMixin] = ControlNetModel,
    extra_overrides: dict[str, Any] | None = None,
) -> None:
    overrides = {**unet_overrides, "conditioning_embedding_out_channels": CONTROLNET_CONDITIONING_CHANNELS, **(extra_overrides or {})}
    config = derived_config(real, overrides)
    controlnet = _seeded(lambda: model_class.from_config(config), seed)
    _copy_unet_weights(controlnet, base_unet(seed))
    _randomise_zero_outputs(_zero_layers(controlnet), seed + zlib.crc32(control.encode()))
    controlnet.save_pretrained(folder)
    # xinsir's union files name ControlNetModel (written before diffusers had ControlNetUnionModel); keep the
    # hub's class name, which ControlNetUnionModel.from_pretrained ignores.
    saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    _write_json(folder / "config.json", {**saved, "_class_name": real_config(real)["_class_name"]})


def _save_annotators(folder: Path, seed: int) -> None:
    """A PiDiNet soft-edge annotator under the file name lllyasviel/Annotators uses (`PidiNetDetector.from_pretrained`).

    The other annotators' networks are large (HED 15 M, NormalBae 72 M parameters); tests build those in place.
    """
    from neu_det_pipeline.generation.controls import controlnet_aux_modules

    torch.manual_seed(seed)
    network = controlnet_aux_modules().pidi.pidinet()
    torch.save({"state_dict": network.state_dict()}, folder / "table5_pidinet.pth")


def _save_image_processor(folder: Path, real: str, size: int) -> None:
    """The real preprocessor_config.json at the tiny image size (in the file's own format: int or height/width)."""
    content = real_config(real)
    for key in SIZE_FIELDS["image_processor"]:
        if isinstance(content.get(key), dict):
            content[key] = {axis: size for axis in content[key]}
        elif content.get(key) is not None:
            content[key] = size
    _write_json(folder / "preprocessor_config.json", content)


def _save_clip(folder: Path, seed: int) -> None:
    tiny_vision = {**TINY_VIT, "image_size": CLIP_IMAGE_SIZE}
    config = derived_config("clip/config.json", {
        "projection_dim": CLIP_PROJECTION, "text_config": TINY_TEXT, "vision_config": tiny_vision,
        # The hub file repeats the sizes in legacy `*_config_dict` entries, which transformers reads instead of
        # `*_config` (so CLIP ViT-L/14 loads with CLIPTextConfig's default eos_token_id 49407, not the file's 2).
        "text_config_dict": TINY_VIT, "vision_config_dict": tiny_vision,
    })  # fmt: skip
    _seeded(lambda: CLIPModel(CLIPConfig.from_dict(config)), seed).save_pretrained(folder)
    _write_clip_tokenizer(folder, "clip")
    _save_image_processor(folder, "clip/preprocessor_config.json", CLIP_IMAGE_SIZE)


def _save_blip2(folder: Path, seed: int) -> None:
    _save_image_processor(folder, "blip2/preprocessor_config.json", BLIP2_IMAGE_SIZE)
    processor = Blip2Processor(
        image_processor=AutoImageProcessor.from_pretrained(folder),
        tokenizer=AutoTokenizer.from_pretrained(ASSETS_DIR / GPT2_TOKENIZER),
        num_query_tokens=real_config("blip2/processor_config.json")["num_query_tokens"],
    )
    tokenizer = processor.tokenizer  # now holds the "<image>" token the processor adds
    newline = tokenizer.convert_tokens_to_ids("Ċ")  # byte-level "\n": OPT-2.7b's end token in BLIP-2 (50118)
    config = derived_config("blip2/config.json", {
        "vision_config": {**TINY_VIT, "image_size": BLIP2_IMAGE_SIZE},
        "qformer_config": {**TINY_VIT, "encoder_hidden_size": TINY_VIT["hidden_size"]},
        "text_config": {
            "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "word_embed_proj_dim": 32,
            "vocab_size": len(tokenizer), "eos_token_id": newline,
        },
        "image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
    })  # fmt: skip
    _seeded(lambda: Blip2ForConditionalGeneration(Blip2Config.from_dict(config)), seed).save_pretrained(folder)
    processor.save_pretrained(folder)


def _save_open_clip(folder: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**OPEN_CLIP_CONFIG["model_cfg"])
    # The file name open_clip looks for first in a local-dir (and that the LAION hub repos use).
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CONFIG, indent=2) + "\n", encoding="utf-8")


def _save_dinov3(folder: Path, seed: int) -> None:
    config = DINOv3ViTConfig.from_dict(derived_config("dinov3/config.json", DINOV3))
    _seeded(lambda: DINOv3ViTModel(config), seed).save_pretrained(folder)
    _save_image_processor(folder, "dinov3/preprocessor_config.json", DINOV3_IMAGE_SIZE)


DINOV3_TIMM_SIZES = {"embed_dim": 32, "depth": 2, "num_heads": 4, "img_size": DINOV3_IMAGE_SIZE}
"""The only `timm.create_model` arguments the tiny timm DINOv3 changes: its architecture name (and so every other
setting: rotary embeddings, 4 registers, layer scale, SwiGLU-free MLP) comes from the real config.json."""


def _save_dinov3_timm(folder: Path, seed: int) -> None:
    """`timm/vit_small_patch16_dinov3.lvd1689m`: its real config's architecture with only the sizes shrunk, saved by
    timm's own `save_for_hf` (config.json with `architecture` + model.safetensors), the hub repo's layout."""
    import timm
    from timm.models import save_for_hf

    real = real_config("dinov3-timm/config.json")
    model = _seeded(lambda: timm.create_model(real["architecture"], pretrained=False, num_classes=real["num_classes"], **DINOV3_TIMM_SIZES), seed)
    side = DINOV3_TIMM_SIZES["img_size"]
    save_for_hf(model, folder, safe_serialization=True, data_config={"input_size": (3, side, side)})


def _save_depth(folder: Path, seed: int) -> None:
    config = DepthAnythingConfig.from_dict(derived_config("depth/config.json", DEPTH))
    _seeded(lambda: DepthAnythingForDepthEstimation(config), seed).save_pretrained(folder)
    _save_image_processor(folder, "depth/preprocessor_config.json", DEPTH_IMAGE_SIZE)


_sd15_controlnet = partial(_save_controlnet, unet_overrides=SD15_UNET, base_unet=_sd15_unet)
_sdxl_controlnet = partial(_save_controlnet, unet_overrides=SDXL_UNET, base_unet=_sdxl_unet)
REAL_CONFIG_FILE = {config.tiny_model: config.real for config in DERIVED_CONFIGS if config.file == "config.json"}

BUILDERS: dict[str, Callable[[Path, int], None]] = {
    "sd15": _save_sd15,
    # stable-diffusion-v1-5/stable-diffusion-inpainting: the same folder layout with the 9-channel UNet.
    "sd15-inpaint": partial(_save_sd15, unet=_sd15_inpaint_unet),
    "sdxl": _save_sdxl,
    # diffusers/stable-diffusion-xl-1.0-inpainting-0.1: SDXL's layout with the 9-channel UNet, saved by its pipeline class.
    "sdxl-inpaint": partial(_save_sdxl, unet=_sdxl_inpaint_unet, pipeline_class=StableDiffusionXLInpaintPipeline),
    **{
        f"controlnet-sd15-{control}": partial(_sd15_controlnet, real=REAL_CONFIG_FILE[f"controlnet-sd15-{control}"], control=control)
        for control in ("softedge", "depth", "normal")
    },
    **{
        f"controlnet-sdxl-{control}": partial(_sdxl_controlnet, real=REAL_CONFIG_FILE[f"controlnet-sdxl-{control}"], control=control)
        for control in ("softedge", "depth")
    },
    "controlnet-sdxl-union": partial(
        _sdxl_controlnet, real=REAL_CONFIG_FILE["controlnet-sdxl-union"], control="union", model_class=ControlNetUnionModel,
        extra_overrides={"num_trans_channel": SDXL_UNET["block_out_channels"][0], "num_proj_channel": SDXL_UNET["block_out_channels"][0]},
    ),
    "annotators": _save_annotators,
    "clip": _save_clip,
    "blip2": _save_blip2,
    "open_clip": _save_open_clip,
    "dinov3": _save_dinov3,
    "dinov3-timm": _save_dinov3_timm,
    "depth": _save_depth,
}


# -------------------------------------------------------------------------- LLaVA (captions.prompt_style: llava)

SIZE_FIELDS["llava"] = (
    _nested("vision_config", _VIT)
    # The Llama vocabulary is the byte-level stand-in (no Llama tokenizer offline), so the ids that name tokens in it
    # (`<image>`, `<pad>`) move with it.
    | _nested("text_config", _TRANSFORMER | {"num_key_value_heads", "head_dim", "vocab_size"})
    | {"image_token_index", "pad_token_id", "vocab_size"}
)
LLAVA_IMAGE_SIZE = 56  # 4 x 4 patches of 14 px (LLaVA-1.5: 24 x 24 at 336 px)
DERIVED_CONFIGS += [
    DerivedConfig("llava", "config.json", "llava/config.json", "llava"),
    DerivedConfig("llava", "preprocessor_config.json", "llava/preprocessor_config.json", "image_processor"),
]


def _save_llava(folder: Path, seed: int) -> None:
    """`llava-hf/llava-1.5-7b-hf`: CLIP ViT-L/14 vision tower read at its second-to-last layer without the CLS token
    (`vision_feature_layer: -2`, `default` strategy), a 2-layer GELU projector and a Llama language model, with
    the processor's real settings (patch size, one extra CLS position, chat template) at 56 px."""
    _save_image_processor(folder, "llava/preprocessor_config.json", LLAVA_IMAGE_SIZE)
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / GPT2_TOKENIZER)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})  # as llava-hf added it to Llama's
    processor = LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(folder),
        tokenizer=tokenizer,
        chat_template=real_config("llava/chat_template.json")["chat_template"],
        **{key: value for key, value in real_config("llava/processor_config.json").items() if key != "processor_class"},
    )
    # The hub file says float16 (as for SDXL's text encoders, transformers would build the language model in it).
    text = {**TINY_VIT, "num_key_value_heads": TINY_VIT["num_attention_heads"], "vocab_size": len(tokenizer), "torch_dtype": "float32"}
    config = derived_config("llava/config.json", {
        "torch_dtype": "float32",
        "vision_config": {**TINY_VIT, "image_size": LLAVA_IMAGE_SIZE},
        "text_config": text,
        "image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": len(tokenizer),
    })  # fmt: skip
    _seeded(lambda: LlavaForConditionalGeneration(LlavaConfig.from_dict(config)), seed).save_pretrained(folder)
    processor.save_pretrained(folder)


BUILDERS["llava"] = _save_llava


# ------------------------------------------------------------- SD3 Medium (models.pipeline: sd3, experimental)

SIZE_FIELDS["sd3_transformer"] = frozenset({
    "num_layers", "attention_head_dim", "num_attention_heads", "sample_size",
    # The text widths follow the tiny encoders: T5's hidden states (joint attention) and both CLIP projections (pooled).
    "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
})  # fmt: skip
# The T5 vocabulary is the byte-level stand-in (no T5 sentencepiece model offline).
SIZE_FIELDS["t5"] = frozenset({"d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers", "vocab_size"})
T5_WIDTH = 2 * TEXT_WIDTH  # SD3 pads the concatenated CLIP-L + CLIP-G states to T5's width: it must hold both
SD3_TRANSFORMER = {
    "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 4, "caption_projection_dim": 32,
    "joint_attention_dim": T5_WIDTH, "pooled_projection_dim": 2 * TEXT_WIDTH, "sample_size": UNET_SAMPLE_SIZE,
}  # fmt: skip
SD3_T5 = {"d_model": T5_WIDTH, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2, "torch_dtype": "float32"}
SD3_CONTROLNET_LAYERS = 1
DERIVED_CONFIGS += [
    DerivedConfig("sd3", "transformer/config.json", "sd3/transformer/config.json", "sd3_transformer"),
    DerivedConfig("sd3", "vae/config.json", "sd3/vae/config.json", "vae"),
    DerivedConfig("sd3", "text_encoder/config.json", "sd3/text_encoder/config.json", "clip_text"),
    DerivedConfig("sd3", "text_encoder_2/config.json", "sd3/text_encoder_2/config.json", "clip_text"),
    DerivedConfig("sd3", "text_encoder_3/config.json", "sd3/text_encoder_3/config.json", "t5"),
]


def _sd3_transformer(seed: int) -> Any:
    from diffusers import SD3Transformer2DModel

    return _seeded(lambda: SD3Transformer2DModel.from_config(derived_config("sd3/transformer/config.json", SD3_TRANSFORMER)), seed)


def _save_sd3(folder: Path, seed: int) -> None:
    """`stabilityai/stable-diffusion-3-medium-diffusers`: MMDiT transformer, 16-channel VAE without quant convs,
    CLIP-L and CLIP-G with projections, T5 encoder, flow-matching Euler scheduler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    tokenizer_3 = AutoTokenizer.from_pretrained(ASSETS_DIR / GPT2_TOKENIZER)
    t5_config = T5Config.from_dict(derived_config("sd3/text_encoder_3/config.json", {**SD3_T5, "vocab_size": len(tokenizer_3)}))
    text_configs = [_clip_text_config(f"sd3/{name}/config.json") for name in ("text_encoder", "text_encoder_2")]
    pipeline = StableDiffusion3Pipeline(
        transformer=_sd3_transformer(seed),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(real_config("sd3/scheduler/scheduler_config.json")),
        vae=_vae("sd3/vae/config.json", seed),
        text_encoder=_seeded(lambda: CLIPTextModelWithProjection(text_configs[0]), seed),
        tokenizer=clip_tokenizer("sdxl/tokenizer"),
        text_encoder_2=_seeded(lambda: CLIPTextModelWithProjection(text_configs[1]), seed),
        tokenizer_2=clip_tokenizer("sdxl/tokenizer_2"),
        text_encoder_3=_seeded(lambda: T5EncoderModel(t5_config), seed),
        tokenizer_3=tokenizer_3,
    )
    save_pipeline(pipeline, folder, {"tokenizer": "sdxl/tokenizer", "tokenizer_2": "sdxl/tokenizer_2"})
    # T5EncoderModel writes is_encoder_decoder / use_cache false (it sets them itself when it loads); keep the hub's.
    t5_file = folder / "text_encoder_3" / "config.json"
    real_t5 = real_config("sd3/text_encoder_3/config.json")
    saved = json.loads(t5_file.read_text(encoding="utf-8"))
    _write_json(t5_file, {**saved, **{key: real_t5[key] for key in ("is_encoder_decoder", "use_cache")}})


def _save_sd3_controlnet(folder: Path, seed: int, control: str) -> None:
    """An SD3 ControlNet as diffusers makes one from its transformer (`SD3ControlNetModel.from_transformer`: the
    transformer's embeddings and first blocks), with random output layers per control type."""
    from diffusers import SD3ControlNetModel

    controlnet = SD3ControlNetModel.from_transformer(
        _sd3_transformer(seed), num_layers=SD3_CONTROLNET_LAYERS, num_extra_conditioning_channels=0
    )
    _randomise_zero_outputs([*controlnet.controlnet_blocks, controlnet.pos_embed_input.proj], seed + zlib.crc32(control.encode()))
    controlnet.save_pretrained(folder)


BUILDERS["sd3"] = _save_sd3
BUILDERS.update({f"controlnet-sd3-{control}": partial(_save_sd3_controlnet, control=control) for control in ("canny", "depth")})
