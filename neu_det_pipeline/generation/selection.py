"""Candidate selection: several images per planned image (`generation.candidates`), one kept (`generation.select_by`).

Scores, per candidate (the final output image, after the paste-back of inpaint modes):

- `clip`: cosine similarity of the candidate and its prompt in `models.clip` (the project's `CLIPScorer`), the Step 1
  tokens read as class names (CLIP does not know the learned tokens).
- `lpips_in_box`: LPIPS (`evaluation.lpips_net`, the project's `LPIPSDistance`) between the candidate and the source
  inside the boxes, each box crop resized to `LPIPS_CROP` px, averaged over the boxes.

Selection (`select_candidate`):

- `none`: the first candidate (its seed is the plan's; `candidates` must then be 1);
- `clip`: the highest CLIP score;
- `lpips_in_box`, DefectFill's low-fidelity selection: a candidate is class-consistent when its CLIP score is at least
  the median of the candidates' CLIP scores; among those, the one whose boxes differ most from the source's (highest
  LPIPS) is kept. So the kept defect is the most novel of the half of the candidates that best match the class prompt.

Ties keep the earlier candidate. The scores depend on each candidate's pixels alone, so a resumed or sharded run keeps
the same candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from neu_det_pipeline.captions.scorers import CLIPScorer
from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.data.export import box_pixel_bounds
from neu_det_pipeline.data.neu_det import Box
from neu_det_pipeline.evaluation.perceptual import LPIPSDistance

LPIPS_CROP = 64
"""Side (px) each box crop is resized to before LPIPS: boxes come in any size, LPIPS's networks need some context."""


def select_candidate(select_by: str, scores: Sequence[dict[str, float]]) -> int:
    """Index of the kept candidate (see the module docstring)."""
    if select_by == "none":
        return 0
    clip = np.array([score["clip"] for score in scores])
    if select_by == "clip":
        return int(np.argmax(clip))
    lpips = np.array([score["lpips_in_box"] for score in scores])
    return int(np.argmax(np.where(class_consistent(scores), lpips, -np.inf)))


def class_consistent(scores: Sequence[dict[str, float]]) -> list[bool]:
    """Per candidate: CLIP score at least the candidates' median (what `lpips_in_box` chooses among)."""
    clip = np.array([score["clip"] for score in scores])
    return [bool(value) for value in clip >= np.median(clip)]


def box_crops(image: Image.Image, boxes: Sequence[Box]) -> np.ndarray:
    """(len(boxes), LPIPS_CROP, LPIPS_CROP) grayscale uint8 crops of the boxes (empty boxes skipped)."""
    gray = image.convert("L")
    crops = []
    for box in boxes:
        x0, y0, x1, y1 = box_pixel_bounds(box)
        if x1 > x0 and y1 > y0:
            crop = gray.crop((x0, y0, x1, y1)).resize((LPIPS_CROP, LPIPS_CROP), Image.Resampling.BICUBIC)
            crops.append(np.asarray(crop))
    return np.stack(crops) if crops else np.zeros((0, LPIPS_CROP, LPIPS_CROP), dtype=np.uint8)


class CandidateScorer:
    """The models `generation.select_by` needs, each loaded on first use."""

    def __init__(self, config: PipelineConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.config, self.device, self.dtype = config, device, dtype
        self._clip: CLIPScorer | None = None
        self._lpips: LPIPSDistance | None = None

    @property
    def clip(self) -> CLIPScorer:
        if self._clip is None:
            self._clip = CLIPScorer.from_pretrained(self.config.models.clip, self.device, self.dtype)
        return self._clip

    @property
    def lpips(self) -> LPIPSDistance:
        if self._lpips is None:
            evaluation = self.config.evaluation
            # A random backbone (`lpips_pretrained_backbone: false`, offline tests) is drawn from torch's global
            # generator: seeded here, every run scores alike and a resumed run keeps the same candidates.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self._lpips = LPIPSDistance(evaluation.lpips_net, evaluation.lpips_pretrained_backbone, self.device, batch_size=16)
        return self._lpips

    def clip_scores(self, images: Sequence[Image.Image], text: str) -> list[float]:
        image_features = torch.nn.functional.normalize(self.clip.encode_images([image.convert("RGB") for image in images]).float(), dim=-1)
        text_features = torch.nn.functional.normalize(self.clip.encode_texts([text]).float(), dim=-1)
        return [round(float(value), 6) for value in image_features @ text_features[0]]

    def lpips_in_box(self, images: Sequence[Image.Image], source: Image.Image, boxes: Sequence[Box]) -> list[float]:
        reference = box_crops(source, boxes)
        if len(reference) == 0:
            return [0.0] * len(images)
        return [round(float(self.lpips(box_crops(image, boxes), reference).mean()), 6) for image in images]

    def scores(self, select_by: str, images: Sequence[Image.Image], text: str, source: Image.Image, boxes: Sequence[Box]) -> list[dict[str, Any]]:
        """Per candidate: the scores `select_by` uses (nothing for `none`)."""
        if select_by == "none":
            return [{} for _ in images]
        scores: list[dict[str, Any]] = [{"clip": value} for value in self.clip_scores(images, text)]
        if select_by == "lpips_in_box":
            for score, distance, consistent in zip(scores, self.lpips_in_box(images, source, boxes), class_consistent(scores)):
                score.update(lpips_in_box=distance, class_consistent=consistent)
        return scores
