"""Weak supervision (`classifier.mask_source`): pseudo-masks for training images that come without masks.

    boxes      the masks the data brings (Step 0's box masks, own data's masks/): nothing to do here
    attention  the pretrained backbone's CLS-to-patch attention in its last block, averaged over heads (ViTs:
               DINOv3 in its timm or transformers form, timm ViTs)
    cam        Grad-CAM of a plain classifier (the same backbone, `multitask: false`) trained first for
               `cam_epochs` on the same images, for each image's own class; written to `cam_stage/`
    none       no masks: the segmentation loss is off (training.py), the classification branch trains alone

Each map (on the feature grid) is upsampled bilinearly to the image size, min-max scaled to [0, 1] and thresholded
by `pseudo_mask_threshold`: Otsu's threshold (256-bin histogram, the split that maximises the between-class
variance) or a quantile q (the top 1 - q of the pixels are defect). A flat map gives an empty mask. Only defect
images get pseudo-masks; defect-free ones (the `normal` class, own data's label `0`, `classifier.normal_dir`) keep
all-zero targets. The masks are written to `pseudo_masks/` (PNG, white = defect) and replace the training
examples' masks; validation and test keep theirs, so mask IoU still measures against the real boxes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from neu_det_pipeline.classifier.backbones import Backbone, TokenGridBackbone, backbone_blocks, create_backbone
from neu_det_pipeline.classifier.checkpoints import BEST_FILE, load_classifier
from neu_det_pipeline.classifier.data import ClassifierData, ClassifierDataset, Example
from neu_det_pipeline.classifier.data_tools import NORMAL_LABELS
from neu_det_pipeline.classifier.model import IMAGENET_MEAN, IMAGENET_STD, AttentionGuidedClassifier
from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.io import save_image

PSEUDO_MASK_DIR = "pseudo_masks"
CAM_STAGE_DIR = "cam_stage"
MASK_SOURCE_TEXT = {
    "boxes": "the data's masks (box masks / own masks)",
    "attention": "pseudo-masks from the backbone's CLS-to-patch attention",
    "cam": "pseudo-masks from Grad-CAM of a plain classifier",
    "none": "none (segmentation loss off)",
}


def is_defect_free(example: Example, classes: list[str]) -> bool:
    return example.origin == "normal" or classes[example.label] in NORMAL_LABELS


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> the backbone's input (the classifier normalises inside its forward the same way)."""
    mean, std = (torch.tensor(v, device=pixels.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (pixels - mean) / std


# ------------------------------------------------------------------------------------------ maps


@torch.no_grad()
def cls_attention(backbone: Backbone, pixels: torch.Tensor) -> torch.Tensor:
    """[B, h, w]: the last block's attention from the CLS token to each patch token, averaged over heads
    (register tokens left out). `pixels` are normalised. A CNN has no attention: one clear error."""
    if not isinstance(backbone, TokenGridBackbone):
        raise PipelineError(
            "classifier.mask_source=attention needs a ViT backbone (dinov3, dinov3-<size> or a timm ViT); "
            "use mask_source=cam for CNN backbones"
        )
    model = backbone.model
    if backbone.transformers_model:
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")  # sdpa returns no attention weights
        try:
            attention = model(pixel_values=pixels, output_attentions=True).attentions[-1]
        finally:
            model.set_attn_implementation(previous)
    else:
        # timm's ViTs (Eva for DINOv3) compute softmax(qk^T) explicitly when not fused; their attn_drop receives it.
        module = model.blocks[-1].attn
        captured: list[torch.Tensor] = []
        handle = module.attn_drop.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
        fused, module.fused_attn = module.fused_attn, False
        try:
            model.forward_features(pixels)
        finally:
            module.fused_attn = fused
            handle.remove()
        attention = captured[0]
    height, width = pixels.shape[-2] // backbone.patch_size, pixels.shape[-1] // backbone.patch_size
    return attention[:, :, 0, backbone.prefix_tokens :].float().mean(1).reshape(-1, height, width)


def grad_cam(model: AttentionGuidedClassifier, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, h, w] Grad-CAM for each image's class `labels`: ReLU(sum_c w_c A_c) with w_c the spatial mean of
    d score / d A_c. A is a CNN's last feature map, or for a ViT the patch tokens entering its last block (the CLS
    output of the last block does not depend on that block's patch outputs). `pixels` are RGB in [0, 1]."""
    backbone = model.backbone
    captured: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> None:
        tensor.retain_grad()
        captured.append(tensor)

    if isinstance(backbone, TokenGridBackbone):
        handle = backbone_blocks(backbone)[-1].register_forward_pre_hook(lambda _module, args: keep(args[0]))
    else:
        handle = backbone.register_forward_hook(lambda _module, _inputs, output: keep(output[0]))
    model.eval().requires_grad_(True)
    try:
        with torch.enable_grad():
            logits = model(pixels).logits
            logits.gather(1, labels[:, None]).sum().backward()  # images are independent in eval mode
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    features, gradients = captured[0].detach().float(), captured[0].grad.float()
    if isinstance(backbone, TokenGridBackbone):
        height, width = pixels.shape[-2] // backbone.patch_size, pixels.shape[-1] // backbone.patch_size
        patches, patch_gradients = features[:, backbone.prefix_tokens :], gradients[:, backbone.prefix_tokens :]
        cam = (patches * patch_gradients.mean(1, keepdim=True)).sum(-1).reshape(-1, height, width)
    else:
        cam = (features * gradients.mean(dim=(2, 3), keepdim=True)).sum(1)
    return cam.relu()


def otsu_threshold(scaled: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the bin edge that maximises the between-class variance of its
    histogram; values at or above it are foreground. (skimage's returns a bin centre, which splits the values of
    its own bin.)"""
    counts, edges = np.histogram(scaled, bins=bins, range=(0.0, 1.0))
    share = counts / counts.sum()
    below = np.cumsum(share)[:-1]  # class weight up to and including bin k, for splits after bins 0 .. bins-2
    mean_below = np.cumsum(share * (edges[:-1] + edges[1:]) / 2)[:-1]
    mean_all = float((share * (edges[:-1] + edges[1:]) / 2).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * below - mean_below) ** 2 / (below * (1 - below))
    return float(edges[int(np.nanargmax(np.where((below > 0) & (below < 1), between, np.nan))) + 1])


def threshold_map(values: np.ndarray, rule: str | float) -> np.ndarray:
    """Boolean defect mask of a map: min-max scaled, then at or above Otsu's threshold, or above the quantile `rule`."""
    spread = float(values.max() - values.min())
    if spread <= 1e-12:
        return np.zeros(values.shape, dtype=bool)
    scaled = (values - values.min()) / spread
    if rule == "otsu":
        return scaled >= otsu_threshold(scaled)
    return scaled > float(np.quantile(scaled, rule))


def masks_from_maps(maps: torch.Tensor, image_size: int, rule: str | float) -> list[np.ndarray]:
    """Grid maps [B, h, w] -> uint8 masks (0 / 255) at the image size."""
    upsampled = F.interpolate(maps[:, None].float(), size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0]
    return [threshold_map(values, rule).astype(np.uint8) * 255 for values in upsampled.cpu().numpy()]


# ------------------------------------------------------------------------------------ orchestration


def cam_classifier(config: PipelineConfig, data: ClassifierData, out_dir: Path) -> AttentionGuidedClassifier:
    """Train the plain classifier (same backbone and data, no segmentation branch) for `cam_epochs` into `out_dir`;
    its best checkpoint (validation macro-F1) gives the Grad-CAM maps. `classifier.resume` resumes it too."""
    from neu_det_pipeline.classifier.training import ClassifierTraining

    section = config.classifier
    plain = section.model_copy(update={
        "multitask": False, "mask_source": "boxes", "epochs": section.cam_epochs, "stages": [],
        "freeze_epochs": min(section.freeze_epochs, section.cam_epochs - 1), "max_train_minutes": None,
    })
    out_dir.mkdir(parents=True, exist_ok=True)
    training = ClassifierTraining(config.model_copy(update={"classifier": plain}), data, out_dir)
    training.run()
    model, _ = load_classifier(out_dir / BEST_FILE)
    return model.to(training.accelerator.device)


def apply_mask_source(config: PipelineConfig, data: ClassifierData, out_dir: Path) -> tuple[ClassifierData, int]:
    """`data` with pseudo-masks on its defect training images for `attention` / `cam` (and how many were made);
    unchanged for `boxes` and `none`."""
    from neu_det_pipeline.training.loop import make_accelerator

    section = config.classifier
    if section.mask_source in ("boxes", "none"):
        return data, 0
    train = data.splits["train"]
    targets = [i for i, example in enumerate(train) if not is_defect_free(example, data.classes)]
    if section.mask_source == "attention":
        device = make_accelerator(config, fp16_unsafe_model="DINOv3").device
        backbone, _ = create_backbone(section.backbone, config.models.dinov3, section.pretrained, section.backbone_kwargs, section.image_size)
        backbone = backbone.to(device).eval()
        make_maps = lambda pixels, labels: cls_attention(backbone, normalise(pixels))  # noqa: E731
    else:
        model = cam_classifier(config, data, out_dir / CAM_STAGE_DIR)
        device = next(model.parameters()).device
        make_maps = lambda pixels, labels: grad_cam(model, pixels, labels)  # noqa: E731
    dataset = ClassifierDataset([train[i] for i in targets], section.image_size, config.run.seed)
    masks: dict[int, Path] = {}
    for batch in DataLoader(dataset, batch_size=section.eval_batch_size):
        maps = make_maps(batch["pixels"].to(device), batch["labels"].to(device))
        for index, mask in zip(batch["index"].tolist(), masks_from_maps(maps, section.image_size, section.pseudo_mask_threshold)):
            position = targets[index]
            path = out_dir / PSEUDO_MASK_DIR / f"{position:06d}_{train[position].image.stem}.png"
            masks[position] = save_image(Image.fromarray(mask), path)
    splits = dict(data.splits)
    splits["train"] = [dataclasses.replace(example, mask=masks.get(i)) for i, example in enumerate(train)]
    return dataclasses.replace(data, splits=splits), len(masks)
