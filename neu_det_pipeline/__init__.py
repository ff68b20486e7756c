"""neu-det-pipeline: diffusion-based data augmentation for NEU-DET steel-surface defects."""

__version__ = "0.1.0"
