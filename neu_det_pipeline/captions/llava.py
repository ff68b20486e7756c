"""LLaVA-1.5 structured descriptions, the describer of `captions.prompt_style: llava` (`models.llava`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from neu_det_pipeline.captions.descriptions import Description
from neu_det_pipeline.models import load_model


def llava_identity(model_id: str, instruction: str, max_new_tokens: int) -> dict[str, Any]:
    """What LLaVA's answers depend on: the key of their cache."""
    return {"model": model_id, "instruction": instruction, "max_new_tokens": max_new_tokens}


class LlavaDescriber:
    """Answers the instruction for each image with `LlavaForConditionalGeneration`, greedily (reproducible).

    The prompt is the model's own chat template (LLaVA-1.5: `USER: <image>\\n{instruction} ASSISTANT:`);
    only the generated tokens are decoded.
    """

    name = "llava"

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        processor: LlavaProcessor,
        device: torch.device,
        dtype: torch.dtype,
        instruction: str,
        max_new_tokens: int,
        model_id: str,
    ) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"  # generation continues every row from its last token
        self.device, self.dtype = device, dtype
        self.instruction, self.max_new_tokens = instruction, max_new_tokens
        self.identity = llava_identity(model_id, instruction, max_new_tokens)

    @classmethod
    def from_pretrained(
        cls, model_id: str, device: torch.device, dtype: torch.dtype, instruction: str, max_new_tokens: int
    ) -> LlavaDescriber:
        def load() -> LlavaDescriber:
            model = LlavaForConditionalGeneration.from_pretrained(model_id, dtype=dtype)
            processor = LlavaProcessor.from_pretrained(model_id)
            return cls(model, processor, device, dtype, instruction, max_new_tokens, model_id)

        return load_model("models.llava", model_id, load)

    def prompt(self) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.instruction}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    @torch.inference_mode()
    def describe(self, paths: Sequence[Path]) -> list[Description]:
        images = []
        for path in paths:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        inputs = self.processor(images=images, text=[self.prompt()] * len(images), return_tensors="pt", padding=True)
        inputs = inputs.to(self.device, self.dtype)
        generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        answers = self.processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [Description(answer) for answer in answers]
