"""Per-image derived files: box masks, diffusion training copies, YOLO labels."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from neu_det_pipeline.data.neu_det import Box
from neu_det_pipeline.io import atomic_write_text


def box_pixel_bounds(box: Box) -> tuple[int, int, int, int]:
    """Pixel index ranges [x0, x1) x [y0, y1) covered by a box (edges rounded to the nearest pixel)."""
    return round(box.xmin), round(box.ymin), round(box.xmax), round(box.ymax)


def box_mask(boxes: Iterable[Box], width: int, height: int) -> Image.Image:
    """Binary mask (0 / 255, mode L) of the union of the boxes."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for box in boxes:
        x0, y0, x1, y1 = box_pixel_bounds(box)
        mask[y0:y1, x0:x1] = 255
    return Image.fromarray(mask, mode="L")


def training_copy(image: Image.Image, resolution: int) -> Image.Image:
    """Square copy for diffusion training: grayscale content, bicubic resize, 3 identical channels."""
    return image.convert("L").resize((resolution, resolution), Image.Resampling.BICUBIC).convert("RGB")


def yolo_label_lines(boxes: Iterable[Box], width: int, height: int, classes: list[str]) -> str:
    """YOLO txt: `class x_center y_center width height`, normalised to [0, 1]."""
    lines = []
    for box in boxes:
        xc = (box.xmin + box.xmax) / 2 / width
        yc = (box.ymin + box.ymax) / 2 / height
        w = (box.xmax - box.xmin) / width
        h = (box.ymax - box.ymin) / height
        lines.append(f"{classes.index(box.label)} {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}\n")
    return "".join(lines)


def boxes_from_yolo(text: str, width: int, height: int, classes: list[str]) -> list[Box]:
    """Inverse of :func:`yolo_label_lines` (up to its 6-decimal rounding)."""
    boxes = []
    for line in text.splitlines():
        cls, xc, yc, w, h = line.split()
        xc, yc, w, h = float(xc) * width, float(yc) * height, float(w) * width, float(h) * height
        boxes.append(Box(classes[int(cls)], xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2))
    return boxes


def write_yolo_data_yaml(yolo_dir: Path, classes: list[str], splits: Iterable[str] | dict[str, str]) -> Path:
    """`data.yaml` without `path:` so ultralytics resolves the splits next to the file (relocatable).

    `splits`: split names (images in `images/<split>`), or split name -> image folder relative to `yolo_dir`.
    """
    payload: dict = dict(splits) if isinstance(splits, dict) else {split: f"images/{split}" for split in splits}
    payload.update(nc=len(classes), names=dict(enumerate(classes)))
    return atomic_write_text(yolo_dir / "data.yaml", yaml.safe_dump(payload, sort_keys=False))
