"""`classifier`: Step 6, the DINOv3 attention-guided multitask classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from neu_det_pipeline.classifier.backbone_sizes import DINOV3_SIZES
from neu_det_pipeline.config.base import Section


class ClassifierAugmentationConfig(Section):
    preset: Literal["default", "guide"] = "default"
    """`default`: the transforms the fields below describe; `guide`: the seed guide's set (PadIfNeeded + RandomCrop,
    ShiftScaleRotate as albumentations' Affine, GridDistortion or ElasticTransform, CoarseDropout), which ignores the
    fields below. The guide's ChannelShuffle is left out: NEU-DET is grayscale, its three channels are identical."""
    hflip: bool = True
    """Random horizontal flips (image and mask together)."""
    vflip: bool = True
    """Random vertical flips."""
    rot90: bool = True
    """Random 90-degree rotations (steel textures have no up direction)."""
    max_rotation: float = Field(10.0, ge=0, le=45)
    """Small affine: rotation drawn from [-max_rotation, max_rotation] degrees."""
    max_translate: float = Field(0.05, ge=0, le=0.5)
    """Small affine: shift drawn up to this fraction of the image side."""
    max_scale: float = Field(0.1, ge=0, lt=1)
    """Small affine: zoom drawn from [1 - max_scale, 1 + max_scale]."""
    brightness: float = Field(0.2, ge=0, lt=1)
    """Brightness shift drawn from [-brightness, brightness] times the image's mean (image only; no colour changes on grayscale)."""
    contrast: float = Field(0.2, ge=0, lt=1)
    """Contrast gain drawn from [1 - contrast, 1 + contrast] (image only)."""


class ClassifierStageConfig(Section):
    """One stage of `classifier.stages` (the large-dataset preset): what trains, for how long, how fast."""

    epochs: int = Field(ge=1)
    """Epochs of this stage."""
    train: Literal["head", "last_blocks", "all"]
    """`head`: decoder, enhancer and head only (frozen backbone, batch-norm statistics fixed); `last_blocks`: also
    the backbone's last `last_blocks` blocks (ViT layers, or CNN stages) and its final norm; `all`: everything."""
    last_blocks: int = Field(0, ge=0)
    """`last_blocks`: how many of the backbone's final blocks train."""
    learning_rate: float = Field(gt=0)
    """Peak learning rate of the decoder, enhancer and head in this stage (warm-up, then cosine to 0 at its end)."""
    backbone_learning_rate: float = Field(0.0, ge=0)
    """Peak learning rate of the backbone's trainable part (0 for `head`; above 0 otherwise)."""

    @model_validator(mode="after")
    def _consistent(self) -> ClassifierStageConfig:
        if (self.train == "last_blocks") != (self.last_blocks > 0):
            raise ValueError("a classifier.stages entry sets last_blocks > 0 exactly when train=last_blocks")
        if (self.train == "head") != (self.backbone_learning_rate == 0):
            raise ValueError("a classifier.stages entry sets backbone_learning_rate > 0 exactly when the backbone trains (train=last_blocks or all)")
        return self


