"""What steps hand to each other: the file names, in one place, and the reader of Step 0's training split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neu_det_pipeline.errors import MissingStepOutputError
from neu_det_pipeline.io import read_jsonl

MANIFEST_FILE = "manifest.jsonl"
"""step0_prepare: one validated image per line (class, split, boxes, training copy, mask)."""
TOKEN_MAP_FILE = "token_map.json"
"""step1_textual_inversion: class -> {token, files: {text encoder name: embedding file}}."""
CAPTIONS_FILE = "captions.jsonl"
"""step2_captions: one row per training image with its final prompt."""
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
"""step3_lora: diffusers' default LoRA file name, so `pipe.load_lora_weights(folder)` finds it."""


def train_rows(step0_dir: Path) -> list[dict[str, Any]]:
    """Step 0 manifest rows of the training split, sorted by id; every training copy must exist."""
    manifest = step0_dir / MANIFEST_FILE
    rerun = f"re-run `python -m neu_det_pipeline.step0_prepare --config <same config>` to rebuild {step0_dir}"
    if not manifest.is_file():
        raise MissingStepOutputError(f"{manifest} is missing; {rerun}")
    rows = sorted((row for row in read_jsonl(manifest) if row["split"] == "train"), key=lambda row: row["id"])
    if not rows:
        raise MissingStepOutputError(f"{manifest} has no training images; raise data.split.train and {rerun}")
    for row in rows:
        if not (step0_dir / row["image"]).is_file():
            raise MissingStepOutputError(f"{step0_dir / row['image']} (listed in {manifest}) is missing; {rerun}")
    return rows
