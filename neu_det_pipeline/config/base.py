"""What every config section shares: the base model, the class names, template and list checks."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict

NEU_DET_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")

COMMAND_LINE = "the command line"


def check_template(key: str, template: str, slot: str) -> str:
    """`template` must be fillable with `{slot}` alone and must keep it (e.g. a prompt without `{token}` would
    silently train or rank without the class token)."""
    sentinel = "\0"  # cannot occur in a YAML string, so finding it proves the slot was filled
    try:
        filled = template.format(**{slot: sentinel})
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{key}={template!r} is not a valid template ({exc!r}); its only placeholder is {{{slot}}}") from None
    if sentinel not in filled:
        raise ValueError(f"{key}={template!r} must contain {{{slot}}}")
    return template


def check_distinct(key: str, values: list, what: str) -> list:
    """`values` must be a non-empty list without repeats (a repeated seed, class or control would count twice)."""
    if not values or len(set(values)) != len(values):
        raise ValueError(f"{key}={values} must be a non-empty list of distinct {what}")
    return values


class Section(BaseModel):
    """Base of every config section: unknown keys are rejected, field docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)

    RESUME_ONLY: ClassVar[frozenset[str]] = frozenset()
    """Fields that change how a step runs or where it keeps things, not what it makes."""

    @classmethod
    def outcome_keys(cls) -> list[str]:
        """Fields that change what the step makes: a change re-does the step."""
        return [name for name in cls.model_fields if name not in cls.RESUME_ONLY]