class ClassifierConfig(Section):
    RESUME_ONLY: ClassVar[frozenset[str]] = frozenset({"resume", "num_workers", "eval_batch_size"})
    """How to get there, not where: changing these neither changes the result nor wipes `last.pt`."""

    backbone: str = "dinov3"
    """`dinov3`: the DINOv3 ViT at `models.dinov3` (timm or transformers weights); `dinov3-s`, `dinov3-s+`, `dinov3-b`,
    `dinov3-l`, `dinov3-h+`, `dinov3-7b`: DINOv3 ViTs by size (timm weights `timm/vit_<size>_patch16_dinov3.lvd1689m`); `timm:<name>`: a timm model, e.g.
    `timm:vit_small_patch16_dinov3.lvd1689m`, `timm:convnext_tiny.dinov3_lvd1689m`, `timm:resnet18` (CNNs give feature maps)."""
    pretrained: bool = True
    """Start from the backbone's pretrained weights; false: same architecture, random weights (from-scratch training)."""
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra `timm.create_model` arguments, e.g. `{output_stride: 16}` or `{drop_path_rate: 0.1}`; must be empty for `dinov3`."""
    image_size: int = Field(224, ge=32)
    """Square input side (a multiple of the patch size for ViTs); the 200 px images are resized."""
    multitask: bool = True
    """Segmentation decoder + mask-guided attention pooling; false: plain classifier on the CLS/global feature."""
    decoder_channels: int = Field(128, ge=1)
    """Channels of the segmentation decoder on the patch/feature grid."""
    enhancer_dim: int = Field(256, ge=1)
    """Width of the feature enhancer between the fused features and the classifier head."""
    dropout: float = Field(0.3, ge=0, lt=1)
    """Dropout before the classifier head (half of it inside the enhancer)."""
    classification_loss: Literal["ce", "label_smoothing", "focal", "ls_focal"] = "ls_focal"
    """`ls_focal`: 1/6 label-smoothing CE + 5/6 focal loss (the seed's mix)."""
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    """Label smoothing of `label_smoothing` and `ls_focal`."""
    focal_gamma: float = Field(2.0, ge=0)
    """Focusing parameter gamma of `focal` and `ls_focal` (0 gives cross-entropy)."""
    loss_weighting: Literal["fixed", "dynamic", "uncertainty"] = "dynamic"
    """Total = alpha * classification + beta * segmentation with `fixed` alpha/beta; `dynamic`: (0.5, 1.0) before
    `switch_epoch`, (1.0, 0.3) from it on; `uncertainty`: learned log-variances (Kendall et al. 2018)."""
    alpha: float = Field(1.0, ge=0)
    """Classification loss weight of `fixed` weighting."""
    beta: float = Field(0.5, ge=0)
    """Segmentation loss weight (BCE + Dice) of `fixed` weighting."""
    switch_epoch: int = Field(10, ge=0)
    """`dynamic` weighting: first epoch (0-based) with the classification-heavy weights."""
    epochs: int = Field(30, ge=1)
    """Training epochs (both stages)."""
    freeze_epochs: int = Field(5, ge=0)
    """Stage 1: epochs with a frozen backbone (head and decoder only); then everything trains. 0 for from-scratch."""
    batch_size: int = Field(32, ge=1)
    """Images per device per micro-batch."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    learning_rate: float = Field(1e-3, gt=0)
    """Peak learning rate of the head, decoder and enhancer (and of a randomly initialised backbone)."""
    backbone_lr_scale: float = Field(0.1, gt=0)
    """Pretrained backbone's learning rate = learning_rate * this, once unfrozen (a random one uses learning_rate)."""
    weight_decay: float | None = Field(None, ge=0)
    """Weight decay; null: 0.05 for AdamW, 1e-3 for SGD (the seed guide's)."""
    warmup_epochs: float = Field(1.0, ge=0)
    """Linear warm-up before the cosine decay (again for the backbone when it is unfrozen)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    class_balanced: bool = False
    """Draw training images with probability inversely proportional to their class frequency."""
    # --- issue 18, parts 1-3: what the model sees, the seed guide's optimiser, schedule and head
    input: Literal["image", "box_crops"] = "image"
    """`image`: one sample per image, labelled with the image's class; `box_crops`: one sample per VOC object (Step 0's
    or Step 4's boxes), its box cropped with a margin (see `crop_margin`) and labelled with the object's own class."""
    crop_margin: float = Field(0.1, ge=0, le=1)
    """`box_crops`: training crops add a random margin of up to this fraction of the box's width / height on each side
    (clipped to the image); evaluation and `neu-det predict --boxes` add half of it."""
    head: Literal["attention_guided", "wrapper"] = "attention_guided"
    """`attention_guided`: enhancer (Linear, LayerNorm, GELU, dropout) + dropout + Linear; `wrapper`: the seed guide's
    Network_Wrapper baseline (ReLU, Linear to 128, ReLU, Linear to the classes) on the same fused features."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """`adamw`; `sgd`: SGD with `momentum` (the seed guide's, weight decay 1e-3 unless `weight_decay` says otherwise)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum."""
    lr_schedule: Literal["warmup_cosine", "cosine_restarts"] = "warmup_cosine"
    """`warmup_cosine`: linear warm-up then one cosine decay to 0 per parameter group (the backbone's starts at
    unfreezing); `cosine_restarts`: the seed guide's `t % nb_epoch` annealing, torch's CosineAnnealingWarmRestarts
    (after the warm-up, when `warmup_epochs` > 0), the same factor for every group."""
    restart_epochs: float | None = Field(None, gt=0)
    """`cosine_restarts`: epochs of the first cosine cycle; null: the whole run after the warm-up (the guide's nb_epoch)."""
    restart_mult: int = Field(1, ge=1)
    """`cosine_restarts`: each cycle is this many times longer than the previous one (torch's T_mult)."""
    augmentation: ClassifierAugmentationConfig = Field(default_factory=ClassifierAugmentationConfig)
    """Joint image + mask augmentation of training images (albumentations)."""
    synthetic: Literal["none", "step4", "step5", "classical", "copy_paste"] = "none"
    """Synthetic training images: `step4` (all generated), `step5` (the curated set), or one of Step 5's control arms
    (`classical`, `copy_paste`: its dataset of the first generation seed); validation and test stay real."""
    synthetic_ratio: float = Field(1.0, ge=0)
    """Synthetic images added per real training image (per class, seeded; capped by what exists)."""
    synthetic_only: bool = False
    """Train on the synthetic images alone, test on real: the generator's classification accuracy score."""
    normal_dir: Path | None = None
    """Folder of defect-free images: the task becomes binary normal/defect (split like `data.split`)."""
    own_data: Path | None = None
    """Folder in the seed guide's layout (`images/`, `masks/`, `train_labels.txt`, `val_labels.txt` [, `test_labels.txt`]);
    replaces Step 0's NEU-DET splits."""
    num_workers: int = Field(0, ge=0)
    """Data-loader worker processes (results do not depend on it)."""
    eval_batch_size: int = Field(64, ge=1)
    """Images per forward pass in evaluation."""
    max_train_minutes: float | None = Field(None, gt=0)
    """Stop after the first epoch that ends past this wall time (benchmarks under a time budget); null: all epochs."""
    resume: Literal["latest"] | None = None
    """`latest` to continue an interrupted run from `last.pt`."""
    # --- issue 18, parts 5-6: where the masks come from; staged training for large datasets
    mask_source: Literal["boxes", "attention", "cam", "none"] = "boxes"
    """Segmentation targets: `boxes` (Step 0's box masks, own data's masks/); without masks, pseudo-masks of the defect
    training images from the pretrained backbone's CLS-to-patch attention (`attention`, ViTs) or from Grad-CAM of a
    plain classifier trained first for `cam_epochs` (`cam`); `none`: no segmentation loss (classification only)."""
    pseudo_mask_threshold: Literal["otsu"] | float = "otsu"
    """Pseudo-mask rule on each map (min-max scaled to [0, 1]): `otsu` (Otsu's threshold of its 256-bin histogram) or
    a quantile q in (0, 1): the share 1 - q of the pixels with the highest values is defect."""
    cam_epochs: int = Field(5, ge=1)
    """`mask_source: cam`: epochs of the plain classifier whose Grad-CAM maps become the pseudo-masks."""
    stages: list[ClassifierStageConfig] = Field(default_factory=list)
    """Staged training (large datasets, e.g. frozen backbone, then its last blocks, then everything), each stage with
    its own learning rates, warm-up and cosine decay; replaces `freeze_epochs`. Empty: the two-stage schedule."""

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if value != "dinov3" and value not in DINOV3_SIZES and not (value.startswith("timm:") and len(value) > len("timm:")):
            raise ValueError(
                f"classifier.backbone={value!r} must be `dinov3` or `timm:<model name>` (e.g. timm:resnet18) "
                f"or a DINOv3 size ({', '.join(DINOV3_SIZES)})"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ClassifierConfig:
        if self.backbone == "dinov3" and self.backbone_kwargs:
            raise ValueError("classifier.backbone_kwargs applies to timm backbones only; set it to {} for backbone=dinov3")
        if self.freeze_epochs >= self.epochs:
            raise ValueError(f"classifier.freeze_epochs={self.freeze_epochs} must be below classifier.epochs={self.epochs}")
        if self.input == "box_crops" and (self.own_data is not None or self.normal_dir is not None):
            source = "classifier.own_data" if self.own_data is not None else "classifier.normal_dir"
            raise ValueError(f"classifier.input=box_crops needs VOC boxes (Step 0's or Step 4's); {source} has none: unset it or use input=image")
        if self.synthetic_only and self.synthetic == "none":
            raise ValueError("classifier.synthetic_only=true needs classifier.synthetic=step4, step5, classical or copy_paste")
        return self

    @model_validator(mode="after")
    def _weak_masks_and_stages(self) -> ClassifierConfig:
        if isinstance(self.pseudo_mask_threshold, float) and not 0 < self.pseudo_mask_threshold < 1:
            raise ValueError(f"classifier.pseudo_mask_threshold={self.pseudo_mask_threshold} must be `otsu` or a quantile between 0 and 1")
        if self.mask_source in ("attention", "cam") and not self.multitask:
            raise ValueError(f"classifier.mask_source={self.mask_source} makes masks for the segmentation branch; set classifier.multitask=true")
        if self.mask_source in ("attention", "cam") and self.input == "box_crops":
            # Pseudo-masks are made per whole image; box crops come with their boxes, whose masks are the targets.
            raise ValueError(f"classifier.mask_source={self.mask_source} makes whole-image masks for images without boxes; "
                             "classifier.input=box_crops trains on boxes: use mask_source=boxes (or none), or input=image")
        if self.mask_source == "none" and self.loss_weighting == "uncertainty":
            raise ValueError("classifier.mask_source=none has no segmentation loss to weigh; use classifier.loss_weighting=fixed or dynamic")
        if self.stages:
            if self.freeze_epochs:
                raise ValueError("classifier.stages replaces classifier.freeze_epochs; set freeze_epochs: 0")
            total = sum(stage.epochs for stage in self.stages)
            if total != self.epochs:
                raise ValueError(f"classifier.stages last {total} epochs but classifier.epochs={self.epochs}; set classifier.epochs={total}")
            if self.lr_schedule != "warmup_cosine":
                raise ValueError(f"classifier.stages brings its own warm-up + cosine per stage; set classifier.lr_schedule=warmup_cosine (not {self.lr_schedule})")
        return self
