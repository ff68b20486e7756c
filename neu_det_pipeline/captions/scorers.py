"""Image-text scorers: anything that embeds images and texts into one space.

The ranking code only sees the :class:`Scorer` protocol, so a test (or a new backend) plugs in
any encoder with `encode_images` and `encode_texts`. Embeddings need not be normalised: the
ranker takes cosine similarities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import open_clip
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from neu_det_pipeline.config import ModelsConfig
from neu_det_pipeline.models import load_model

OPEN_CLIP_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Scorer(Protocol):
    name: str
    """Short backend name recorded with the scores (`clip`, `open_clip`)."""

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(len(images), dim) embeddings."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), dim) embeddings in the same space as the images."""
        ...


class CLIPScorer:
    """transformers `CLIPModel` + `CLIPProcessor` (real default: openai/clip-vit-large-patch14)."""

    name = "clip"

    def __init__(self, model: CLIPModel, processor: CLIPProcessor, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        self.device, self.dtype = device, dtype

    @classmethod
    def from_pretrained(cls, model_id: str, device: torch.device, dtype: torch.dtype) -> CLIPScorer:
        def load() -> CLIPScorer:
            model = CLIPModel.from_pretrained(model_id, dtype=dtype)
            return cls(model, CLIPProcessor.from_pretrained(model_id), device, dtype)

        return load_model("models.clip", model_id, load)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        # Long prompts (BLIP-2 caption + keywords) are cut at CLIP's 77-token context.
        tokens = self.processor(text=list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _pooled(self.model.get_text_features(**tokens))


def _pooled(features: torch.Tensor | object) -> torch.Tensor:
    # transformers >= 5 returns the projected embedding as `pooler_output`; 4.x returns the tensor itself.
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class OpenCLIPScorer:
    """An OpenCLIP model (real default: hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."""

    name = "open_clip"

    def __init__(
        self,
        model: open_clip.CLIP,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model.eval()
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.device, self.dtype = device, dtype

    @classmethod
    def from_pretrained(cls, model_id: str, device: torch.device, dtype: torch.dtype) -> OpenCLIPScorer:
        def load() -> OpenCLIPScorer:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_id, device=device, precision=OPEN_CLIP_PRECISION[dtype]
            )
            return cls(model, preprocess, open_clip.get_tokenizer(model_id), device, dtype)

        return load_model("models.open_clip", model_id, load)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images])
        return self.model.encode_image(pixels.to(self.device, self.dtype))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device))


SCORERS: dict[str, type[CLIPScorer] | type[OpenCLIPScorer]] = {"clip": CLIPScorer, "open_clip": OpenCLIPScorer}


def load_scorer(backend: str, models: ModelsConfig, device: torch.device, dtype: torch.dtype) -> Scorer:
    """The scorer for a `captions.ranking_backends` entry, loaded from `models.<backend>`."""
    return SCORERS[backend].from_pretrained(getattr(models, backend), device, dtype)
