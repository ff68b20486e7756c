"""Rank candidate texts (keywords, prompt variants) per image with one or several scorers.

Score normalisation. Raw CLIP cosine similarities are not comparable between models: OpenAI
ViT-L/14 and LAION ViT-H/14 put matching pairs in different ranges, and within one model every
text's similarity to an image shares an image-dependent offset. Each scorer's cosines are
therefore turned into a per-image z-score over that image's candidates,
``(cos - mean) / std`` (population std; all zeros when the candidates tie), which keeps only how
far each candidate stands out for this image. The ensemble score is the mean of the scorers'
z-scores. With one scorer the ranking equals the cosine ranking. Min-max scaling was not used:
it is set by the two extreme candidates alone and maps any two candidates to exactly 0 and 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from neu_det_pipeline.captions.scorers import Scorer

TIE_STD = 1e-8
"""Below this spread the candidates count as tied (z-scores of 0)."""


def zscore(scores: torch.Tensor) -> torch.Tensor:
    """Standardise the last dimension: one row per image, one column per candidate."""
    mean = scores.mean(dim=-1, keepdim=True)
    std = scores.std(dim=-1, keepdim=True, correction=0)
    return torch.where(std > TIE_STD, (scores - mean) / std.clamp_min(TIE_STD), torch.zeros_like(scores))


def ensemble_scores(per_scorer: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over scorers of per-image z-scores; each tensor is (images, candidates) of cosines."""
    return torch.stack([zscore(scores) for scores in per_scorer]).mean(dim=0)


@dataclass(frozen=True)
class Ranking:
    """One image's candidates with their ensemble score and each scorer's raw cosine similarity."""

    candidates: tuple[str, ...]
    scores: tuple[float, ...]
    cosines: dict[str, tuple[float, ...]]

    def order(self) -> list[int]:
        """Candidate indices, best first; ties keep the configured candidate order."""
        return sorted(range(len(self.candidates)), key=lambda i: -self.scores[i])

    def top(self, k: int) -> list[str]:
        return [self.candidates[i] for i in self.order()[:k]]


class EnsembleRanker:
    """Scores candidate texts against images with every scorer and averages normalised scores.

    Text embeddings are cached per scorer and candidate list, so a keyword set is encoded once per
    run. A list is always encoded in one call of its own: padding and batch shape then never depend
    on which other texts happened to be encoded with it, and a resumed run reproduces every score.
    """

    def __init__(self, scorers: Sequence[Scorer]) -> None:
        if not scorers:
            raise ValueError("EnsembleRanker needs at least one scorer")
        self.scorers = list(scorers)
        self._text_cache: list[dict[tuple[str, ...], torch.Tensor]] = [{} for _ in self.scorers]

    def embed_images(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """Unit-norm image embeddings, one (images, dim) tensor per scorer; reuse them across `rank` calls."""
        return [F.normalize(scorer.encode_images(images).float(), dim=-1).cpu() for scorer in self.scorers]

    def _text_embeddings(self, scorer_index: int, texts: tuple[str, ...]) -> torch.Tensor:
        cache = self._text_cache[scorer_index]
        if texts not in cache:
            cache[texts] = F.normalize(self.scorers[scorer_index].encode_texts(texts).float(), dim=-1).cpu()
        return cache[texts]

    def rank(self, image_embeddings: Sequence[torch.Tensor], candidates: Sequence[Sequence[str]]) -> list[Ranking]:
        """Rank `candidates[i]` for image i (from :meth:`embed_images`); candidate lists may differ per image."""
        rankings = []
        for i, texts in enumerate(candidates):
            cosines = {
                scorer.name: self._text_embeddings(s, tuple(texts)) @ image_embeddings[s][i]
                for s, scorer in enumerate(self.scorers)
            }
            scores = ensemble_scores([c.unsqueeze(0) for c in cosines.values()])[0]
            rankings.append(
                Ranking(
                    candidates=tuple(texts),
                    scores=tuple(scores.tolist()),
                    cosines={name: tuple(c.tolist()) for name, c in cosines.items()},
                )
            )
        return rankings
