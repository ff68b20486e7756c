"""DINOv3 (`models.dinov3`) from either of its two distributions, for Step 5 features and the Step 6 backbone.

- timm (the default, `timm/vit_small_patch16_dinov3.lvd1689m`: DINOv3 licence, no gated approval): a hub repo
  or folder whose `config.json` has timm's `architecture` key; built by `timm.create_model("hf-hub:<repo>")` or
  `timm.create_model("local-dir:<folder>")`, normalised with its `pretrained_cfg` mean/std.
- transformers (`facebook/dinov3-vits16-pretrain-lvd1689m`: gated, approved by hand): any other config; a
  `DINOv3ViTModel`, normalised by its `AutoImageProcessor`.

Both give tokens ordered [CLS, register tokens, patch tokens] (`vit_tokens`); the CLS token is the pooled feature.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from PIL import Image
from torch import nn

from neu_det_pipeline.models import load_model, local_folder

CONFIG_KEY = "models.dinov3"


def _read_config(model_id: str) -> dict:
    folder = local_folder(model_id)
    if folder is not None:
        path = folder / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model_id, "config.json")
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def is_timm_config(config: dict) -> bool:
    """Whether a DINOv3 `config.json` is timm's: the one place that tells the two forms apart (timm's names its
    `architecture`, transformers' lists `architectures` and says `model_type`)."""
    return "architecture" in config


def timm_model_name(model_id: str) -> str | None:
    """`hf-hub:<repo>` or `local-dir:<folder>` when `model_id` holds timm weights, None for a transformers model."""
    config = load_model(CONFIG_KEY, model_id, lambda: _read_config(model_id))
    if not is_timm_config(config):
        return None
    folder = local_folder(model_id)
    return f"local-dir:{folder}" if folder is not None else f"hf-hub:{model_id}"


def load_dinov3(model_id: str, pretrained: bool = True) -> nn.Module:
    """The DINOv3 ViT at `model_id`, with its pretrained weights or randomly initialised (same architecture,
    no weights downloaded): a timm model without a classifier head, or a transformers `DINOv3ViTModel`."""
    timm_name = timm_model_name(model_id)
    if timm_name is not None:
        import timm

        # num_classes=0: no head, whose unused weights would also stall data-parallel training.
        return load_model(CONFIG_KEY, model_id, lambda: timm.create_model(timm_name, pretrained=pretrained, num_classes=0))
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    if pretrained:
        return load_model(CONFIG_KEY, model_id, lambda: DINOv3ViTModel.from_pretrained(model_id))
    return DINOv3ViTModel(load_model(CONFIG_KEY, model_id, lambda: DINOv3ViTConfig.from_pretrained(model_id)))


def is_transformers_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def vit_tokens(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[B, prefix + patches, C] final (normalised) tokens of a transformers ViT or a timm ViT."""
    if is_transformers_model(model):
        return model(pixel_values=pixels).last_hidden_state
    return model.forward_features(pixels)


def width(model: nn.Module) -> int:
    """Channels of each token."""
    return model.config.hidden_size if is_transformers_model(model) else model.num_features


def preprocessor(model_id: str, model: nn.Module) -> Callable[[list[Image.Image]], torch.Tensor]:
    """RGB images -> the model's pixel tensor: resized and normalised as its weights expect."""
    if is_transformers_model(model):
        from transformers import AutoImageProcessor

        processor = load_model(CONFIG_KEY, model_id, lambda: AutoImageProcessor.from_pretrained(model_id))
        return lambda images: processor(images=images, return_tensors="pt")["pixel_values"]
    import timm.data

    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    return lambda images: torch.stack([transform(image) for image in images])
