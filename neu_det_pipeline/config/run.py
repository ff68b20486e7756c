"""`run`: output folder, seed, device, precision."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from neu_det_pipeline.config.base import Section


class RunConfig(Section):
    output_dir: Path = Path("outputs/base")
    """Root of all outputs; each step writes into `<output_dir>/<step name>/`."""
    seed: int = 0
    """Global seed for splits, training and generation; recorded in every summary."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device for inference steps: `auto` takes CUDA when available."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    """Precision of training (autocast, frozen weights) and inference. On GPU as set, except DINOv3 (Steps 5-6),
    which is not fp16-safe and runs in bf16 there (fp32 where the GPU has no bf16). On CPU `bf16` runs in bf16 where
    the CPU has bf16 kernels (slow, but it exercises the half-precision paths); `fp16` runs in fp32 there (CPU fp16
    kernels are slow or missing). Each step's summary records the dtype it really ran in (`dtype`)."""
    tiny_models_dir: Path | None = None
    """If set, tiny random models are built here (once) before any step runs; for offline smoke runs."""
    offline: bool = False
    """No Hugging Face hub requests in this run: sets `HF_HUB_OFFLINE=1` for the process before any model library
    loads. For configs whose models are all local folders (configs/smoke.yaml); it also keeps quiet the libraries
    that ask the hub at import (bitsandbytes fetches CPU kernels there when the `kernels` package is installed)."""

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads an unquoted `no` as false
