"""What Step 4 makes: one `WorkItem` per synthetic image, fixed by the config and the upstream outputs alone.

The plan is computed the same way by every process and every run, so an item's name, seed, prompt and
layout never depend on what was already generated, on the batch it lands in or on the process that
makes it: resuming and sharding only decide *which* items a process still has to make.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from neu_det_pipeline.captions.prompts import readable_class_name
from neu_det_pipeline.config import GenerationConfig


@dataclass(frozen=True)
class WorkItem:
    name: str
    """Output file stem: `<source id>-s<index>` plus `-<augmentation>` when the layout is augmented."""
    source: dict[str, Any]
    """The Step 0 manifest row of the real image it is made from."""
    index: int
    """Which image of this source (0, 1, ...)."""
    seed: int
    augmentation: str
    """`none` or a `generation.layout_augmentations` entry."""
    prompt: str
    guidance_scale: float

    @property
    def image_class(self) -> str:
        return self.source["class"]


def image_seed(run_seed: int, source_id: str, index: int) -> int:
    """A 63-bit seed from (run seed, source, index) alone: the same image whatever the batch or process."""
    digest = hashlib.sha256(f"{run_seed}:{source_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _source_indices(section: GenerationConfig, sources: list[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any], int]]:
    """(position of the source in its class, source, index) for every image of one class."""
    if section.images_per_class is None:
        for position, source in enumerate(sources):
            for index in range(section.images_per_source):
                yield position, source, index
        return
    for k in range(section.images_per_class):  # quotas: cycle through the sources
        yield k % len(sources), sources[k % len(sources)], k // len(sources)


def build_plan(
    section: GenerationConfig, rows: list[dict[str, Any]], prompts: dict[str, str], run_seed: int
) -> list[WorkItem]:
    """Every image Step 4 makes from the training `rows`, sorted by name; `prompts` maps source id -> prompt."""
    by_class: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in sorted(rows, key=lambda row: row["id"]):
        by_class[row["class"]].append(row)
    layouts = ["none", *section.layout_augmentations]
    items = []
    for image_class, sources in by_class.items():
        guidance = section.per_class_guidance.get(image_class, section.guidance_scale)
        for position, source, index in _source_indices(section, sources):
            # Position and index together spread the layouts over the sources of a class.
            augmentation = layouts[(position + index) % len(layouts)]
            suffix = "" if augmentation == "none" else f"-{augmentation}"
            items.append(WorkItem(
                name=f"{source['id']}-s{index:03d}{suffix}",
                source=source,
                index=index,
                seed=image_seed(run_seed, source["id"], index),
                augmentation=augmentation,
                prompt=prompts[source["id"]],
                guidance_scale=guidance,
            ))
    return sorted(items, key=lambda item: item.name)


def template_prompts(template: str, rows: list[dict[str, Any]], tokens: dict[str, str] | None) -> dict[str, str]:
    """Source id -> `template` with the class token (Step 1) or, without Step 1, the readable class name."""
    return {
        row["id"]: template.format(token=tokens[row["class"]] if tokens else readable_class_name(row["class"]))
        for row in rows
    }


def batches(items: list[WorkItem], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[WorkItem]]:
    """This process's batches: items of one class share a call (one guidance scale per call), dealt round-robin."""
    by_class: dict[str, list[WorkItem]] = defaultdict(list)
    for item in items:
        by_class[item.image_class].append(item)
    out = []
    for group in by_class.values():
        mine = group[rank::world_size]
        out += [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    return out
