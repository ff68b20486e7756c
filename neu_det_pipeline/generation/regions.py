"""Which pixels an inpaint mode regenerates, and pasting the source back everywhere else.

A regenerated region is a weight per output pixel: 1 where the new image is kept as generated, 0 where the source is
kept exactly, in between on a feathered band (the output is `w * generated + (1 - w) * source`, rounded):

- `inpaint_defects`: 1 on the boxes (and the transplant seam band), falling linearly to 0 over `mask_dilation`
  pixels outside them: the boxes grow by `mask_dilation` px (Euclidean distance), their surroundings blend in.
- `inpaint_background`: 0 on the boxes (the real defects stay exact), rising linearly to 1 over `mask_dilation`
  pixels outside them; transplant seam bands are regenerated in this mode too.

`mask_dilation: 0` gives hard edges. The pipeline gets the region's support (every pixel with a weight above 0) as
its binary mask at the generation resolution.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image
from scipy import ndimage

from neu_det_pipeline.data.export import box_mask
from neu_det_pipeline.data.neu_det import Box


def feather_outside(region: np.ndarray, width: int) -> np.ndarray:
    """float32 weights: 1 on `region` (bool), `1 - d / (width + 1)` at distance d <= `width` px from it, 0 beyond."""
    if width == 0 or not region.any():
        return region.astype(np.float32)
    distance = ndimage.distance_transform_edt(~region)
    return np.clip(1.0 - distance / (width + 1), 0.0, 1.0).astype(np.float32)


def regeneration_weights(
    mode: str, boxes: Iterable[Box], width: int, height: int, dilation: int, seam: np.ndarray | None = None
) -> np.ndarray:
    """(height, width) float32 weights of the generated image for an inpaint `mode` (see the module docstring)."""
    in_boxes = np.asarray(box_mask(boxes, width, height)) > 0
    seam_band = np.zeros_like(in_boxes) if seam is None else seam > 0
    if mode == "inpaint_defects":
        return feather_outside(in_boxes | seam_band, dilation)
    if mode == "inpaint_background":
        return 1.0 - feather_outside(in_boxes & ~seam_band, dilation)
    raise ValueError(f"no regenerated region for generation.mode={mode!r}")


def pipeline_mask(weights: np.ndarray, resolution: int) -> Image.Image:
    """0/255 mask at the generation resolution covering every pixel with a weight above 0 (bilinear, so a thin band
    stays covered when the output is larger than the generation resolution)."""
    support = Image.fromarray(np.where(weights > 0, 255, 0).astype(np.uint8), mode="L")
    scaled = np.asarray(support.resize((resolution, resolution), Image.Resampling.BILINEAR))
    return Image.fromarray(np.where(scaled > 0, 255, 0).astype(np.uint8), mode="L")


def paste_back(generated: Image.Image, source: Image.Image, weights: np.ndarray) -> Image.Image:
    """`weights * generated + (1 - weights) * source`, rounded: exactly the source where the weight is 0.

    Both images have the output's size and mode (L or RGB)."""
    if generated.size != source.size or generated.mode != source.mode:
        raise ValueError(f"generated {generated.size} {generated.mode} and source {source.size} {source.mode} differ")
    new = np.asarray(generated, dtype=np.float32)
    old = np.asarray(source, dtype=np.float32)
    w = weights if new.ndim == 2 else weights[..., None]
    mixed = np.rint(w * new + (1.0 - w) * old)
    return Image.fromarray(mixed.astype(np.uint8), mode=source.mode)
