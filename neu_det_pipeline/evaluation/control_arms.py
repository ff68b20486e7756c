"""The utility test's control arms: as many added images as the synthetic arm, made cheaply from real training images.

- `real+classical`: albumentations transforms (flips, 90-degree rotations, a box-safe random crop resized back,
  brightness / contrast, noise, blur) of a real training image, its boxes transformed with its pixels.
- `real+copy_paste`: a defect box of another real training image of the same class pasted into a real training
  image with a feathered alpha edge (the inner pixels are the donor's), at a random place that overlaps no box
  already there (scaled down when only a smaller patch fits); the pasted box is added to the image's boxes.

Each arm is written as a dataset in Step 4's layout (`images/<class>/`, `labels/`, `masks/`, `yolo/`,
`manifest.jsonl`, through Step 4's own writers) so Step 5 trains YOLO on it and Step 6 can mix it in
(`classifier.synthetic`). Every image depends on (seed, its position in the list) alone: deterministic per seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from neu_det_pipeline.data.export import box_pixel_bounds
from neu_det_pipeline.data.neu_det import Box
from neu_det_pipeline.generation.outputs import (
    ManifestPart,
    boxes_record,
    finished_rows,
    merge_manifest,
    relative_paths,
    write_image_files,
)
from neu_det_pipeline.generation.plan import image_seed as plan_seed
from neu_det_pipeline.generation.transplant import free_positions, summed_area_table

CLASSICAL = "real+classical"
COPY_PASTE = "real+copy_paste"
ARM_FOLDERS = {CLASSICAL: "classical", COPY_PASTE: "copy_paste"}
"""Control arm -> its dataset's name (`classifier.synthetic` takes it too)."""
CONTROL_ARMS_DIR = "control_arms"
FEATHER_PX = 4
"""Width of the alpha ramp at a pasted patch's edge; pixels further inside are the donor's exactly."""
PASTE_SCALES = (1.0, 0.75, 0.5, 0.35)
"""Sizes a donor box is tried at, largest first, when it does not fit at its own size."""
CANDIDATES_PER_SCALE = 64
"""Donor boxes tried per size (bounds the time spent on an image whose boxes leave no room)."""


@dataclass(frozen=True)
class RealImage:
    """A real training image: Step 0 id, class, path of the original file and its boxes (pixel-edge coordinates)."""

    id: str
    image_class: str
    path: Path
    boxes: tuple[Box, ...]

    @classmethod
    def from_step0(cls, row: dict[str, Any], data_root: Path) -> RealImage:
        return cls(row["id"], row["class"], data_root / row["source"], tuple(Box(**box) for box in row["boxes"]))

    def pixels(self) -> np.ndarray:
        with Image.open(self.path) as image:
            return np.asarray(image.convert("L"))


def arm_dataset_dir(step5_dir: Path, folder: str, generation_seed: int) -> Path:
    """Where Step 5 writes a control arm's dataset: `control_arms/<classical|copy_paste>-g<generation seed>/`."""
    return step5_dir / CONTROL_ARMS_DIR / f"{folder}-g{generation_seed}"


def round_robin_targets(images: list[RealImage], count_per_class: dict[str, int], seed: int) -> list[RealImage]:
    """`count_per_class[c]` images of each class, cycling through a seeded order of its real images (each once
    before any twice): the targets when no synthetic arm fixes them."""
    targets = []
    for image_class, count in sorted(count_per_class.items()):
        pool = sorted((image for image in images if image.image_class == image_class), key=lambda image: image.id)
        random.Random(f"{seed}:targets:{image_class}").shuffle(pool)
        targets += [pool[k % len(pool)] for k in range(count)] if pool else []
    return targets


# ------------------------------------------------------------------------------------------ classical


def classical_transform(seed: int, height: int, width: int):
    """The classical pipeline: geometric transforms that keep every box inside the image, then photometric ones."""
    import albumentations as A

    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5) if height == width else A.NoOp(),
            A.RandomSizedBBoxSafeCrop(height=height, width=width, erosion_rate=0.0, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.8),
            A.GaussNoise(std_range=(0.01, 0.05), p=0.3),
            A.GaussianBlur(blur_limit=(3, 5), p=0.2),
        ],
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True),
        seed=seed,
    )


def classical_image(image: RealImage, seed: int) -> tuple[np.ndarray, list[Box], str]:
    """One augmented copy: pixels, transformed boxes, and the transforms that applied (for the manifest)."""
    pixels = image.pixels()
    transform = classical_transform(seed, *pixels.shape)
    transform.save_applied_params = True
    out = transform(image=pixels, bboxes=[(b.xmin, b.ymin, b.xmax, b.ymax) for b in image.boxes], labels=[b.label for b in image.boxes])
    boxes = [Box(label, *map(float, coords)) for coords, label in zip(out["bboxes"], out["labels"])]
    return out["image"], boxes, "+".join(applied[0] for applied in out["applied_transforms"]) or "none"


# ------------------------------------------------------------------------------------------ copy-paste


def feathered_alpha(height: int, width: int, feather: int = FEATHER_PX) -> np.ndarray:
    """Alpha of a pasted patch: 1 inside, rising linearly over `feather` px from its edge (never 0 on the patch)."""
    ys = np.minimum(np.arange(height), np.arange(height)[::-1])[:, None]
    xs = np.minimum(np.arange(width), np.arange(width)[::-1])[None, :]
    return np.clip((np.minimum(ys, xs) + 1) / (feather + 1), 0, 1).astype(np.float32)


