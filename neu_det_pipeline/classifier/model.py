"""The attention-guided multitask defect classifier (the seed guide's AttentionGuidedDefectClassifier).

    pixels -> backbone -> feature grid F [B, C, h, w], global feature g [B, C]
    F -> segmentation decoder -> mask logits on the grid -> attention A = sigmoid [B, 1, h, w]
    pooled = sum(A * F) / sum(A)                      mask-guided attention pooling
    logits = head(enhancer([g, pooled]))             fused with the CLS / global feature
    mask logits upsampled to the image size          (trained against the box masks)

With `multitask=False` the decoder is absent and the head sees the global feature alone: the plain
classifier the benchmark compares against. `head="wrapper"` swaps enhancer + head for the seed guide's
Network_Wrapper (ReLU, Linear to 128, ReLU, Linear to the classes), a baseline on the same fused features. Inputs are RGB in [0, 1]; normalisation is part of the model,
so the ONNX export and prediction need no preprocessing beyond resizing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from neu_det_pipeline.classifier.backbones import Backbone, backbone_from_spec

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINOv3 and timm weights use these
WRAPPER_HIDDEN = 128  # the seed guide's Network_Wrapper width


class ClassifierOutput(NamedTuple):
    logits: torch.Tensor
    """[B, classes] class logits."""
    mask_logits: torch.Tensor | None
    """[B, 1, H, W] defect-mask logits at the input size (None without the segmentation branch)."""
    attention: torch.Tensor | None
    """[B, 1, h, w] attention weights on the feature grid (the sigmoid of the grid mask logits)."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything that rebuilds a trained model's architecture; stored in every checkpoint."""

    backbone: dict
    classes: list[str]
    image_size: int
    multitask: bool
    decoder_channels: int
    enhancer_dim: int
    dropout: float
    head: str = "attention_guided"
    """`attention_guided` or `wrapper` (checkpoints written before the choice existed are `attention_guided`)."""
    input: str = "image"
    """`image` or `box_crops`: what `neu-det predict` must feed the model."""
    crop_margin: float = 0.1
    """`box_crops`: training margin fraction per side; prediction crops with half of it."""

    def to_dict(self) -> dict:
        return asdict(self)


def masked_average_pool(features: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Weighted average of a [B, C, h, w] grid under [B, 1, h, w] non-negative weights: positions with zero
    weight do not contribute at all (an all-zero map gives a zero vector)."""
    return (features * weights).sum(dim=(2, 3)) / (weights.sum(dim=(2, 3)) + eps)


def segmentation_decoder(in_channels: int, channels: int) -> nn.Sequential:
    """Two 3x3 conv blocks and a 1x1 projection to one mask-logit channel, at the grid's resolution."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, 1, 1),
    )


def classifier_head(spec: ModelSpec, fused: int) -> tuple[nn.Module, nn.Module]:
    """(enhancer, head) on the fused feature: the attention-guided pair, or the seed guide's Network_Wrapper
    split the same way (ReLU, Linear, ReLU | Linear) so both heads share the forward pass."""
    if spec.head == "wrapper":
        return nn.Sequential(nn.ReLU(), nn.Linear(fused, WRAPPER_HIDDEN), nn.ReLU()), nn.Linear(WRAPPER_HIDDEN, len(spec.classes))
    enhancer = nn.Sequential(nn.Linear(fused, spec.enhancer_dim), nn.LayerNorm(spec.enhancer_dim), nn.GELU(), nn.Dropout(spec.dropout / 2))
    return enhancer, nn.Sequential(nn.Dropout(spec.dropout), nn.Linear(spec.enhancer_dim, len(spec.classes)))


class AttentionGuidedClassifier(nn.Module):
    def __init__(self, backbone: Backbone, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        channels = backbone.channels
        self.decoder = segmentation_decoder(channels, spec.decoder_channels) if spec.multitask else None
        fused = 2 * channels if spec.multitask else channels
        self.enhancer, self.head = classifier_head(spec, fused)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> AttentionGuidedClassifier:
        return cls(backbone_from_spec(spec.backbone, spec.image_size), spec)

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything but the backbone: trained from the first epoch at the full learning rate."""
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def forward(self, pixels: torch.Tensor) -> ClassifierOutput:
        grid, global_feature = self.backbone((pixels - self.mean) / self.std)
        if self.decoder is None:
            return ClassifierOutput(self.head(self.enhancer(global_feature)), None, None)
        grid_logits = self.decoder(grid)
        attention = torch.sigmoid(grid_logits)
        pooled = masked_average_pool(grid, attention)
        logits = self.head(self.enhancer(torch.cat([global_feature, pooled], dim=1)))
        mask_logits = F.interpolate(grid_logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        return ClassifierOutput(logits, mask_logits, attention)
