"""Defect transplant geometry (`generation.layout: transplant`): placement, pasting, seams, augmentations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neu_det_pipeline.config import GenerationConfig
from neu_det_pipeline.data.export import box_mask
from neu_det_pipeline.data.neu_det import Box
from neu_det_pipeline.generation.controls import AUGMENTATIONS, augment_image
from neu_det_pipeline.generation.transplant import (
    Donor,
    augment_transplant,
    donors_from_rows,
    transplant_defects,
)

SIZE = 64
SEAM = 2


def noise_image(seed: int, shape: tuple[int, ...] = (SIZE, SIZE)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def donor(seed: int, box: Box, mask_box: Box | None = None) -> Donor:
    """A donor cut from a noise image with the Step 0 mask of `mask_box` (default: the box itself)."""
    mask = np.asarray(box_mask([mask_box or box], SIZE, SIZE))
    return Donor.from_image(f"donor-{seed}", noise_image(seed), mask, box)


TARGET_BOXES = [Box("patches", 4, 4, 20, 16), Box("patches", 40, 30, 52, 60)]
DONORS = [donor(1, Box("patches", 10, 10, 22, 18)), donor(2, Box("patches", 30, 5, 38, 25))]


def overlap(a: Box, b: Box, clearance: float = 0) -> bool:
    return (a.xmin < b.xmax + clearance and b.xmin < a.xmax + clearance
            and a.ymin < b.ymax + clearance and b.ymin < a.ymax + clearance)


def transplant(seed: int, count: int = 3):
    return transplant_defects(noise_image(0), TARGET_BOXES, DONORS, count, np.random.default_rng(seed), SEAM)


@pytest.mark.parametrize("seed", range(5))
def test_new_boxes_lie_inside_the_image_apart_from_every_other_box(seed: int) -> None:
    result = transplant(seed)
    assert len(result.placements) == result.requested == 3
    assert result.boxes[:2] == TARGET_BOXES and result.boxes[2:] == [p.box for p in result.placements]
    for i, placement in enumerate(result.placements):
        box = placement.box
        assert 0 <= box.xmin < box.xmax <= SIZE and 0 <= box.ymin < box.ymax <= SIZE
        donor_box = placement.donor_box
        assert (box.xmax - box.xmin, box.ymax - box.ymin) == (donor_box.xmax - donor_box.xmin, donor_box.ymax - donor_box.ymin)
        others = [b for j, b in enumerate(result.boxes) if j != i + len(TARGET_BOXES)]
        assert not any(overlap(box, other, clearance=SEAM) for other in others)


def test_a_tight_strip_keeps_the_seam_clearance() -> None:
    """Only a 14 px strip is free under a box ending at y = 50: an 8 px tall donor fits at y 52..56 (2 px apart)."""
    wall = [Box("patches", 0, 0, SIZE, 50)]
    tops = {
        transplant_defects(noise_image(0), wall, [DONORS[0]], 1, np.random.default_rng(seed), SEAM).placements[0].box.ymin
        for seed in range(40)
    }
    assert tops == {52.0, 53.0, 54.0, 55.0, 56.0}


def test_pasted_pixels_are_the_donors_inside_its_mask_and_the_targets_elsewhere() -> None:
    # Mask covering the donor box's left half only: the right half keeps the target's pixels.
    half = donor(3, Box("patches", 10, 10, 30, 20), mask_box=Box("patches", 10, 10, 20, 20))
    target = noise_image(0)
    result = transplant_defects(target, TARGET_BOXES, [half], 1, np.random.default_rng(0), SEAM)
    (placement,) = result.placements
    x, y = int(placement.box.xmin), int(placement.box.ymin)
    pasted = result.image[y : y + 10, x : x + 20]
    assert np.array_equal(pasted[:, :10], noise_image(3)[10:20, 10:20])
    assert np.array_equal(pasted[:, 10:], target[y : y + 10, x + 10 : x + 20])
    outside = np.ones(target.shape, dtype=bool)
    outside[y : y + 10, x : x + 20] = False
    assert np.array_equal(result.image[outside], target[outside])
    assert not np.shares_memory(result.image, target)


def test_soft_masks_blend() -> None:
    crop = np.full((4, 4), 200, dtype=np.uint8)
    alpha = np.full((4, 4), 0.25, dtype=np.float32)
    soft = Donor("soft", Box("patches", 0, 0, 4, 4), crop, alpha)
    target = np.full((SIZE, SIZE), 100, dtype=np.uint8)
    result = transplant_defects(target, [], [soft], 1, np.random.default_rng(0), SEAM)
    box = result.placements[0].box
    assert np.all(result.image[int(box.ymin) : int(box.ymax), int(box.xmin) : int(box.xmax)] == 125)


def test_the_seam_mask_is_a_band_around_each_pasted_box() -> None:
    result = transplant(0)
    seam = result.seam_mask > 0
    assert result.seam_mask.dtype == np.uint8 and set(np.unique(result.seam_mask)) <= {0, 255}
    expected = np.zeros_like(seam)
    for placement in result.placements:
        x0, y0, x1, y1 = (int(v) for v in (placement.box.xmin, placement.box.ymin, placement.box.xmax, placement.box.ymax))
        # Every pixel within SEAM of the edge, on either side, is in the band; the box's core is not.
        band = np.zeros_like(seam)
        band[max(0, y0 - SEAM) : y1 + SEAM, max(0, x0 - SEAM) : x1 + SEAM] = True
        band[y0 + SEAM : y1 - SEAM, x0 + SEAM : x1 - SEAM] = False
        assert seam[y0, x0:x1].all() and seam[y1 - 1, x0:x1].all() and seam[y0:y1, x0].all() and seam[y0:y1, x1 - 1].all()
        assert not seam[y0 + SEAM : y1 - SEAM, x0 + SEAM : x1 - SEAM].any()
        expected |= band
    assert np.array_equal(seam, expected)  # nothing else, in particular none of the target's own boxes
    for box in TARGET_BOXES:
        assert not seam[int(box.ymin) : int(box.ymax), int(box.xmin) : int(box.xmax)].any()


def test_same_seed_same_result_other_seed_other_layout() -> None:
    a, b, c = transplant(7), transplant(7), transplant(8)
    assert np.array_equal(a.image, b.image) and a.boxes == b.boxes and np.array_equal(a.seam_mask, b.seam_mask)
    assert a.placements == b.placements
    assert a.boxes != c.boxes


def test_a_full_image_places_what_fits_and_skips_donors_that_fit_nowhere() -> None:
    big = donor(4, Box("patches", 0, 0, 60, 60))
    # The big donor never fits beside the target's boxes: only the small ones are placed.
    result = transplant_defects(noise_image(0), TARGET_BOXES, [big, *DONORS], 2, np.random.default_rng(0), SEAM)
    assert len(result.placements) == 2 and all(p.donor_id != "donor-4" for p in result.placements)
    # No room at all: nothing placed, the image unchanged, and the request remembered.
    whole = [Box("patches", 0, 0, SIZE, SIZE)]
    empty = transplant_defects(noise_image(0), whole, DONORS, 2, np.random.default_rng(0), SEAM)
    assert empty.placements == [] and empty.requested == 2 and empty.boxes == whole
    assert np.array_equal(empty.image, noise_image(0)) and not empty.seam_mask.any()
    # Asking for more than fits stops at what fits, each one apart from the others.
    many = transplant_defects(noise_image(0), TARGET_BOXES, DONORS, 50, np.random.default_rng(0), SEAM)
    assert 3 < len(many.placements) < 50


@pytest.mark.parametrize("augmentation", [a for a in AUGMENTATIONS if a != "none"])
def test_layout_augmentations_keep_the_boxes_exact(augmentation: str) -> None:
    target = noise_image(0)
    target[:, :32] = 0  # an asymmetric target, so a wrong move shows
    result = transplant_defects(target, TARGET_BOXES, DONORS, 2, np.random.default_rng(1), SEAM)
    moved = augment_transplant(result, augmentation)
    assert np.array_equal(moved.image, np.asarray(augment_image(Image.fromarray(result.image), augmentation)))
    assert np.array_equal(moved.seam_mask, np.asarray(augment_image(Image.fromarray(result.seam_mask), augmentation)))
    assert len(moved.boxes) == len(result.boxes) and moved.requested == result.requested
    for before, after in zip(result.boxes, moved.boxes):
        # The pixels under every box, moved, are the pixels under the moved box.
        crop = result.image[int(before.ymin) : int(before.ymax), int(before.xmin) : int(before.xmax)]
        moved_crop = moved.image[int(after.ymin) : int(after.ymax), int(after.xmin) : int(after.xmax)]
        assert np.array_equal(np.asarray(augment_image(Image.fromarray(crop), augmentation)), moved_crop)
    assert [p.box for p in moved.placements] == moved.boxes[2:]
    assert [p.donor_box for p in moved.placements] == [p.donor_box for p in result.placements]
    assert augment_transplant(result, "none") is result
    record = moved.placements[0].record()
    placement = moved.placements[0]
    assert record == {
        "donor": placement.donor_id, "donor_file": "",
        "donor_box": [placement.donor_box.xmin, placement.donor_box.ymin, placement.donor_box.xmax, placement.donor_box.ymax],
        "box": [placement.box.xmin, placement.box.ymin, placement.box.xmax, placement.box.ymax],
    }


def test_rgb_targets_and_bad_inputs() -> None:
    rgb = noise_image(0, (SIZE, SIZE, 3))
    rgb_donor = Donor.from_image("rgb", noise_image(5, (SIZE, SIZE, 3)), np.asarray(box_mask([DONORS[0].box], SIZE, SIZE)), DONORS[0].box)
    result = transplant_defects(rgb, TARGET_BOXES, [rgb_donor], 1, np.random.default_rng(0), SEAM)
    box = result.placements[0].box
    assert np.array_equal(result.image[int(box.ymin) : int(box.ymax), int(box.xmin) : int(box.xmax)], rgb_donor.crop)
    with pytest.raises(ValueError, match="channels"):
        transplant_defects(rgb, [], DONORS, 1, np.random.default_rng(0), SEAM)
    with pytest.raises(ValueError, match="at least one donor"):
        transplant_defects(rgb, [], [], 1, np.random.default_rng(0), SEAM)
    with pytest.raises(ValueError, match="count"):
        transplant_defects(rgb, [], [rgb_donor], 0, np.random.default_rng(0), SEAM)


def test_donors_from_step0_rows(tmp_path: Path) -> None:
    boxes = [Box("scratches", 2, 3, 12, 9), Box("scratches", 30, 30, 40, 50)]
    Image.fromarray(noise_image(6)).save(tmp_path / "a.bmp")
    box_mask(boxes, SIZE, SIZE).save(tmp_path / "a-mask.png")
    row = {"id": "a", "boxes": [vars(box) for box in boxes]}
    donors = donors_from_rows([row], lambda row: tmp_path / f"{row['id']}.bmp", lambda row: tmp_path / f"{row['id']}-mask.png")
    assert [d.box for d in donors] == boxes and all(d.source_id == "a" for d in donors)
    assert donors[0].source_file == str(tmp_path / "a.bmp")
    assert np.array_equal(donors[0].crop, noise_image(6)[3:9, 2:12]) and np.all(donors[0].alpha == 1.0)


def test_layout_config() -> None:
    section = GenerationConfig(layout="transplant", transplant_count=3, transplant_seam_width=6)
    assert (section.layout, section.transplant_count, section.transplant_seam_width) == ("transplant", 3, 6)
    assert GenerationConfig().layout == "source"
    with pytest.raises(ValueError):
        GenerationConfig(transplant_count=0)
