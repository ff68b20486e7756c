"""Backbones by name, each returning a feature grid [B, C, h, w] and a global feature [B, C].

- `dinov3`: the DINOv3 ViT at `models.dinov3`: timm weights (`timm/vit_small_patch16_dinov3.lvd1689m` by
  default, no gated approval) or a transformers repo (`facebook/dinov3-vits16-pretrain-lvd1689m`), see
  `neu_det_pipeline.dinov3`. Its tokens are ordered [CLS, register tokens, patch tokens]; the patch tokens form the grid.
- `dinov3-s`, `dinov3-s+`, `dinov3-b`, `dinov3-l`, `dinov3-h+`, `dinov3-7b`: DINOv3 ViTs by size, an alias of
  `timm:<their timm name>` (`backbone_sizes.DINOV3_SIZES` lists the timm and transformers hub names).
- `timm:<name>`: timm ViTs (`vit_small_patch16_dinov3.lvd1689m`, with prefix tokens like the above) and any
  timm CNN (`convnext_tiny.dinov3_lvd1689m`, `resnet18`, ...), whose last feature map is the grid and whose
  average is the global feature.

A backbone is described by a JSON-able *spec* stored in every checkpoint, so prediction and export rebuild
the architecture without the hub or the original config, then load the trained weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from neu_det_pipeline.classifier.backbone_sizes import DINOV3_SIZES
from neu_det_pipeline.dinov3 import is_transformers_model, load_dinov3, vit_tokens
from neu_det_pipeline.errors import PipelineError

TIMM_PREFIX = "timm:"


class TokenGridBackbone(nn.Module):
    """A ViT: the patch tokens (after the CLS and register tokens) reshaped to the patch grid; CLS as global."""

    def __init__(self, model: nn.Module, channels: int, prefix_tokens: int, patch_size: int, transformers_model: bool):
        super().__init__()
        self.model, self.channels = model, channels
        self.prefix_tokens, self.patch_size, self.transformers_model = prefix_tokens, patch_size, transformers_model

    def set_trainable(self, trainable: bool) -> None:
        self.requires_grad_(trainable)
        if self.transformers_model:
            # The masked-image-modelling token is used only in pretraining; a trainable parameter that never
            # gets a gradient would stall data-parallel training.
            self.model.embeddings.mask_token.requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = vit_tokens(self.model, pixels)
        height, width = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        grid = tokens[:, self.prefix_tokens :].transpose(1, 2).reshape(tokens.shape[0], self.channels, height, width)
        return grid, tokens[:, 0]


class FeatureMapBackbone(nn.Module):
    """A CNN: its last feature map is the grid, the spatial average the global feature."""

    def __init__(self, model: nn.Module, channels: int):
        super().__init__()
        self.model, self.channels = model, channels

    def set_trainable(self, trainable: bool) -> None:
        self.requires_grad_(trainable)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.model.forward_features(pixels)
        return grid, grid.mean(dim=(2, 3))


Backbone = TokenGridBackbone | FeatureMapBackbone


def create_backbone(name: str, dinov3_id: str, pretrained: bool, kwargs: dict[str, Any], image_size: int) -> tuple[Backbone, dict]:
    """The backbone `classifier.backbone` names, pretrained or randomly initialised, and the spec that rebuilds it."""
    if name == "dinov3":
        model = load_dinov3(dinov3_id, pretrained)
        if is_transformers_model(model):
            spec = {"source": "transformers", "config": model.config.to_dict()}
        else:
            # The checkpoint's architecture and its recorded arguments rebuild it without the hub.
            arguments = {key: value for key, value in model.pretrained_model_args.items() if key != "num_classes"}
            spec = {"source": "timm", "name": model.pretrained_cfg["architecture"], "kwargs": arguments}
    else:
        timm_name = DINOV3_SIZES[name].timm_name if name in DINOV3_SIZES else name.removeprefix(TIMM_PREFIX)
        spec = {"source": "timm", "name": timm_name, "kwargs": dict(kwargs)}
        model = _create_timm(spec, pretrained)
    backbone = _wrap(model, spec)
    _fit_image_size(backbone, image_size, name)
    return backbone, spec


def backbone_from_spec(spec: dict, image_size: int) -> Backbone:
    """The architecture a checkpoint was trained with, randomly initialised (its weights are loaded next)."""
    if spec["source"] == "transformers":
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        backbone = _wrap(DINOv3ViTModel(DINOv3ViTConfig.from_dict(spec["config"])), spec)
    else:
        backbone = _wrap(_create_timm(spec, pretrained=False), spec)
    _fit_image_size(backbone, image_size, spec.get("name", "dinov3"))
    return backbone


def _create_timm(spec: dict, pretrained: bool) -> nn.Module:
    import timm

    try:
        # num_classes=0: no ImageNet head, whose unused weights would also stall data-parallel training.
        return timm.create_model(spec["name"], pretrained=pretrained, num_classes=0, **spec["kwargs"])
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(
            f"classifier.backbone=timm:{spec['name']} could not be built ({reason}); check the name (timm.list_models()) "
            f"and classifier.backbone_kwargs, and for pretrained weights that they are in the Hugging Face cache or "
            f"downloadable (or set classifier.pretrained=false)"
        ) from None


def _wrap(model: nn.Module, spec: dict) -> Backbone:
    if spec["source"] == "transformers":
        config = model.config
        backbone = TokenGridBackbone(model, config.hidden_size, 1 + config.num_register_tokens, config.patch_size, True)
        backbone.set_trainable(True)
        return backbone
    if hasattr(model, "num_prefix_tokens"):
        return TokenGridBackbone(model, model.num_features, model.num_prefix_tokens, model.patch_embed.patch_size[0], False)
    return FeatureMapBackbone(model, model.num_features)


def _fit_image_size(backbone: Backbone, image_size: int, name: str) -> None:
    if isinstance(backbone, TokenGridBackbone):
        if image_size % backbone.patch_size:
            raise PipelineError(
                f"classifier.image_size={image_size} is not a multiple of the patch size {backbone.patch_size} of "
                f"{name}; use e.g. classifier.image_size={max(1, round(image_size / backbone.patch_size)) * backbone.patch_size}"
            )
        if hasattr(backbone.model, "set_input_size"):
            backbone.model.set_input_size(img_size=(image_size, image_size))  # timm ViTs with fixed position tables


def backbone_blocks(backbone: Backbone) -> list[nn.Module]:
    """The backbone's blocks in order: a ViT's transformer layers, a CNN's stages (timm's `stages`, or ResNet's
    `layer1`..`layer4`); the large-dataset preset unfreezes the last few."""
    model = backbone.model
    if isinstance(backbone, TokenGridBackbone):
        return list(model.model.layer if backbone.transformers_model else model.blocks)
    if hasattr(model, "stages"):
        return list(model.stages)
    layers = [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]
    if not layers:
        raise PipelineError(f"the backbone {type(model).__name__} has no `stages` or `layer1`..`layer4`; use train: all instead of last_blocks in classifier.stages")
    return layers


def final_norm(backbone: Backbone) -> nn.Module | None:
    """A ViT's norm after the last block (it shapes every output token, so it trains with the last blocks)."""
    norm = getattr(backbone.model, "norm", None) if isinstance(backbone, TokenGridBackbone) else None
    return norm if isinstance(norm, nn.Module) else None


COMPONENTS = {"backbone": ("backbone",), "decoder": ("decoder",), "enhancer_head": ("enhancer", "head")}
"""Summary keys and the classifier's top-level modules they count."""


def component_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per component (backbone, decoder, enhancer + head) and in total, from the model's own modules."""
    counts = {key: 0 for key in COMPONENTS}
    for name, parameter in model.named_parameters():
        top = name.split(".", 1)[0]
        key = next((key for key, modules in COMPONENTS.items() if top in modules), None)
        if key is None:
            raise PipelineError(f"classifier parameter {name} belongs to no component of {list(COMPONENTS)}")  # a new module
        counts[key] += parameter.numel()
    return {**counts, "total": sum(counts.values())}
