"""Structured descriptions (`captions.prompt_style: llava`): asked once per image content, cleaned into CLIP-sized phrases.

A describer (LLaVA in :mod:`~neu_det_pipeline.captions.llava`, an OpenAI-compatible API in
:mod:`~neu_det_pipeline.captions.endpoint`) answers `captions.description_instruction` for each image. The raw
answers are cached under `captions.description_cache_dir`, one JSON-lines file per (captioner, model,
instruction, length limit), keyed by the SHA-256 of the image file: a re-run, or another experiment pointed at
the same folder, asks nothing again. Cleaning happens after the cache, so it can change without new requests.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from neu_det_pipeline.captions.blip2 import clean_caption
from neu_det_pipeline.captions.cache import ResultCache
from neu_det_pipeline.captions.clip_tokens import CLIP_CONTEXT_LENGTH, clip_tokenizer
from neu_det_pipeline.captions.prompts import PART_SEPARATOR
from neu_det_pipeline.generation.controls import file_sha256

CACHE_DIR_NAME = "caption_cache"
"""Default cache folder under `run.output_dir` (outside the step folder, which a changed config wipes)."""

_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]+|\d+[.)])\s*")
_LABEL = re.compile(r"^\s*(?:the\s+)?(?:defect'?s?\s+)?(texture|shape|visual characteristics|visual|appearance|"
                    r"brightness|contrast|size|orientation|colou?r)\s*:\s*", re.IGNORECASE)  # fmt: skip
_PHRASE_SEPARATORS = re.compile(r"[\n;,.]+")


@dataclass(frozen=True)
class Description:
    """One image's answer, or why there is none."""

    text: str | None
    error: str | None = None


class Describer(Protocol):
    name: str
    """Short name recorded in the step summary (`llava`, `openai_compatible`)."""
    identity: dict[str, Any]
    """What the answers depend on (model, instruction, length limit): the cache key."""

    def describe(self, paths: Sequence[Path]) -> list[Description]:
        """One description per image file, in order."""
        ...


def description_phrases(text: str) -> list[str]:
    """A free-form answer as lower-case phrases: list markers and field labels (`Texture:`) dropped, split at
    commas, semicolons, full stops and line breaks, duplicates removed."""
    phrases: list[str] = []
    for line in text.splitlines():
        line = _LABEL.sub("", _LIST_MARKER.sub("", clean_caption(line)))
        for piece in _PHRASE_SEPARATORS.split(line):
            phrase = " ".join(_LABEL.sub("", piece).split()).strip(" :-'\"").lower()
            if phrase and phrase not in phrases:
                phrases.append(phrase)
    return phrases


class PromptFitter:
    """Appends phrases to a prompt while it fits CLIP's 77 tokens (the class tokens counting as one, as after Step 1)."""

    def __init__(self, class_tokens: Iterable[str]) -> None:
        self.tokenizer = clip_tokenizer(class_tokens)

    def length(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, truncation=False, verbose=False).input_ids)

    def fit(self, base: str, phrases: Sequence[str]) -> str:
        """`base` plus every phrase, in order, that still fits; a phrase that would not fit is left out."""
        prompt = base
        for phrase in phrases:
            candidate = f"{prompt}{PART_SEPARATOR}{phrase}"
            if self.length(candidate) <= CLIP_CONTEXT_LENGTH:
                prompt = candidate
        return prompt


class CachedDescriber:
    """A describer behind the content-hash cache: only images whose content it has not answered are sent."""

    def __init__(self, describer: Describer, cache_root: Path) -> None:
        self.describer = describer
        key = json.dumps({"captioner": describer.name, **describer.identity}, sort_keys=True)
        self.cache = ResultCache(cache_root / f"{describer.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsonl", key="sha256")
        self.cache.path.parent.mkdir(parents=True, exist_ok=True)
        self.answers = {sha: row["text"] for sha, row in self.cache.load().items()}
        self.asked = 0
        """Images sent to the describer in this run (answers from the cache are not counted)."""

    def describe(self, paths: Sequence[Path]) -> list[Description]:
        hashes = [file_sha256(path) for path in paths]
        missing = {sha: path for sha, path in zip(hashes, paths, strict=True) if sha not in self.answers}
        failed: dict[str, str] = {}
        if missing:
            self.asked += len(missing)
            answers = self.describer.describe(list(missing.values()))
            fresh = [(sha, answer) for sha, answer in zip(missing, answers, strict=True)]
            self.cache.append({"sha256": sha, "text": answer.text} for sha, answer in fresh if answer.error is None)
            self.answers.update((sha, answer.text) for sha, answer in fresh if answer.error is None)
            failed = {sha: answer.error for sha, answer in fresh if answer.error is not None}
        return [Description(None, failed[sha]) if sha in failed else Description(self.answers[sha]) for sha in hashes]
