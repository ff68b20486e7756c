"""Prompt building: base template, BLIP-2 caption, ranked keywords, prompt variants."""

from __future__ import annotations

from collections.abc import Sequence

from neu_det_pipeline.config import CaptionsConfig
from neu_det_pipeline.errors import ConfigError

PART_SEPARATOR = ", "


def check_class_keywords(config: CaptionsConfig, classes: Sequence[str]) -> None:
    """Fail early, naming the key, when a class has no keyword list (templates are checked by the config)."""
    missing = [name for name in classes if name not in config.class_keywords]
    if missing:
        raise ConfigError(f"captions.class_keywords has no entry for {missing}; add a keyword list for every class in data.classes")


def keyword_candidates(config: CaptionsConfig, class_name: str) -> list[str]:
    """General keywords then the class's own, without duplicates, in config order."""
    return list(dict.fromkeys([*config.general_keywords, *config.class_keywords[class_name]]))


def readable_class_name(class_name: str) -> str:
    """`rolled-in_scale` -> `rolled-in scale`: what a CLIP text encoder understands in place of a learned token."""
    return class_name.replace("_", " ")


def build_prompt(
    style: str, template: str, token: str, keywords: Sequence[str] = (), caption: str | None = None
) -> str:
    """`plain` and `llava`: the template with the token (`llava`'s description is fitted on by the annotator);
    `keywords`: + keywords; `blip2`: + BLIP-2 caption + keywords.

    Keywords the prompt already contains (e.g. `grayscale` in the default template) are not repeated;
    the token itself does not count (`scratches` is still added after `<neu-scratches>`).
    """
    parts = [template.format(token=token)]
    if style == "blip2" and caption:
        parts.append(caption)
    if style in ("keywords", "blip2"):
        for keyword in keywords:
            if keyword.lower() not in PART_SEPARATOR.join(parts).replace(token, "").lower():
                parts.append(keyword)
    return PART_SEPARATOR.join(parts)


def render_variants(variants: Sequence[str], prompt: str) -> list[str]:
    return [variant.format(prompt=prompt) for variant in variants]
