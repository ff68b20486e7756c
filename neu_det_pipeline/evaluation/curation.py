"""Which synthetic images may train a detector: each rule rejects with a reason and a detail.

    degenerate          blank, near-constant, all-black (a NaN decode) or saturated
    memorised           a near-copy of a real training image, also flipped or rotated by 90 degrees
    off-class           the real-data detector's most confident box has another class (or there is none)
    label-inconsistent  the detector finds none of the boxes the image carries from its source

The first rule that fires decides the reason; the curated set is the Step 4 rows no rule rejected.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from neu_det_pipeline.artifacts import MANIFEST_FILE
from neu_det_pipeline.config import CurationConfig
from neu_det_pipeline.io import atomic_write_text, link_or_copy, write_jsonl

REASONS = ("degenerate", "memorised", "off-class", "label-inconsistent")
REJECTIONS_FILE = "rejections.jsonl"

# The eight symmetries of the square: a memorised image may come back flipped or rotated.
DIHEDRAL = {
    "identity": lambda a: a,
    "hflip": lambda a: a[..., :, ::-1],
    "vflip": lambda a: a[..., ::-1, :],
    "rot90": lambda a: np.rot90(a, 1, axes=(-2, -1)),
    "rot180": lambda a: np.rot90(a, 2, axes=(-2, -1)),
    "rot270": lambda a: np.rot90(a, 3, axes=(-2, -1)),
    "transpose": lambda a: np.swapaxes(a, -2, -1),
    "antitranspose": lambda a: np.rot90(np.swapaxes(a, -2, -1), 2, axes=(-2, -1)),
}


@dataclass(frozen=True)
class Rejection:
    name: str
    image_class: str
    reason: str
    detail: str

    def to_record(self) -> dict[str, str]:
        return {"name": self.name, "class": self.image_class, "reason": self.reason, "detail": self.detail}


def degenerate_detail(pixels: np.ndarray, min_std: float, max_saturated_fraction: float) -> str | None:
    """Why an image is degenerate, or None."""
    std = float(pixels.std())
    if pixels.max() == 0:
        return "all black (a NaN decode?)"
    if std < min_std:
        return f"near-constant (std {std:.2f} < {min_std} gray levels)"
    saturated = float(np.mean((pixels == 0) | (pixels == 255)))
    if saturated > max_saturated_fraction:
        return f"saturated ({saturated:.0%} of pixels at 0 or 255)"
    return None


def thumbnails(pixels: np.ndarray, size: int) -> np.ndarray:
    """(N, size, size) zero-mean, unit-norm grayscale thumbnails: their dot product is a correlation."""
    small = np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BOX), np.float32) for p in pixels])
    small -= small.mean(axis=(1, 2), keepdims=True)
    norms = np.sqrt((small**2).sum(axis=(1, 2), keepdims=True))
    return small / np.maximum(norms, 1e-6)


def nearest_copies(synth: np.ndarray, real: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """For each synthetic image: the highest correlation with any real image under any square symmetry,
    the real index and the symmetry."""
    synth_flat = thumbnails(synth, size).reshape(len(synth), -1)
    real_thumbs = thumbnails(real, size)
    best = np.full(len(synth), -np.inf, np.float32)
    index = np.zeros(len(synth), np.int64)
    transform = ["identity"] * len(synth)
    for name, apply in DIHEDRAL.items():
        similarity = synth_flat @ np.ascontiguousarray(apply(real_thumbs)).reshape(len(real), -1).T
        top = similarity.argmax(axis=1)
        values = similarity[np.arange(len(synth)), top]
        for i in np.flatnonzero(values > best):
            best[i], index[i], transform[i] = values[i], top[i], name
    return best, index, transform


def curate(
    rows: list[dict[str, Any]],
    synth_pixels: np.ndarray,
    real_pixels: np.ndarray,
    real_names: list[str],
    config: CurationConfig,
    consistency: dict[str, dict[str, Any]] | None,
) -> tuple[list[dict[str, Any]], list[Rejection], list[float]]:
    """Apply the rules to Step 4 `rows` (aligned with `synth_pixels`); `consistency` (name -> {"agrees",
    "recall", "top"}) is None when the label rule is off. Returns kept rows, rejections, copy similarities."""
    similarity, nearest, transform = nearest_copies(synth_pixels, real_pixels, config.memorised_size)
    kept, rejected = [], []
    for i, row in enumerate(rows):
        found = degenerate_detail(synth_pixels[i], config.min_std, config.max_saturated_fraction)
        reason = "degenerate" if found else None
        if reason is None and similarity[i] >= config.memorised_similarity:
            reason = "memorised"
            found = f"correlation {similarity[i]:.3f} with {real_names[nearest[i]]} ({transform[i]})"
        if reason is None and consistency is not None:
            check = consistency[row["name"]]
            if not check["agrees"]:
                reason, found = "off-class", f"top detection: {check['top'] or 'none'}"
            elif check["recall"] == 0:
                reason, found = "label-inconsistent", f"none of its {len(row['boxes'])} boxes detected at IoU 0.5"
        if reason is None:
            kept.append(row)
        else:
            rejected.append(Rejection(row["name"], row["class"], reason, found))
    return kept, rejected, [round(float(s), 4) for s in similarity]


def rejection_table(rejections: list[Rejection], classes: list[str]) -> dict[str, dict[str, int]]:
    """reason -> class -> count (every reason and class listed)."""
    counts = Counter((r.reason, r.image_class) for r in rejections)
    return {reason: {name: counts[reason, name] for name in classes} for reason in REASONS}


def write_curated(out_dir: Path, step4_dir: Path, kept: list[dict[str, Any]], rejections: list[Rejection], names: list[str]) -> None:
    """`curated/`: the kept Step 4 rows (unchanged), a YOLO dataset of them and the rejections."""
    yolo = out_dir / "yolo"
    for row in kept:
        link_or_copy(step4_dir / row["yolo_image"], yolo / "images" / Path(row["yolo_image"]).name)
        link_or_copy(step4_dir / row["yolo_label"], yolo / "labels" / Path(row["yolo_label"]).name)
    data = {"train": "images", "val": "images", "nc": len(names), "names": dict(enumerate(names))}
    atomic_write_text(yolo / "data.yaml", yaml.safe_dump(data, sort_keys=False))
    write_jsonl(out_dir / REJECTIONS_FILE, [r.to_record() for r in rejections])
    write_jsonl(out_dir / MANIFEST_FILE, kept)
