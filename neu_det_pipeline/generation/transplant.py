"""Defect transplant: paste real defects of a class at new free positions of another real image of that class.

The geometry of `generation.layout: transplant` (Step 4), independent of any model:

    donors = donors_from_rows(rows_of_the_class, image_path, mask_path)   # or Donor.from_image(...) per box
    result = transplant_defects(target, target_boxes, donors, count=2, rng=np.random.default_rng(seed), seam_width=4)
    result = augment_transplant(result, "rot90")        # a `generation.layout_augmentations` entry, or "none"
    result.image       composited pixels (same shape and dtype as `target`)
    result.boxes       the target's boxes followed by one new box per placement (exact pixel-edge coordinates)
    result.seam_mask   uint8 0/255, H x W: band of `seam_width` px on both sides of every pasted box's edge, to inpaint
    result.placements  one `Placement` (donor id and file, donor box, new box) per pasted defect; `.record()` for
                       the manifest

- Pasting: `image = alpha * donor + (1 - alpha) * target` inside the new box, with `alpha` the donor's Step 0
  mask cropped to its box (0/255 -> 0/1); where the mask is 255 the pasted pixels equal the donor's exactly.
- Positions: uniform over every integer top-left corner at which the crop lies inside the image and keeps
  `seam_width` px of clearance from every existing and already-placed box (so no seam band reaches another
  defect). The free positions are computed exactly (a summed-area table), so there is no retry loop: a donor
  that fits nowhere is skipped for another donor of the list, drawn in random order; when no donor fits, the
  transplant stops and returns fewer placements than `count` (`Transplant.requested` keeps `count`).
- Donors: boxes of other training images of the target's class (leave the target's own boxes out).
- Determinism: the result depends on the inputs and the state of `rng` alone (seed it per image).
- Everything is in the target's pixel grid (NEU-DET: 200 x 200 source images, the donors' size too): transplant
  first, then resize/augment the composite and its boxes; control maps should come from the composite, so
  that the ControlNets see the pasted defects.
- Layout augmentations compose: `augment_transplant` moves image, seam mask and every box the way
  `controls.augment_image` / `controls.augment_box` move Step 4's maps and labels, so the pasted pixels stay
  exactly inside their (moved) boxes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from neu_det_pipeline.data.export import box_pixel_bounds
from neu_det_pipeline.data.neu_det import Box
from neu_det_pipeline.generation.controls import augment_box, augment_image


@dataclass(frozen=True)
class Donor:
    """One real defect: the pixels of its box and the Step 0 mask over the same pixels."""

    source_id: str
    """Step 0 id of the image the defect comes from."""
    box: Box
    """The defect's box in its own image."""
    crop: np.ndarray
    """Pixels of the box, (h, w) or (h, w, c), same dtype and channel layout as the targets."""
    alpha: np.ndarray
    """(h, w) float32 in [0, 1]: the Step 0 mask over the box (1 = defect pixel, pasted as is)."""
    source_file: str = ""
    """The donor image's file (for the manifest)."""

    @classmethod
    def from_image(cls, source_id: str, image: np.ndarray, mask: np.ndarray, box: Box, source_file: str = "") -> Donor:
        """Cut `box` (rounded to whole pixels) out of `image` and of its Step 0 `mask` (uint8 0/255 or bool)."""
        if image.shape[:2] != mask.shape[:2]:
            raise ValueError(f"donor {source_id}: image {image.shape[:2]} and mask {mask.shape[:2]} differ in size")
        x0, y0, x1, y1 = box_pixel_bounds(box)
        alpha = mask[y0:y1, x0:x1].astype(np.float32)
        if mask.dtype != bool:
            alpha /= 255.0
        return cls(source_id, box, image[y0:y1, x0:x1].copy(), alpha, source_file)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.crop.shape[1], self.crop.shape[0]


def donors_from_rows(
    rows: Iterable[dict[str, Any]], image_path: Callable[[dict[str, Any]], Path], mask_path: Callable[[dict[str, Any]], Path],
    mode: str = "L", source_file: Callable[[dict[str, Any]], str] | None = None,
) -> list[Donor]:
    """One donor per box of each Step 0 manifest row: the image (`mode`) at `image_path(row)`, cut with the Step 0
    mask at `mask_path(row)` (`masks/<id>.png`, the image's size). `source_file(row)` names the donor's file in the
    manifest (default: the image path)."""
    donors = []
    for row in rows:
        with Image.open(image_path(row)) as image, Image.open(mask_path(row)) as mask:
            pixels, mask_pixels = np.asarray(image.convert(mode)), np.asarray(mask.convert("L"))
        name = source_file(row) if source_file else str(image_path(row))
        donors += [Donor.from_image(row["id"], pixels, mask_pixels, Box(**box), name) for box in row["boxes"]]
    return donors


@dataclass(frozen=True)
class Placement:
    """Where a pasted defect came from and where it went (manifest provenance)."""

    donor_id: str
    donor_file: str
    donor_box: Box
    box: Box
    """The new box in the (possibly augmented) output image."""

    def record(self) -> dict[str, object]:
        return {
            "donor": self.donor_id,
            "donor_file": self.donor_file,
            "donor_box": [self.donor_box.xmin, self.donor_box.ymin, self.donor_box.xmax, self.donor_box.ymax],
            "box": [self.box.xmin, self.box.ymin, self.box.xmax, self.box.ymax],
        }


