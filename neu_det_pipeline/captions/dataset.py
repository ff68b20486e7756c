"""Step 2's inputs (Step 0's training split) and its `imagefolder` caption dataset.

The dataset folder holds the images and a `metadata.jsonl` whose `file_name` is relative to it,
the layout `datasets.load_dataset("imagefolder", data_dir=...)` and the diffusers training
scripts (`--train_data_dir`, `--caption_column text`) read. imagefolder only resolves files
inside its folder, so the Step 0 training copies are hard-linked in (copied across file systems).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from neu_det_pipeline.artifacts import train_rows
from neu_det_pipeline.io import write_jsonl

METADATA_FILE = "metadata.jsonl"
DATASET_DIR = "train"
"""The imagefolder dataset's folder inside the step's output folder."""


@dataclass(frozen=True)
class TrainImage:
    """One training-split row of the Step 0 manifest."""

    id: str
    image_class: str
    path: Path
    """Step 0's 3-channel training copy (the image diffusion trains on)."""
    source: str
    """The original image, relative to `data.root`."""

    @property
    def file_name(self) -> str:
        """Name inside the dataset folder (ids are unique)."""
        return f"{self.id}{self.path.suffix}"

    @property
    def dataset_path(self) -> str:
        """Path relative to the step's output folder."""
        return f"{DATASET_DIR}/{self.file_name}"


def read_train_images(step0_dir: Path) -> list[TrainImage]:
    """The training split of Step 0's manifest, sorted by id."""
    return [
        TrainImage(id=row["id"], image_class=row["class"], path=step0_dir / row["image"], source=row["source"])
        for row in train_rows(step0_dir)
    ]


def write_imagefolder_metadata(dataset_dir: Path, texts: dict[str, str]) -> Path:
    """`metadata.jsonl` rows `{"file_name", "text"}` from file name (relative to `dataset_dir`) -> caption."""
    return write_jsonl(dataset_dir / METADATA_FILE, [{"file_name": name, "text": text} for name, text in texts.items()])
