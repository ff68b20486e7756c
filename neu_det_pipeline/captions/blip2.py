"""BLIP-2 image captions, the optional base description of `captions.prompt_style: blip2`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from neu_det_pipeline.models import load_model


def clean_caption(text: str) -> str:
    """One line of printable text: captions are joined into comma-separated prompts."""
    return " ".join("".join(ch for ch in text if ch.isprintable() or ch.isspace()).split())


class Blip2Captioner:
    """Unconditional captions with `Blip2ForConditionalGeneration`, decoded greedily so they are reproducible."""

    def __init__(
        self,
        model: Blip2ForConditionalGeneration,
        processor: Blip2Processor,
        device: torch.device,
        dtype: torch.dtype,
        max_new_tokens: int,
    ) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        self.device, self.dtype = device, dtype
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(
        cls, model_id: str, device: torch.device, dtype: torch.dtype, max_new_tokens: int
    ) -> Blip2Captioner:
        def load() -> Blip2Captioner:
            model = Blip2ForConditionalGeneration.from_pretrained(model_id, dtype=dtype)
            return cls(model, Blip2Processor.from_pretrained(model_id), device, dtype, max_new_tokens)

        return load_model("models.blip2", model_id, load)

    @torch.inference_mode()
    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device, self.dtype)
        # Without a text prompt the model starts from its image tokens + BOS; both are special tokens.
        generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        return [clean_caption(text) for text in self.processor.batch_decode(generated, skip_special_tokens=True)]
