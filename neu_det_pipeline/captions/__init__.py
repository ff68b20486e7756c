"""Captions for the training images: CLIP / OpenCLIP keyword ranking, BLIP-2 captions, prompt building.

`neu_det_pipeline.step2_captions` runs this over Step 0's training split; the pieces are usable
on their own, and a ranker accepts any :class:`Scorer` (e.g. a hand-built encoder in tests).
"""

from __future__ import annotations

from neu_det_pipeline.captions.annotate import CaptionAnnotator
from neu_det_pipeline.captions.blip2 import Blip2Captioner
from neu_det_pipeline.captions.cache import ResultCache
from neu_det_pipeline.captions.dataset import (
    DATASET_DIR,
    TrainImage,
    read_train_images,
    write_imagefolder_metadata,
)
from neu_det_pipeline.captions.prompts import (
    build_prompt,
    keyword_candidates,
    render_variants,
)
from neu_det_pipeline.captions.ranking import (
    EnsembleRanker,
    Ranking,
    ensemble_scores,
    zscore,
)
from neu_det_pipeline.captions.report import keyword_table, top_keywords_by_class
from neu_det_pipeline.captions.scorers import (
    CLIPScorer,
    OpenCLIPScorer,
    Scorer,
    load_scorer,
)

__all__ = [
    "DATASET_DIR",
    "Blip2Captioner",
    "CLIPScorer",
    "CaptionAnnotator",
    "EnsembleRanker",
    "OpenCLIPScorer",
    "Ranking",
    "ResultCache",
    "Scorer",
    "TrainImage",
    "build_prompt",
    "ensemble_scores",
    "keyword_candidates",
    "keyword_table",
    "load_scorer",
    "read_train_images",
    "render_variants",
    "top_keywords_by_class",
    "write_imagefolder_metadata",
    "zscore",
]
