"""From a batch of training images to caption rows: BLIP-2 caption or structured description, ranked keywords,
prompt, best variant."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from neu_det_pipeline.captions.blip2 import Blip2Captioner
from neu_det_pipeline.captions.dataset import TrainImage
from neu_det_pipeline.captions.descriptions import (
    CACHE_DIR_NAME,
    CachedDescriber,
    Describer,
    PromptFitter,
    description_phrases,
)
from neu_det_pipeline.captions.prompts import (
    build_prompt,
    check_class_keywords,
    keyword_candidates,
    readable_class_name,
    render_variants,
)
from neu_det_pipeline.captions.ranking import EnsembleRanker, Ranking
from neu_det_pipeline.captions.scorers import load_scorer
from neu_det_pipeline.config import CaptionsConfig, PipelineConfig
from neu_det_pipeline.models import inference_dtype, resolve_device

SCORE_DECIMALS = 6
"""Scores are stored rounded: stable files, and no false precision."""


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(value, SCORE_DECIMALS) for value in values]


def _scores_by_text(ranking: Ranking, labels: Sequence[str]) -> dict[str, Any]:
    return {
        "ensemble": dict(zip(labels, _rounded(ranking.scores), strict=True)),
        "cosine": {name: dict(zip(labels, _rounded(cos), strict=True)) for name, cos in ranking.cosines.items()},
    }


class CaptionAnnotator:
    """Builds the caption row of each training image; models are loaded once and reused for every batch.

    Build it with :meth:`from_config`, or pass any ranker (e.g. with hand-built scorers) and captioner.
    """

    def __init__(
        self,
        config: CaptionsConfig,
        tokens: dict[str, str],
        ranker: EnsembleRanker,
        captioner: Blip2Captioner | None = None,
        models: dict[str, str] | None = None,
        describer: CachedDescriber | None = None,
    ) -> None:
        if config.prompt_style == "blip2" and captioner is None:
            raise ValueError("prompt_style 'blip2' needs a Blip2Captioner")
        if config.prompt_style == "llava" and describer is None:
            raise ValueError("prompt_style 'llava' needs a describer (LLaVA or an OpenAI-compatible endpoint)")
        self.config, self.tokens, self.ranker, self.captioner = config, tokens, ranker, captioner
        self.describer = describer
        self.fitter = PromptFitter(tokens.values()) if describer is not None else None
        self.models = models or {}
        self.timings: Counter[str] = Counter()
        """Seconds spent per stage (`blip2`, `description`, `ranking`), summed over batches."""

    @classmethod
    def from_config(cls, config: PipelineConfig) -> CaptionAnnotator:
        """Load the configured scorers (and BLIP-2 for `prompt_style: blip2`) on `run.device`."""
        captions = config.captions
        tokens = config.textual_inversion.tokens(config.data.classes)
        check_class_keywords(captions, list(tokens))  # before minutes of model loading
        device = resolve_device(config.run.device)
        dtype = inference_dtype(device, config.run.mixed_precision)
        backends = list(dict.fromkeys(captions.ranking_backends))
        ranker = EnsembleRanker([load_scorer(backend, config.models, device, dtype) for backend in backends])
        models = {backend: getattr(config.models, backend) for backend in backends}
        captioner = None
        if captions.prompt_style == "blip2":
            captioner = Blip2Captioner.from_pretrained(
                config.models.blip2, device, dtype, captions.blip2_max_new_tokens
            )
            models["blip2"] = config.models.blip2
        describer = None
        if captions.prompt_style == "llava":
            loaded, model = _load_describer(config, device, dtype)
            describer = CachedDescriber(loaded, captions.description_cache_dir or Path(config.run.output_dir) / CACHE_DIR_NAME)
            models[loaded.name] = model
        return cls(captions, tokens, ranker, captioner, models, describer)

    def annotate(self, batch: Sequence[TrainImage]) -> list[dict[str, Any]]:
        images = [_load_rgb(item) for item in batch]
        tokens = [self.tokens[item.image_class] for item in batch]
        captions: list[str | None] = [None] * len(batch)
        if self.captioner is not None:
            started = time.perf_counter()
            captions = [*self.captioner.caption(images)]
            self.timings["blip2"] += time.perf_counter() - started
        descriptions = []
        if self.describer is not None:
            started = time.perf_counter()
            descriptions = self.describer.describe([item.path for item in batch])
            self.timings["description"] += time.perf_counter() - started

        started = time.perf_counter()
        embeddings = self.ranker.embed_images(images)
        keywords = self.ranker.rank(embeddings, [keyword_candidates(self.config, item.image_class) for item in batch])
        prompts = [
            build_prompt(self.config.prompt_style, self.config.template, token, ranking.top(self.config.top_k), caption)
            for token, ranking, caption in zip(tokens, keywords, captions, strict=True)
        ]
        if self.fitter is not None:
            # The description's phrases after the template, as many as fit in CLIP's 77 tokens.
            prompts = [
                self.fitter.fit(prompt, description_phrases(found.text)) if found.text else prompt
                for prompt, found in zip(prompts, descriptions, strict=True)
            ]
        variants = [render_variants(self.config.prompt_variants, prompt) for prompt in prompts]
        # A scorer has never seen the learned token: it reads the class name in its place.
        variant_rankings = self.ranker.rank(
            embeddings,
            [
                [text.replace(token, readable_class_name(item.image_class)) for text in texts]
                for item, token, texts in zip(batch, tokens, variants, strict=True)
            ],
        )
        self.timings["ranking"] += time.perf_counter() - started

        rows = []
        for i, item in enumerate(batch):
            best = variant_rankings[i].order()[0]
            rows.append(
                {
                    "id": item.id,
                    "class": item.image_class,
                    "image": item.dataset_path,
                    "source": item.source,
                    "token": tokens[i],
                    "prompt": prompts[i],
                    "blip2_caption": captions[i],
                    "keywords": keywords[i].top(self.config.top_k),
                    "keyword_scores": _scores_by_text(keywords[i], keywords[i].candidates),
                    "best_variant": self.config.prompt_variants[best],
                    "best_variant_prompt": variants[i][best],
                    "variant_scores": _scores_by_text(variant_rankings[i], self.config.prompt_variants),
                    "models": self.models,
                }
            )
            if self.describer is not None:
                rows[-1].update(description=descriptions[i].text, description_error=descriptions[i].error)
        return rows

    def description_summary(self, failed: Sequence[str]) -> dict[str, Any]:
        """The step summary's `descriptions` entry (only with a describer)."""
        assert self.describer is not None
        return {
            "captioner": self.describer.describer.name,
            "asked_now": self.describer.asked,
            "failed": len(failed),
            "failed_ids": list(failed),
            "cache": str(self.describer.cache.path),
        }


def _load_describer(config: PipelineConfig, device: torch.device, dtype: torch.dtype) -> tuple[Describer, str]:
    """LLaVA (`models.llava`) on `device`, or the OpenAI-compatible endpoint (nothing is sent for any other
    captioner); and the model as the summary names it."""
    captions = config.captions
    if captions.resolved_captioner() == "openai_compatible":
        from neu_det_pipeline.captions.endpoint import EndpointDescriber

        endpoint = captions.endpoint
        describer = EndpointDescriber(endpoint, captions.description_instruction, captions.description_max_new_tokens)
        return describer, f"{endpoint.model} at {endpoint.base_url}"
    from neu_det_pipeline.captions.llava import LlavaDescriber

    describer = LlavaDescriber.from_pretrained(
        config.models.llava, device, dtype, captions.description_instruction, captions.description_max_new_tokens
    )
    return describer, config.models.llava


def _load_rgb(item: TrainImage) -> Image.Image:
    with Image.open(item.path) as image:
        return image.convert("RGB")
