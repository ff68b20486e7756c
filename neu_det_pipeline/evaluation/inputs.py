"""Step 5's inputs: Step 0's real splits and Step 4's synthetic images, as labelled image folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neu_det_pipeline.artifacts import MANIFEST_FILE
from neu_det_pipeline.errors import MissingStepOutputError
from neu_det_pipeline.evaluation.images import ImageFolder, LabelledImage, path_inside, relative_boxes
from neu_det_pipeline.evaluation.utility import TrainImage
from neu_det_pipeline.io import read_jsonl

STEP4_KEYS = ("name", "file", "class", "source", "boxes", "width", "height", "yolo_image", "yolo_label")


@dataclass
class StepInputs:
    real: dict[str, ImageFolder]
    """Step 0 split name (`train`, `val`, `test`, `train_heldout`) -> its real images (original JPEGs)."""
    real_rows: dict[str, list[dict[str, Any]]]
    synth: ImageFolder
    synth_rows: list[dict[str, Any]]
    """Step 4 manifest rows, aligned with `synth.images`."""
    step0_dir: Path
    step4_dir: Path

    def yolo_items(self, split: str) -> list[TrainImage]:
        """Step 0's YOLO export of a split."""
        yolo = self.step0_dir / "yolo"
        return [TrainImage(row["id"], yolo / "images" / split / f"{row['id']}{Path(row['source']).suffix.lower()}",
                           yolo / "labels" / split / f"{row['id']}.txt") for row in self.real_rows.get(split, [])]

    def synthetic_items(self, rows: list[dict[str, Any]]) -> list[TrainImage]:
        return [TrainImage(row["name"], self.step4_dir / row["yolo_image"], self.step4_dir / row["yolo_label"]) for row in rows]


def read_step_inputs(step0_dir: Path, step4_dir: Path, data_root: Path, classes: list[str]) -> StepInputs:
    """Both manifests, checked: every file they name must exist inside its folder."""
    rerun4 = "re-run `python -m neu_det_pipeline.step4_generate --config <same config>`"
    manifest0, manifest4 = step0_dir / MANIFEST_FILE, step4_dir / MANIFEST_FILE
    for manifest, step in ((manifest0, "step0_prepare"), (manifest4, "step4_generate")):
        if not manifest.is_file():
            raise MissingStepOutputError(f"{manifest} is missing; re-run `python -m neu_det_pipeline.{step} --config <same config>`")
    real_rows: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(read_jsonl(manifest0), key=lambda r: r["id"]):
        real_rows.setdefault(row["split"], []).append(row)
    real = {
        split: ImageFolder(data_root, "neu-det", classes, [LabelledImage(r["id"], r["class"], path_inside(data_root, r["source"], manifest0),
                                                     relative_boxes(r["boxes"], r["width"], r["height"])) for r in rows])
        for split, rows in real_rows.items()
    }
    synth_rows = read_jsonl(manifest4)
    if not synth_rows:
        raise MissingStepOutputError(f"{manifest4} lists no synthetic image; {rerun4} with more sources")
    for row in synth_rows:
        missing = [key for key in STEP4_KEYS if key not in row]
        if missing:
            raise MissingStepOutputError(f"{manifest4}: row {row.get('name', '?')} lacks {missing}; {rerun4}")
        for key in ("file", "yolo_image", "yolo_label"):
            if not path_inside(step4_dir, row[key], manifest4).is_file():
                raise MissingStepOutputError(f"{step4_dir / row[key]} (listed in {manifest4}) is missing; {rerun4}")
    synth = ImageFolder(step4_dir, "step4", classes, [LabelledImage(r["name"], r["class"], step4_dir / r["file"], relative_boxes(r["boxes"], r["width"], r["height"]))
                                                      for r in synth_rows])
    if "train" not in real:
        raise MissingStepOutputError(f"{manifest0} has no training images; raise data.split.train and re-run step0_prepare")
    return StepInputs(real, real_rows, synth, synth_rows, step0_dir, step4_dir)

