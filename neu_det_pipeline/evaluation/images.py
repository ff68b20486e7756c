"""Labelled image folders in every layout Step 5 and `neu-det metrics` accept, loaded as grayscale arrays.

Layouts, detected in this order:
    step4        a Step 4 output folder: `manifest.jsonl` rows with `file` and `class`
    yolo         a YOLO dataset: `data.yaml` with `names`; an image's class is the class of most of its boxes
    neu-det      NEU-DET, original (`IMAGES/` + `ANNOTATIONS/`) or Kaggle layout; the class is the file prefix
                 or the Kaggle class folder
    class-folders  one subfolder of images per class
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError

from neu_det_pipeline.artifacts import MANIFEST_FILE
from neu_det_pipeline.config import NEU_DET_CLASSES
from neu_det_pipeline.data.neu_det import IMAGE_SUFFIXES, detect_layout, discover, load_sample
from neu_det_pipeline.errors import DataError
from neu_det_pipeline.io import read_jsonl

EVALUATION_SIDE = 200
"""Images are compared at NEU-DET's native 200 px: other sizes are resized (bicubic), so pairwise metrics
(LPIPS, edge-SSIM, memorisation) always compare like with like."""

LAYOUT_HELP = (
    "a NEU-DET folder (IMAGES/ + ANNOTATIONS/ or the Kaggle layout), a YOLO dataset (data.yaml with names), "
    "a folder of class subfolders, or a Step 4 output folder (manifest.jsonl)"
)


class RelativeBox(NamedTuple):
    """A labelled box as fractions of the image's width and height, so it fits the image at any size."""

    label: str
    x0: float
    y0: float
    x1: float
    y1: float


def relative_boxes(boxes: Iterable[dict[str, Any]], width: float, height: float) -> tuple[RelativeBox, ...]:
    """Pascal VOC box records (`label`, `xmin` ... in pixels of a `width` x `height` image) as fractions."""
    return tuple(RelativeBox(b["label"], b["xmin"] / width, b["ymin"] / height, b["xmax"] / width, b["ymax"] / height) for b in boxes)


@dataclass(frozen=True)
class LabelledImage:
    name: str
    """Unique name inside its folder (file stem, or the Step 4 row name)."""
    image_class: str
    path: Path
    boxes: tuple[RelativeBox, ...] = ()
    """Its defect boxes, where the layout has them (not class folders)."""


@dataclass
class ImageFolder:
    """The labelled images of one folder; `pixels` holds them as (N, 200, 200) uint8 grayscale once loaded."""

    root: Path
    layout: str
    classes: list[str]
    images: list[LabelledImage]
    skipped: list[str] = field(default_factory=list)
    """Files that could not be labelled, and why (e.g. YOLO images without boxes)."""
    pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> list[str]:
        return [image.image_class for image in self.images]

    def indices_of(self, image_class: str) -> list[int]:
        return [i for i, image in enumerate(self.images) if image.image_class == image_class]

    def counts(self) -> dict[str, int]:
        found = Counter(self.labels)
        return {name: found[name] for name in self.classes}

    def subset(self, indices: list[int]) -> ImageFolder:
        pixels = self.pixels[indices] if self.pixels is not None else None
        return ImageFolder(self.root, self.layout, self.classes, [self.images[i] for i in indices], [], pixels)

    def box_crops(self, side: int, min_pixels: int = 4) -> tuple[np.ndarray, list[str], list[int]]:
        """Every box's pixels (from the loaded images), resized to (side, side): crops, box labels, image indices.
        Boxes under `min_pixels` px on a side are left out (nothing to compare)."""
        crops, labels, owners = [], [], []
        for index, (image, pixels) in enumerate(zip(self.images, self.pixels)):
            height, width = pixels.shape
            for box in image.boxes:
                x0, y0 = int(box.x0 * width), int(box.y0 * height)
                x1, y1 = int(round(box.x1 * width)), int(round(box.y1 * height))
                if min(x1 - x0, y1 - y0) < min_pixels:
                    continue
                crop = Image.fromarray(pixels[y0:y1, x0:x1]).resize((side, side), Image.Resampling.BICUBIC)
                crops.append(np.asarray(crop, np.uint8))
                labels.append(box.label)
                owners.append(index)
        stacked = np.stack(crops) if crops else np.zeros((0, side, side), np.uint8)
        return stacked, labels, owners

    def load(self, track: Callable[[Iterable[Any], int, str], Iterable[Any]] | None = None, description: str = "loading") -> ImageFolder:
        """Decode every image (once; `track` draws a progress bar); a corrupt file stops with its name."""
        if self.pixels is None:
            images = track(self.images, len(self), description) if track else self.images
            self.pixels = np.stack([load_gray(image.path) for image in images]) if self.images else np.zeros((0, EVALUATION_SIDE, EVALUATION_SIDE), np.uint8)
        return self


def load_gray(path: Path, side: int = EVALUATION_SIDE) -> np.ndarray:
    """A (side, side) uint8 grayscale array; one clear error for an unreadable file."""
    try:
        with Image.open(path) as image:
            gray = image.convert("L")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, ImportError) as exc:
        # ImportError: once ultralytics is imported it patches Image.open to load pi-heif for unknown files.
        raise DataError(f"{path}: unreadable image ({type(exc).__name__}); replace or remove the file") from None
    if gray.size != (side, side):
        gray = gray.resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(gray, dtype=np.uint8)


