"""What Step 4 makes: one `WorkItem` per synthetic image, fixed by the config and the upstream outputs alone.

The plan is computed the same way by every process and every run, so an item's name, seed, prompt and
layout never depend on what was already generated, on the batch it lands in or on the process that
makes it: resuming and sharding only decide *which* items a process still has to make.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from neu_det_pipeline.captions.prompts import readable_class_name
from neu_det_pipeline.config import GenerationConfig, PipelineConfig


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
    generation_seed: int | None = None
    """The `generation.seeds` entry it belongs to (None without a list)."""
    scoring_prompt: str = ""
    """The prompt with the Step 1 tokens read as class names: what `generation.select_by: clip` scores against."""

    @property
    def image_class(self) -> str:
        return self.source["class"]


def image_seed(run_seed: int, source_id: str, index: int) -> int:
    """A 63-bit seed from (run seed, source, index) alone: the same image whatever the batch or process."""
    digest = hashlib.sha256(f"{run_seed}:{source_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def candidate_seed(seed: int, candidate: int) -> int:
    """Seed of candidate `candidate` of an image: the image's own seed for the first (so `candidates: 1` makes the
    images it always made), then 63-bit seeds derived from (seed, candidate) alone."""
    if candidate == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:candidate:{candidate}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def scoring_prompt(prompt: str, tokens: dict[str, str] | None) -> str:
    """`prompt` with each Step 1 token replaced by its readable class name (CLIP does not know the learned tokens)."""
    for class_name, token in (tokens or {}).items():
        prompt = prompt.replace(token, readable_class_name(class_name))
    return prompt


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
    section: GenerationConfig, rows: list[dict[str, Any]], prompts: dict[str, str], run_seed: int,
    tokens: dict[str, str] | None = None,
) -> list[WorkItem]:
    """Every image Step 4 makes from the training `rows`, sorted by name; `prompts` maps source id -> prompt, `tokens`
    class -> Step 1 token (for the scoring prompts)."""
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
                scoring_prompt=scoring_prompt(prompts[source["id"]], tokens),
            ))
    return sorted(items, key=lambda item: item.name)


def generation_seeds(config: PipelineConfig) -> list[int]:
    """The seeds Step 4 generates with: `generation.seeds`, or `run.seed` alone."""
    return config.generation.seeds or [config.run.seed]


def build_seeded_plan(
    section: GenerationConfig, rows: list[dict[str, Any]], prompts: dict[str, str], run_seed: int,
    tokens: dict[str, str] | None = None,
) -> list[WorkItem]:
    """`build_plan` with `run_seed`, or (with `generation.seeds`) once per generation seed, names ending `-g<seed>`."""
    if section.seeds is None:
        return build_plan(section, rows, prompts, run_seed, tokens)
    items = [replace(item, name=f"{item.name}-g{seed}", generation_seed=seed)
             for seed in section.seeds for item in build_plan(section, rows, prompts, seed, tokens)]
    return sorted(items, key=lambda item: item.name)


def tag_generation_seeds(rows: list[dict[str, Any]], items: list[WorkItem]) -> list[dict[str, Any]]:
    """Manifest rows with `generation_seed` when the plan has generation seeds (rows unchanged otherwise)."""
    seeds = {item.name: item.generation_seed for item in items if item.generation_seed is not None}
    return [{**row, "generation_seed": seeds[row["name"]]} if row["name"] in seeds else row for row in rows]


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