def _occupancy(boxes: list[Box], height: int, width: int) -> np.ndarray:
    """Pixels any box touches (outward rounding: a patch on free pixels overlaps no box)."""
    occupied = np.zeros((height, width), dtype=bool)
    for box in boxes:
        occupied[max(math.floor(box.ymin), 0) : math.ceil(box.ymax), max(math.floor(box.xmin), 0) : math.ceil(box.xmax)] = True
    return occupied


def paste(target: np.ndarray, patch: np.ndarray, x: int, y: int) -> np.ndarray:
    """`patch` blended into a copy of `target` at (x, y) with the feathered alpha."""
    out = target.astype(np.float32)
    h, w = patch.shape
    alpha = feathered_alpha(h, w)
    out[y : y + h, x : x + w] = alpha * patch + (1 - alpha) * out[y : y + h, x : x + w]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def copy_paste_image(target: RealImage, donors: list[RealImage], seed: int, max_pastes: int = 1) -> tuple[np.ndarray, list[Box], list[dict[str, Any]]] | None:
    """`target` with up to `max_pastes` donor boxes pasted where they overlap no box; None when nothing fits.

    Donor boxes come from the other images of the target's class, in a seeded order; a box too large for the
    free space is tried at `PASTE_SCALES` (bilinear), each size at a seeded one of all the free positions."""
    rng = random.Random(f"{seed}:copy-paste:{target.id}")
    pixels = target.pixels()
    height, width = pixels.shape
    boxes = list(target.boxes)
    candidates = [(donor, box) for donor in donors if donor.id != target.id and donor.image_class == target.image_class for box in donor.boxes]
    rng.shuffle(candidates)
    pasted: list[dict[str, Any]] = []
    occupied = summed_area_table(_occupancy(boxes, height, width))  # changes only when a box is added
    for scale in PASTE_SCALES:
        for donor, box in candidates[:CANDIDATES_PER_SCALE]:
            x0, y0, x1, y1 = box_pixel_bounds(box)
            w, h = round((x1 - x0) * scale), round((y1 - y0) * scale)
            if min(w, h) <= 2 * FEATHER_PX:
                continue
            free = free_positions(occupied, w, h)
            if not len(free):
                continue
            x, y = (int(v) for v in free[rng.randrange(len(free))])
            patch = donor.pixels()[y0:y1, x0:x1]
            if scale != 1.0:
                patch = np.asarray(Image.fromarray(patch).resize((w, h), Image.Resampling.BILINEAR))
            pixels = paste(pixels, patch, x, y)
            boxes.append(Box(box.label, float(x), float(y), float(x + w), float(y + h)))
            occupied = summed_area_table(_occupancy(boxes, height, width))
            pasted.append({"donor": donor.id, "donor_box": [x0, y0, x1, y1], "at": [x, y], "scale": scale})
            if len(pasted) == max_pastes:
                return pixels, boxes, pasted
    return (pixels, boxes, pasted) if pasted else None


# ------------------------------------------------------------------------------------------ datasets


def write_arm_dataset(out_dir: Path, arm: str, targets: list[RealImage], train_images: list[RealImage], seed: int, classes: list[str]) -> list[dict[str, Any]]:
    """One added image per target, written in Step 4's layout under `out_dir`, rows in target order (`slot`: the
    target's position); finished images are kept when the same call runs again. Copy-paste moves on to another
    image of the class when the target's boxes leave no room, and skips the target when no image of its class
    has room (NEU-DET's pitted-surface boxes often cover the whole image): fewer rows than targets then."""
    done = finished_rows(out_dir)
    part = ManifestPart(out_dir, 0)
    by_class: dict[str, list[RealImage]] = {}
    for image in sorted(train_images, key=lambda image: image.id):
        by_class.setdefault(image.image_class, []).append(image)
    no_room: set[str] = set()  # images nothing could be pasted into (checked once per call)
    names = []
    for index, target in enumerate(targets):
        name = f"{target.id}-{ARM_FOLDERS[arm]}{index:05d}"
        if name in done:
            names.append(name)
            continue
        image_seed = plan_seed(seed, f"{arm}:{target.id}", index) % 2**32  # numpy / albumentations take 32 bits
        if arm == CLASSICAL:
            pixels, boxes, detail = classical_image(target, image_seed)
            source, extra = target, {"transforms": detail}
        else:
            made = None
            # The target first, then the other images of its class in a seeded order.
            alternatives = [image for image in by_class[target.image_class] if image.id != target.id]
            random.Random(f"{seed}:{index}").shuffle(alternatives)
            for source in (image for image in [target, *alternatives] if image.id not in no_room):
                made = copy_paste_image(source, by_class[target.image_class], image_seed)
                if made:
                    break
                no_room.add(source.id)
            if made is None:
                continue
            pixels, boxes, pasted = made
            extra = {"pasted": pasted}
        row = {"name": name, "slot": index, "class": source.image_class, "source": source.id, "arm": arm, "seed": seed,
               **relative_paths(name, source.image_class), "boxes": boxes_record(boxes), **extra}
        write_image_files(out_dir, row, Image.fromarray(pixels, mode="L"), classes)
        part.append([row])
        names.append(name)
    rows = {row["name"]: row for row in merge_manifest(out_dir, names, classes)}
    return [rows[name] for name in names]
