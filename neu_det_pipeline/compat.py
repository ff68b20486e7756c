"""Installed-version combinations known to break the pipeline, checked from package metadata alone.

Nothing here imports the packages it checks (importlib.metadata only), so the check is instant and works even when
one of them fails to import. `neu-det doctor` prints every line; a test fails on any `BREAKS` entry that matches.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from packaging.requirements import Requirement


@dataclass(frozen=True)
class KnownBreak:
    """Two requirement specifiers that, installed together, break `what`; `fix` says how to get out."""

    first: str
    second: str
    what: str
    fix: str


BREAKS: tuple[KnownBreak, ...] = (
    KnownBreak(
        "torch<2.14",
        "torchvision>=0.29",
        "torchvision's compiled ops (`operator torchvision::nms does not exist` at import)",
        "pip install torch torchvision (matching builds)",
    ),
)
"""Combinations under which the project itself cannot work."""

TRANSFORMERS_PEFT_GATE = KnownBreak(
    "transformers>=5.24",
    "peft<0.22",
    "transformers' PEFT integration (`model.add_adapter`, `load_adapter`, and so diffusers' `pipe.load_lora_weights` "
    "for a text-encoder LoRA); the pipeline itself goes through peft directly (`training.lora.load_lora`)",
    "use neu_det_pipeline.training.lora.load_lora, or install peft>=0.22 when it exists",
)

LIMITS: tuple[KnownBreak, ...] = (TRANSFORMERS_PEFT_GATE,)
"""Combinations that disable a library feature the pipeline works around; reported, not fatal."""


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def matching(entries: tuple[KnownBreak, ...], versions: dict[str, str | None] | None = None) -> list[str]:
    """One line per entry whose two specifiers both hold for the installed (or given) versions, naming both."""
    lines = []
    for entry in entries:
        found = []
        for spec in (entry.first, entry.second):
            requirement = Requirement(spec)
            version = versions.get(requirement.name) if versions is not None else installed_version(requirement.name)
            if version is None or not requirement.specifier.contains(version, prereleases=True):
                break
            found.append(f"{requirement.name} {version}")
        else:
            lines.append(f"{' with '.join(found)} breaks {entry.what}: {entry.fix}")
    return lines


def transformers_peft_integration_works() -> bool:
    """Whether transformers' `add_adapter` / `load_adapter` accept the installed peft."""
    return not matching((TRANSFORMERS_PEFT_GATE,))
