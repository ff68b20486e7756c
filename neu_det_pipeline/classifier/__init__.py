"""Step 6's downstream classifier: DINOv3 (or timm) backbone, segmentation decoder, mask-guided attention pooling.

backbones    backbones by name, each giving a feature grid and a global (CLS) feature
model        the attention-guided multitask classifier and its mask-guided pooling
losses       classification losses, BCE + Dice, multi-task weighting (fixed, dynamic, uncertainty)
data         Step 0 / synthetic / own-data examples, joint image + mask augmentation, seeded order
checkpoints  best.pt / last.pt written atomically, read back weights-only
training     two-stage training with exact resume
evaluation   accuracy, macro-F1, per-class report, mask IoU / Dice, plots
inference    predictions with overlays from a checkpoint or an ONNX file; ONNX export with a parity check
"""