@dataclass(frozen=True)
class Transplant:
    image: np.ndarray
    boxes: list[Box]
    """The target's boxes, then one per placement."""
    seam_mask: np.ndarray
    """uint8 0/255 (H, W): the band around every pasted box's edge that the seam inpainting regenerates."""
    placements: list[Placement]
    requested: int
    """The `count` asked for; `len(placements)` is smaller when the image had no room left."""


def summed_area_table(blocked: np.ndarray) -> np.ndarray:
    """(H + 1, W + 1) table whose [y, x] entry counts the blocked pixels above and left of (x, y)."""
    table = np.zeros((blocked.shape[0] + 1, blocked.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = blocked.astype(np.int64).cumsum(0).cumsum(1)
    return table


def free_positions(table: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, 2) array of every (x, y) top-left corner at which a `width` x `height` window lies inside the image and
    covers no blocked pixel; `table` is the blocked map's :func:`summed_area_table`."""
    rows, cols = table.shape[0] - 1, table.shape[1] - 1
    if width > cols or height > rows:
        return np.empty((0, 2), dtype=np.int64)
    counts = table[height:, width:] - table[:-height, width:] - table[height:, :-width] + table[:-height, :-width]
    ys, xs = np.nonzero(counts == 0)
    return np.stack([xs, ys], axis=1)


def _block(blocked: np.ndarray, box: Box, clearance: int) -> None:
    x0, y0, x1, y1 = box_pixel_bounds(box)
    rows, cols = blocked.shape
    blocked[max(0, y0 - clearance) : min(rows, y1 + clearance), max(0, x0 - clearance) : min(cols, x1 + clearance)] = True


def seam_band(box: Box, width: int, height: int, seam_width: int) -> np.ndarray:
    """Bool (height, width): pixels within `seam_width` of the box's edge, inside or outside it."""
    x0, y0, x1, y1 = box_pixel_bounds(box)
    band = np.zeros((height, width), dtype=bool)
    band[max(0, y0 - seam_width) : y1 + seam_width, max(0, x0 - seam_width) : x1 + seam_width] = True
    band[y0 + seam_width : max(y0 + seam_width, y1 - seam_width), x0 + seam_width : max(x0 + seam_width, x1 - seam_width)] = False
    return band


def _paste(image: np.ndarray, donor: Donor, x: int, y: int) -> None:
    w, h = donor.size
    alpha = donor.alpha if image.ndim == 2 else donor.alpha[..., None]
    region = image[y : y + h, x : x + w].astype(np.float32)
    mixed = alpha * donor.crop.astype(np.float32) + (1.0 - alpha) * region
    if np.issubdtype(image.dtype, np.integer):
        mixed = np.rint(mixed)
    image[y : y + h, x : x + w] = mixed.astype(image.dtype)


def transplant_defects(
    target: np.ndarray,
    target_boxes: list[Box],
    donors: list[Donor],
    count: int,
    rng: np.random.Generator,
    seam_width: int,
) -> Transplant:
    """Paste up to `count` donor defects at free positions of `target` (see the module docstring)."""
    if count < 1:
        raise ValueError(f"transplant count must be >= 1, got {count}")
    if seam_width < 0:
        raise ValueError(f"seam width must be >= 0, got {seam_width}")
    if not donors:
        raise ValueError("transplant needs at least one donor defect of the target's class")
    for donor in donors:
        if donor.crop.ndim != target.ndim or donor.crop.shape[2:] != target.shape[2:]:
            raise ValueError(
                f"donor {donor.source_id} crop {donor.crop.shape} and target {target.shape} differ in channels"
            )
    height, width = target.shape[:2]
    image = target.copy()
    blocked = np.zeros((height, width), dtype=bool)
    for box in target_boxes:
        _block(blocked, box, seam_width)
    seam = np.zeros((height, width), dtype=bool)
    placements: list[Placement] = []
    for _ in range(count):
        placed = False
        table = summed_area_table(blocked)
        for index in rng.permutation(len(donors)):
            donor = donors[index]
            w, h = donor.size
            positions = free_positions(table, w, h)
            if len(positions) == 0:
                continue
            x, y = (int(v) for v in positions[rng.integers(len(positions))])
            new_box = Box(donor.box.label, float(x), float(y), float(x + w), float(y + h))
            _paste(image, donor, x, y)
            _block(blocked, new_box, seam_width)
            seam |= seam_band(new_box, width, height, seam_width)
            placements.append(Placement(donor.source_id, donor.source_file, donor.box, new_box))
            placed = True
            break
        if not placed:
            break
    return Transplant(
        image=image,
        boxes=[*target_boxes, *(p.box for p in placements)],
        seam_mask=seam.astype(np.uint8) * 255,
        placements=placements,
        requested=count,
    )


def _augment_array(array: np.ndarray, augmentation: str) -> np.ndarray:
    return np.asarray(augment_image(Image.fromarray(array), augmentation))


def augment_transplant(result: Transplant, augmentation: str) -> Transplant:
    """`result` moved by a layout augmentation exactly as Step 4 moves its maps and boxes."""
    if augmentation == "none":
        return result
    height, width = result.image.shape[:2]

    def move(box: Box) -> Box:
        return augment_box(box, width, height, augmentation)

    return Transplant(
        image=_augment_array(result.image, augmentation),
        boxes=[move(box) for box in result.boxes],
        seam_mask=_augment_array(result.seam_mask, augmentation),
        placements=[replace(p, box=move(p.box)) for p in result.placements],
        requested=result.requested,
    )
