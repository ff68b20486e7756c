"""Step 6's downstream classifier: DINOv3 (or timm) backbone, segmentation decoder, mask-guided attention pooling.

backbones    backbones by name, each giving a feature grid and a global (CLS) feature
backbone_sizes  DINOv3 ViTs by size name (dinov3-s ... dinov3-7b): timm and transformers hub names
model        the attention-guided multitask classifier, its mask-guided pooling, the guide's wrapper head
losses       classification losses, BCE + Dice, multi-task weighting (fixed, dynamic, uncertainty)
data         Step 0 / synthetic / own-data examples (images or box crops), albumentations image + mask augmentation, seeded order
checkpoints  best.pt / last.pt written atomically, read back weights-only
training     two-stage training (AdamW or SGD, warm-up cosine or warm restarts) with exact resume
stages       the stage plan (two stages, or `classifier.stages`: head, last blocks, all) and its LR schedule
weak_masks   pseudo-masks from backbone attention or Grad-CAM (`classifier.mask_source`)
data_tools   `neu-det data organize | dummy | check` for the own-data layout
evaluation   accuracy, macro-F1, per-class report, mask IoU / Dice, plots
inference    predictions with overlays from a checkpoint or an ONNX file (per image, or per box with --boxes); ONNX export with a parity check
"""
