"""Training images from Step 0, in a data order that depends only on (seed, position).

The sampler yields `(index, position)` pairs: `position` counts samples since the start of training,
so the shuffle order, the augmentation and the prompt chosen for a sample are the same whether
training runs straight through or resumes from a checkpoint (the loader then skips what was done).

With `box_areas=True` each sample also carries its box-area map (see :func:`box_area_map`), flipped and
rotated together with the image, for the box-weighted losses of `training.diffusion.box_loss_weights`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from neu_det_pipeline.data.export import box_pixel_bounds
from neu_det_pipeline.data.neu_det import Box

PromptFn = Callable[[dict[str, Any], random.Random], str]
"""(manifest row, per-sample RNG) -> training prompt."""


class SeededOrderSampler(Sampler[tuple[int, int]]):
    """Epoch after epoch of seeded permutations, `num_samples` in total, yielding (index, position)."""

    def __init__(self, dataset_size: int, num_samples: int, seed: int):
        self.dataset_size, self.num_samples, self.seed = dataset_size, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = 0
        epoch = 0
        while position < self.num_samples:
            order = list(range(self.dataset_size))
            random.Random(f"{self.seed}:order:{epoch}").shuffle(order)
            for index in order[: self.num_samples - position]:
                yield index, position
                position += 1
            epoch += 1


def box_area_map(boxes: list[dict[str, Any]], width: int, height: int, resolution: int) -> np.ndarray:
    """(resolution, resolution) float32: at each pixel of a box, the area of the smallest box covering it as a
    fraction of the image; 0 outside every box.

    The boxes of a `width` x `height` image are scaled to the square training copy: `map > 0` is Step 0's box
    mask (`masks/<id>.png`, the union of the boxes) drawn at the training resolution. The areas feed
    GeoDiffusion's area re-weighting; as fractions of the image they do not change under flips and rotations.
    """
    areas = np.zeros((resolution, resolution), dtype=np.float32)
    sx, sy = resolution / width, resolution / height
    # Largest first, so a smaller box overlapping a larger one keeps its own (smaller) area.
    scaled = [Box(b["label"], b["xmin"] * sx, b["ymin"] * sy, b["xmax"] * sx, b["ymax"] * sy) for b in boxes]
    for box in sorted(scaled, key=lambda b: (b.xmax - b.xmin) * (b.ymax - b.ymin), reverse=True):
        x0, y0, x1, y1 = box_pixel_bounds(box)
        areas[y0:y1, x0:x1] = (x1 - x0) * (y1 - y0) / resolution**2
    return areas


class DefectImageDataset(Dataset):
    """Step 0 training copies as [-1, 1] tensors with texture-safe augmentation and a prompt each."""

    def __init__(
        self,
        step0_dir: Path,
        rows: list[dict[str, Any]],
        resolution: int,
        prompt_fn: PromptFn,
        seed: int,
        hflip: bool = True,
        vflip: bool = True,
        rot90: bool = True,
        box_areas: bool = False,
    ):
        self.step0_dir, self.rows, self.resolution = step0_dir, rows, resolution
        self.prompt_fn, self.seed = prompt_fn, seed
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.box_areas = box_areas

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, position = key
        row = self.rows[index]
        rng = random.Random(f"{self.seed}:sample:{position}")
        with Image.open(self.step0_dir / row["image"]) as image:
            image = image.convert("RGB")
            if image.size != (self.resolution, self.resolution):
                image = image.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        if self.box_areas:  # an extra channel: every flip and turn below moves it with the pixels
            areas = box_area_map(row["boxes"], row["width"], row["height"], self.resolution)
            array = np.concatenate([array, areas[..., None]], axis=-1)
        # Steel textures have no canonical orientation, so flips and quarter turns keep them realistic;
        # colour jitter would not (the images are grayscale).
        if self.hflip and rng.random() < 0.5:
            array = array[:, ::-1]
        if self.vflip and rng.random() < 0.5:
            array = array[::-1]
        if self.rot90:
            array = np.rot90(array, k=rng.randrange(4))
        channels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        sample = {"pixel_values": channels[:3], "prompt": self.prompt_fn(row, rng), "class": row["class"], "id": row["id"]}
        if self.box_areas:
            sample["box_areas"] = channels[3:]
        return sample


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    collated = {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "prompts": [item["prompt"] for item in batch],
        "classes": [item["class"] for item in batch],
        "ids": [item["id"] for item in batch],
    }
    if "box_areas" in batch[0]:
        collated["box_areas"] = torch.stack([item["box_areas"] for item in batch])
    return collated