def gray_to_rgb(pixels: np.ndarray) -> list[Image.Image]:
    """PIL RGB images (3 identical channels) for model processors."""
    return [Image.fromarray(p, mode="L").convert("RGB") for p in pixels]


def path_inside(root: Path, relative: str, listed_in: Path) -> Path:
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise DataError(f"{listed_in}: path {relative!r} points outside {root}; fix the file")
    return path


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_step4(root: Path, classes: list[str]) -> ImageFolder:
    manifest = root / MANIFEST_FILE
    images = []
    for row in read_jsonl(manifest):
        if "file" not in row or "class" not in row:
            raise DataError(f"{manifest}: a row lacks 'file' or 'class'; it is not a Step 4 manifest")
        boxes = relative_boxes(row["boxes"], row["width"], row["height"]) if {"boxes", "width", "height"} <= row.keys() else ()
        images.append(LabelledImage(row.get("name", Path(row["file"]).stem), row["class"], path_inside(root, row["file"], manifest), boxes))
    return ImageFolder(root, "step4", classes, images)


def _read_yolo(root: Path, classes: list[str] | None) -> ImageFolder:
    data_yaml = root / "data.yaml"
    try:
        names = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))["names"]
    except (yaml.YAMLError, KeyError, TypeError):
        raise DataError(f"{data_yaml}: not a YOLO data.yaml with `names`; fix the file") from None
    names = [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)
    images, skipped = [], []
    for path in _images_under(root / "images"):
        label = root / "labels" / path.relative_to(root / "images").with_suffix(".txt")
        lines = [line.split() for line in label.read_text().splitlines() if line.strip()] if label.is_file() else []
        ids = [int(line[0]) for line in lines]
        if not ids or max(ids) >= len(names):
            skipped.append(f"{path.relative_to(root)}: no box with a class in data.yaml")
            continue
        # most_common keeps first-seen order on ties; sort so ties go to the lowest class id.
        image_class = names[Counter(sorted(ids)).most_common(1)[0][0]]
        boxes = tuple(RelativeBox(names[int(i)], float(cx) - float(w) / 2, float(cy) - float(h) / 2, float(cx) + float(w) / 2,
                                  float(cy) + float(h) / 2) for i, cx, cy, w, h in (line[:5] for line in lines))
        images.append(LabelledImage(path.relative_to(root / "images").with_suffix("").as_posix(), image_class, path, boxes))
    return ImageFolder(root, "yolo", names if classes is None else classes, images, skipped)


def _read_neu_det(root: Path, classes: list[str]) -> ImageFolder:
    _, pairs = discover(root, "auto", classes)
    images = []
    for pair in pairs:
        if pair.image_path and pair.image_class:
            # Boxes from the annotation where it is valid; an image without one still counts for whole-image metrics.
            sample = load_sample(pair, classes, root)[0] if pair.annotation_path else None
            boxes = relative_boxes(map(asdict, sample.boxes), sample.width, sample.height) if sample else ()
            images.append(LabelledImage(pair.id, pair.image_class, pair.image_path, boxes))
    skipped = [f"{p.image_path.relative_to(root)}: class not one of {', '.join(classes)}" for p in pairs if p.image_path and not p.image_class]
    return ImageFolder(root, "neu-det", classes, images, skipped)


def _read_class_folders(root: Path, classes: list[str] | None) -> ImageFolder:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _images_under(p))
    images = [LabelledImage(f"{folder.name}/{path.stem}", folder.name, path) for folder in folders for path in _images_under(folder)]
    found = [folder.name for folder in folders]
    return ImageFolder(root, "class-folders", found if classes is None else classes, images)


def read_image_folder(root: str | Path, classes: list[str] | None = None) -> ImageFolder:
    """The labelled images under `root` (layout detected); `classes` fixes the class list and order
    (NEU-DET and Step 4 folders default to the six NEU-DET classes)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass {LAYOUT_HELP}")
    if (root / MANIFEST_FILE).is_file():
        folder = _read_step4(root, classes or list(NEU_DET_CLASSES))
    elif (root / "data.yaml").is_file():
        folder = _read_yolo(root, classes)
    elif _is_neu_det(root):
        folder = _read_neu_det(root, classes or list(NEU_DET_CLASSES))
    else:
        folder = _read_class_folders(root, classes)
    if not folder.images:
        raise DataError(f"{root} holds no labelled images ({folder.layout} layout); pass {LAYOUT_HELP}")
    unknown = sorted(set(folder.labels) - set(folder.classes))
    if unknown:
        raise DataError(
            f"{root}: classes {unknown} are not among {folder.classes}; rename the class folders or pass matching folders"
        )
    return folder


def _is_neu_det(root: Path) -> bool:
    try:
        detect_layout(root)
    except DataError:
        return False
    return True


def check_same_classes(real: ImageFolder, synth: ImageFolder) -> None:
    """Every synthetic class must be a real class: per-class metrics compare class by class."""
    unknown = sorted(set(synth.labels) - set(real.classes))
    if unknown:
        raise DataError(
            f"class names differ: {synth.root} has {unknown}, which {real.root} does not have ({', '.join(real.classes)}); "
            f"rename the classes of one folder to match the other"
        )
