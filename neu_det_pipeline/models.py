"""Model loading shared by every step: hub ids on a GPU node, local hub-layout folders offline.

Loading always goes through the libraries' own `from_pretrained`; this module only picks the
device and dtype and turns a failed load into one line naming the config key and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.errors import PipelineError

T = TypeVar("T")


def resolve_device(config: PipelineConfig) -> torch.device:
    if config.run.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.run.device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("run.device=cuda but no CUDA device is visible; set run.device=auto or run.device=cpu")
    return torch.device(config.run.device)


def inference_dtype(config: PipelineConfig, device: torch.device) -> torch.dtype:
    """Half precision only where it is fast and supported: on CUDA."""
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.run.mixed_precision, torch.float32)


def load_pretrained(config_key: str, model_id: str, load: Callable[[str], T]) -> T:
    """`load(model_id)` with a clear one-line error naming `config_key` when the model is unavailable."""
    path = model_id.removeprefix("local-dir:").removeprefix("hf-hub:")
    # Hub ids are `org/name`; anything else is meant as a local folder.
    is_local = model_id.startswith("local-dir:") or path.startswith((".", "/", "~")) or path.count("/") > 1
    if is_local and not Path(path).expanduser().exists():
        raise PipelineError(
            f"{config_key}={model_id}: no such folder; point {config_key} at a hub id or a local model folder "
            f"(tiny offline models: `neu-det tiny-models DIR`)"
        )
    try:
        return load(model_id)
    except (OSError, ValueError) as exc:
        offline = " (HF_HUB_OFFLINE is set: download it first or use a local folder)" if os.environ.get("HF_HUB_OFFLINE") else ""
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"could not load {config_key}={model_id}{offline}: {first_line}") from None
