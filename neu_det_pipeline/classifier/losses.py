"""Classification losses, the segmentation loss and the multi-task weighting.

Classification (`classifier.classification_loss`):
    ce               cross-entropy
    label_smoothing  cross-entropy with label smoothing
    focal            focal loss  FL = -(1 - p_t)^gamma log p_t  (Lin et al. 2017)
    ls_focal         the seed's mix: 1/6 label-smoothing CE + 5/6 focal
Segmentation: BCE with logits + soft Dice against the box masks.
Weighting (`classifier.loss_weighting`):
    fixed        alpha * L_cls + beta * L_seg
    dynamic      (alpha, beta) = (0.5, 1.0) before `switch_epoch` (learn where defects are), (1.0, 0.3) after
    uncertainty  sum_i exp(-s_i) L_i + s_i with learned log-variances s_i (Kendall et al. 2018)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from neu_det_pipeline.config import ClassifierConfig

DYNAMIC_EARLY = (0.5, 1.0)
"""(alpha, beta) before `switch_epoch`: segmentation-heavy."""
DYNAMIC_LATE = (1.0, 0.3)
"""(alpha, beta) from `switch_epoch` on: classification-heavy."""
LS_SHARE = 1 / 6
"""Share of label-smoothing CE in `ls_focal` (the rest is focal)."""


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean of -(1 - p_t)^gamma log p_t over the batch; gamma = 0 is cross-entropy."""
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean()


def classification_loss(logits: torch.Tensor, target: torch.Tensor, config: ClassifierConfig) -> torch.Tensor:
    kind = config.classification_loss
    if kind == "ce":
        return F.cross_entropy(logits.float(), target)
    smoothed = F.cross_entropy(logits.float(), target, label_smoothing=config.label_smoothing)
    if kind == "label_smoothing":
        return smoothed
    focal = focal_loss(logits, target, config.focal_gamma)
    return focal if kind == "focal" else LS_SHARE * smoothed + (1 - LS_SHARE) * focal


def dice_loss(mask_logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per image, averaged; `smooth` keeps defect-free (all-zero) targets well defined."""
    probs = torch.sigmoid(mask_logits.float()).flatten(1)
    target = target.flatten(1)
    intersection = (probs * target).sum(1)
    return (1 - (2 * intersection + smooth) / (probs.sum(1) + target.sum(1) + smooth)).mean()


def segmentation_loss(mask_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + Dice against a {0, 1} mask of the same shape."""
    return F.binary_cross_entropy_with_logits(mask_logits.float(), target) + dice_loss(mask_logits, target)


class LossParts(NamedTuple):
    total: torch.Tensor
    classification: torch.Tensor
    segmentation: torch.Tensor
    alpha: float
    """Effective classification weight (exp(-s_cls) under uncertainty weighting)."""
    beta: float
    """Effective segmentation weight."""


class MultiTaskLoss(nn.Module):
    """Combines the two task losses; holds the learned log-variances of uncertainty weighting."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        self.log_vars = nn.Parameter(torch.zeros(2)) if config.loss_weighting == "uncertainty" else None

    def weights(self, epoch: int) -> tuple[float, float]:
        """(alpha, beta) of `fixed` and `dynamic` weighting at `epoch` (0-based)."""
        if self.config.loss_weighting == "dynamic":
            return DYNAMIC_EARLY if epoch < self.config.switch_epoch else DYNAMIC_LATE
        return self.config.alpha, self.config.beta

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, mask_logits: torch.Tensor | None, masks: torch.Tensor, epoch: int
    ) -> LossParts:
        cls_loss = classification_loss(logits, labels, self.config)
        if mask_logits is None:  # plain classifier: classification alone
            return LossParts(cls_loss, cls_loss, torch.zeros_like(cls_loss), 1.0, 0.0)
        seg_loss = segmentation_loss(mask_logits, masks)
        if self.log_vars is not None:
            precision = torch.exp(-self.log_vars)
            total = precision[0] * cls_loss + precision[1] * seg_loss + self.log_vars.sum()
            return LossParts(total, cls_loss, seg_loss, precision[0].item(), precision[1].item())
        alpha, beta = self.weights(epoch)
        return LossParts(alpha * cls_loss + beta * seg_loss, cls_loss, seg_loss, alpha, beta)
