"""DINOv3 ViTs by size name (`classifier.backbone: dinov3-s ... dinov3-7b`): their timm and transformers hub names.

Pure data (no torch import): the config validates names against it. Parameter counts are of the backbone alone
(timm's architecture, counted by `neu_det_pipeline.classifier.backbones.component_parameters`); blocks are the
transformer layers the large-dataset preset's `last_blocks` stage unfreezes from the end. Patch size 16 for all.
"""

from __future__ import annotations

from typing import NamedTuple


class DinoV3Size(NamedTuple):
    timm_name: str
    """timm model name with its pretrained tag: the weights are the hub repo `timm/<timm_name>` (no gated approval)."""
    transformers_id: str
    """The same weights for transformers (gated, approved by hand): usable as `models.dinov3` with `backbone: dinov3`."""
    parameters_millions: float
    width: int
    blocks: int


DINOV3_SIZES: dict[str, DinoV3Size] = {
    "dinov3-s": DinoV3Size("vit_small_patch16_dinov3.lvd1689m", "facebook/dinov3-vits16-pretrain-lvd1689m", 21.6, 384, 12),
    "dinov3-s+": DinoV3Size("vit_small_plus_patch16_dinov3.lvd1689m", "facebook/dinov3-vits16plus-pretrain-lvd1689m", 28.7, 384, 12),
    "dinov3-b": DinoV3Size("vit_base_patch16_dinov3.lvd1689m", "facebook/dinov3-vitb16-pretrain-lvd1689m", 85.6, 768, 12),
    "dinov3-l": DinoV3Size("vit_large_patch16_dinov3.lvd1689m", "facebook/dinov3-vitl16-pretrain-lvd1689m", 303.1, 1024, 24),
    "dinov3-h+": DinoV3Size("vit_huge_plus_patch16_dinov3.lvd1689m", "facebook/dinov3-vith16plus-pretrain-lvd1689m", 840.5, 1280, 32),
    "dinov3-7b": DinoV3Size("vit_7b_patch16_dinov3.lvd1689m", "facebook/dinov3-vit7b16-pretrain-lvd1689m", 6716.0, 4096, 40),
}
