"""`captions`: Step 2's keyword ranking, captions and prompts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from neu_det_pipeline.config.base import Section, check_template

ENV_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

DEFAULT_DESCRIPTION_INSTRUCTION = (
    "This is a grayscale close-up of a hot-rolled steel strip with a surface defect. Describe the defect in short "
    "comma-separated phrases, in this order: its texture, its shape, its visual characteristics (brightness, "
    "contrast, size, orientation). Do not write sentences and do not name the defect type."
)
"""The structured description the seed plan asks LLaVA for: texture, shape, visual characteristics."""


class EndpointConfig(Section):
    """An OpenAI-compatible chat-completions API (vLLM, Ollama, a hosted one) for `captioner: openai_compatible`."""

    model_config = ConfigDict(**Section.model_config, hide_input_in_errors=True)  # a key pasted by mistake stays out of logs

    base_url: str | None = None
    """API root that `/chat/completions` is appended to, e.g. `http://127.0.0.1:8000/v1` (vLLM) or `http://127.0.0.1:11434/v1` (Ollama)."""
    model: str | None = None
    """Model name the server knows, e.g. `llava-hf/llava-1.5-7b-hf` (vLLM) or `llava:7b` (Ollama)."""
    api_key_env: str | None = None
    """NAME of the environment variable holding the API key (never the key itself); null: no key (local servers)."""
    timeout_s: float = Field(60.0, gt=0)
    """Seconds to wait for a connection and for each read of an answer."""
    max_retries: int = Field(3, ge=0)
    """Further tries after a timeout, a connection error, HTTP 429 or 5xx (other errors are not retried)."""
    backoff_s: float = Field(2.0, ge=0)
    """Wait before the first retry; doubled before each further one."""
    concurrency: int = Field(4, ge=1)
    """Requests in flight at once."""
    max_failure_fraction: float = Field(0.0, ge=0.0, le=1.0)
    """Step 2 fails when more than this fraction of the images got no description (each failure is one console line)."""

    @field_validator("api_key_env")
    @classmethod
    def _is_a_variable_name(cls, value: str | None) -> str | None:
        if value is not None and not ENV_VAR_NAME.fullmatch(value):
            # Not echoed: a pasted key must not end up in a log.
            raise ValueError(
                "captions.endpoint.api_key_env must be the NAME of an environment variable holding the key "
                "(e.g. OPENAI_API_KEY), never the key itself"
            )
        return value


class CaptionsConfig(Section):
    RESUME_ONLY: ClassVar[frozenset[str]] = frozenset({"description_cache_dir"})
    """The cache folder changes where descriptions are kept, not what they are."""

    prompt_style: Literal["plain", "keywords", "blip2", "llava"] = "plain"
    """Final prompt: `plain` template+token, `keywords` adds top-k CLIP keywords, `blip2` adds a BLIP-2 caption,
    `llava` adds a structured description (texture, shape, visual characteristics) fitted to CLIP's 77 tokens."""
    captioner: Literal["blip2", "llava", "openai_compatible"] | None = None
    """Model writing the caption: null takes the style's own (`blip2`: BLIP-2, `llava`: LLaVA, `models.llava`);
    `openai_compatible` asks `captions.endpoint` for the `llava` style's description (nothing is sent otherwise)."""
    description_instruction: str = DEFAULT_DESCRIPTION_INSTRUCTION
    """What `prompt_style: llava` asks the captioner about each image."""
    description_max_new_tokens: int = Field(96, ge=1)
    """Length limit of a description (the prompt keeps only what fits in CLIP's 77 tokens)."""
    description_cache_dir: Path | None = None
    """Descriptions cached by (image content, captioner, instruction): re-runs ask nothing again;
    null: `<run.output_dir>/caption_cache`. Point several experiments at one folder to share them."""
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    """The OpenAI-compatible API of `captioner: openai_compatible`."""
    template: str = "a grayscale photo of {token} on a steel strip"
    """Base prompt template; `{token}` is the class token from Step 1."""
    general_keywords: list[str] = Field(
        default_factory=lambda: [
            "hot-rolled steel strip",
            "metal surface",
            "industrial inspection",
            "grayscale",
            "surface texture",
            "macro photography",
        ]
    )
    """General steel-surface keywords (the seed plan's paper keywords)."""
    class_keywords: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "crazing": ["fine cracks", "crack network", "crazed surface"],
            "inclusion": ["dark inclusions", "embedded particles", "elongated spots"],
            "patches": ["irregular patches", "stains", "discoloured areas"],
            "pitted_surface": ["pits", "pitted texture", "small craters"],
            "rolled-in_scale": ["rolled-in scale", "scale flakes", "oxide scale"],
            "scratches": ["scratches", "long thin lines", "scratch marks"],
        }
    )
    """Defect-specific keywords per class."""
    prompt_variants: list[str] = Field(
        default_factory=lambda: [
            "{prompt}",
            "{prompt}, macro photography",
            "{prompt}, industrial inspection, surface texture",
        ]
    )
    """Prompt variants ranked per image; `{prompt}` is the prompt being varied."""
    top_k: int = Field(3, ge=1)
    """Keywords kept per image."""
    ranking_backends: list[Literal["clip", "open_clip"]] = Field(default_factory=lambda: ["clip"])
    """Models that score keywords; with several, normalised scores are averaged (ensemble)."""
    batch_size: int = Field(16, ge=1)
    """Images per model forward pass."""
    blip2_max_new_tokens: int = Field(30, ge=1)
    """Length limit of BLIP-2 captions."""

    @model_validator(mode="after")
    def _captioner_fits_the_style(self) -> CaptionsConfig:
        allowed = {"blip2": ("blip2",), "llava": ("llava", "openai_compatible")}.get(self.prompt_style, ())
        if self.captioner is not None and self.captioner not in allowed:
            fix = f"use captions.captioner: {' or '.join(allowed)}" if allowed else "use prompt_style: blip2 or llava"
            raise ValueError(
                f"captions.captioner={self.captioner!r} does not write the captions of prompt_style={self.prompt_style!r}: "
                f"{fix}, or captioner: null (the style's own model)"
            )
        if self.captioner == "openai_compatible" and not (self.endpoint.base_url and self.endpoint.model):
            raise ValueError(
                "captions.captioner=openai_compatible needs captions.endpoint.base_url and captions.endpoint.model "
                "(e.g. http://127.0.0.1:8000/v1 and the model name the server knows)"
            )
        return self

    def resolved_captioner(self) -> str | None:
        """The model that writes this style's captions (None for `plain` / `keywords`)."""
        return self.captioner or {"blip2": "blip2", "llava": "llava"}.get(self.prompt_style)

    @field_validator("template")
    @classmethod
    def _template_has_token_slot(cls, template: str) -> str:
        return check_template("captions.template", template, "token")

    @field_validator("prompt_variants")
    @classmethod
    def _variants_have_prompt_slot(cls, variants: list[str]) -> list[str]:
        return [check_template(f"captions.prompt_variants[{i}]", v, "prompt") for i, v in enumerate(variants)]
