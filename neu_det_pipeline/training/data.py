"""Training images from Step 0, in a data order that depends only on (seed, position).

The sampler yields `(index, position)` pairs: `position` counts samples since the start of training,
so the shuffle order, the augmentation and the prompt chosen for a sample are the same whether
training runs straight through or resumes from a checkpoint (the loader then skips what was done).
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
    ):
        self.step0_dir, self.rows, self.resolution = step0_dir, rows, resolution
        self.prompt_fn, self.seed = prompt_fn, seed
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90

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
        # Steel textures have no canonical orientation, so flips and quarter turns keep them realistic;
        # colour jitter would not (the images are grayscale).
        if self.hflip and rng.random() < 0.5:
            array = array[:, ::-1]
        if self.vflip and rng.random() < 0.5:
            array = array[::-1]
        if self.rot90:
            array = np.rot90(array, k=rng.randrange(4))
        pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        return {"pixel_values": pixels, "prompt": self.prompt_fn(row, rng), "class": row["class"], "id": row["id"]}


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "prompts": [item["prompt"] for item in batch],
        "classes": [item["class"] for item in batch],
        "ids": [item["id"] for item in batch],
    }
