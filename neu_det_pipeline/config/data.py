"""`data` and `prepare`: where NEU-DET lives, how it is split, Step 0."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from neu_det_pipeline.config.base import NEU_DET_CLASSES, Section, check_distinct


class SplitConfig(Section):
    train: float = 0.70
    """Fraction of each class's images in the training split."""
    val: float = 0.15
    """Fraction of each class's images in the validation split."""
    test: float = 0.15
    """Fraction of each class's images in the test split."""

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        fractions = (self.train, self.val, self.test)
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"data.split fractions must be >= 0 and sum to 1, got {fractions}")
        return self


class DataConfig(Section):
    root: Path = Path("data/neu-det-sample")
    """NEU-DET folder in the original (`IMAGES/`, `ANNOTATIONS/`) or the Kaggle layout."""
    layout: Literal["auto", "original", "kaggle"] = "auto"
    """Dataset layout; `auto` detects it from the folder structure."""
    classes: list[str] = Field(default_factory=lambda: list(NEU_DET_CLASSES))
    """Defect class names, in YOLO label order."""
    strict: bool = False
    """Fail on the first bad file instead of skipping it and reporting it."""
    split: SplitConfig = Field(default_factory=SplitConfig)
    """Stratified train/val/test split by image class."""
    train_fraction: float = Field(1.0, gt=0, le=1)
    """Low-data protocol: fraction of each class's training split kept for Steps 1-4 (seeded); the rest is held
    back (`split: train_heldout`) and only Step 5's real-data oracle trains on it."""

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, classes: list[str]) -> list[str]:
        return check_distinct("data.classes", classes, "names")


class PrepareConfig(Section):
    resolution: int = Field(512, ge=32)
    """Side of the square training copies made for diffusion (PIL bicubic, 3 identical channels)."""
    yolo_export: bool = True
    """Export the real splits in YOLO format with a `data.yaml` ultralytics accepts."""
    contact_sheet_samples: int = Field(6, ge=1)
    """Samples per class (one row each) in the contact sheet."""
    workers: int = Field(0, ge=0)
    """Worker processes for per-image work; 0 uses every available core."""
