"""Turn a batch of `WorkItem`s into finished synthetic images: control maps, one pipeline call, labels.

Every synthetic image keeps the boxes of its source, moved with the layout augmentation and scaled to the
output size, so each image is directly trainable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.data.neu_det import Box
from neu_det_pipeline.generation.controls import (
    ControlMapCache,
    Detect,
    augment_box,
    augment_image,
    augmented_size,
    detector_key,
    file_sha256,
    load_detector,
    scale_box,
)
from neu_det_pipeline.generation.outputs import (
    boxes_record,
    relative_paths,
    write_image_files,
)
from neu_det_pipeline.generation.pipeline import ControlNetGenerator
from neu_det_pipeline.generation.plan import WorkItem


@dataclass
class Detectors:
    """The configured detectors, each loaded on first use (a fully cached run loads none)."""

    config: PipelineConfig
    device: torch.device
    loaded: dict[str, Detect] = field(default_factory=dict)

    def get(self, name: str) -> Detect:
        if name not in self.loaded:
            self.loaded[name] = load_detector(name, self.config.models, self.device)
        return self.loaded[name]


@dataclass
class MakerStats:
    maps_made: int = 0
    maps_cached: int = 0
    images: int = 0
    generation_s: float = 0.0


class SyntheticImageMaker:
    def __init__(self, config: PipelineConfig, generator: Callable[[], ControlNetGenerator], cache: ControlMapCache,
                 device: torch.device, out_dir: Path):
        self.config, self.section = config, config.generation
        self._generator_factory, self._generator = generator, None
        self.cache, self.out_dir = cache, out_dir
        self.detectors = Detectors(config, device)
        self.data_root = Path(config.data.root)
        self.stats = MakerStats()
        self._sha256: dict[str, str] = {}

    @property
    def generator(self) -> ControlNetGenerator:
        if self._generator is None:
            self._generator = self._generator_factory()
        return self._generator

    @property
    def loaded_generator(self) -> ControlNetGenerator | None:
        """The pipeline if this run loaded it (a run with nothing left to make does not)."""
        return self._generator

    def source_path(self, row: dict[str, Any]) -> Path:
        return self.data_root / row["source"]

    def control_map(self, row: dict[str, Any], control: str) -> tuple[Image.Image, Path, bool]:
        """The map of one source for one control (un-augmented), its cache file, and whether it was made now."""
        path = self.source_path(row)
        if row["id"] not in self._sha256:
            self._sha256[row["id"]] = file_sha256(path)
        name, resolution = self.section.detectors[control], self.section.resolution
        key = detector_key(name, self.config.models, resolution)
        image, made = self.cache.get(path, self._sha256[row["id"]], key, lambda: self.detectors.get(name), resolution)
        return image, self.cache.path(self._sha256[row["id"]], key), made

    def _batch_maps(self, batch: list[WorkItem]) -> dict[str, list[Image.Image]]:
        maps: dict[str, list[Image.Image]] = {}
        for control in self.section.controls:
            maps[control] = []
            for item in batch:
                image, _, made = self.control_map(item.source, control)
                self.stats.maps_made += made
                self.stats.maps_cached += not made
                maps[control].append(augment_image(image, item.augmentation))
        return maps

    def make(self, batch: list[WorkItem]) -> list[dict[str, Any]]:
        """Generate one batch (one class, one guidance scale) and write every file; returns the manifest rows."""
        section = self.section
        maps = self._batch_maps(batch)
        init_images = None
        if section.mode == "img2img":
            init_images = [augment_image(self._init_image(item.source), item.augmentation) for item in batch]
        started = time.perf_counter()
        images = self.generator.generate(
            [item.prompt for item in batch], [item.seed for item in batch], batch[0].guidance_scale, maps, init_images
        )
        self.stats.generation_s += time.perf_counter() - started
        self.stats.images += len(images)
        rows = []
        for item, image in zip(batch, images):
            row = self.manifest_row(item)
            write_image_files(self.out_dir, row, self.output_image(item, image), self.config.data.classes)
            rows.append(row)
        return rows

    def _init_image(self, row: dict[str, Any]) -> Image.Image:
        resolution = self.section.resolution
        with Image.open(self.source_path(row)) as source:
            return source.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)

    def output_size(self, item: WorkItem) -> tuple[int, int]:
        if self.section.output_size is not None:
            return self.section.output_size, self.section.output_size
        return augmented_size(item.source["width"], item.source["height"], item.augmentation)

    def output_image(self, item: WorkItem, image: Image.Image) -> Image.Image:
        return image.resize(self.output_size(item), Image.Resampling.LANCZOS).convert(self.section.output_mode)

    def output_boxes(self, item: WorkItem) -> list[Box]:
        """The source's boxes, moved like the layout and scaled to the output image."""
        width, height = item.source["width"], item.source["height"]
        moved_w, moved_h = augmented_size(width, height, item.augmentation)
        out_w, out_h = self.output_size(item)
        return [
            scale_box(augment_box(Box(**box), width, height, item.augmentation), out_w / moved_w, out_h / moved_h)
            for box in item.source["boxes"]
        ]

    def manifest_row(self, item: WorkItem) -> dict[str, Any]:
        section, models = self.section, self.generator.models
        width, height = self.output_size(item)
        return {
            "name": item.name,
            **relative_paths(item.name, item.image_class),
            "source": item.source["id"],
            "class": item.image_class,
            "width": width,
            "height": height,
            "boxes": boxes_record(self.output_boxes(item)),
            "augmentation": item.augmentation,
            "prompt": item.prompt,
            "negative_prompt": section.negative_prompt,
            "seed": item.seed,
            "controls": list(section.controls),
            "detectors": {c: section.detectors[c] for c in section.controls},
            "conditioning_scales": {c: section.conditioning_scales[c] for c in section.controls},
            "control_guidance": self.generator.control_guidance,
            "scheduler": section.scheduler,
            "use_karras_sigmas": section.use_karras_sigmas,
            "num_inference_steps": section.num_inference_steps,
            "guidance_scale": item.guidance_scale,
            "guidance_rescale": section.guidance_rescale,
            "mode": section.mode,
            "strength": section.strength if section.mode == "img2img" else None,
            "resolution": section.resolution,
            "models": {"base": models.base, "controlnets": models.controlnets},
            "lora_sha256": models.lora_sha256,
            "lora_scale": section.lora_scale if section.use_lora else None,
            "token_sha256": models.token_sha256,
        }
