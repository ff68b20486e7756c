"""NEU-DET reading and validation.

Handles both distributions (original `IMAGES/` + `ANNOTATIONS/`, Kaggle `train|validation/images/<class>/`
+ `train|validation/annotations/`) and the real quirks of the data: the image class is the filename prefix
(or the Kaggle class folder), boxes may carry another class than their image, `<filename>` often lacks
`.jpg`, and `<depth>` says 1 for 3-channel JPEGs. Every problem becomes a :class:`Problem` naming the file,
what is wrong and what was done about it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

from PIL import Image, UnidentifiedImageError

from neu_det_pipeline.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
KAGGLE_SPLITS = ("train", "validation")

Layout = Literal["original", "kaggle"]


@dataclass(frozen=True)
class Box:
    """A Pascal VOC box in pixel-edge coordinates (0 <= xmin < xmax <= width)."""

    label: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float


@dataclass
class Sample:
    """One validated image with its boxes."""

    id: str
    image_class: str
    image_path: Path
    annotation_path: Path
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)

    def to_record(self, root: Path) -> dict:
        return {
            "id": self.id,
            "class": self.image_class,
            "source": self.image_path.relative_to(root).as_posix(),
            "annotation": self.annotation_path.relative_to(root).as_posix(),
            "width": self.width,
            "height": self.height,
            "boxes": [asdict(box) for box in self.boxes],
        }


@dataclass(frozen=True)
class Problem:
    """Something wrong with an input file and what was done about it."""

    file: str
    problem: str
    action: Literal["skipped image", "dropped box", "clipped box"]

    @property
    def fatal_to_image(self) -> bool:
        return self.action == "skipped image"

    def line(self) -> str:
        return f"{self.file}: {self.problem} ({self.action})"


@dataclass(frozen=True)
class Pair:
    """An image file, its annotation file and the class its location implies."""

    id: str
    image_class: str | None
    image_path: Path | None
    annotation_path: Path | None


def detect_layout(root: Path) -> Layout:
    if (root / "IMAGES").is_dir() and (root / "ANNOTATIONS").is_dir():
        return "original"
    if any((root / split / "images").is_dir() for split in KAGGLE_SPLITS):
        return "kaggle"
    raise DataError(
        f"{root} is not a NEU-DET folder: expected IMAGES/ and ANNOTATIONS/ (original layout) or "
        f"train|validation/images/<class>/ with train|validation/annotations/ (Kaggle layout); set data.root=DIR"
    )


def class_from_stem(stem: str, classes: list[str]) -> str | None:
    """`rolled-in_scale_12` -> `rolled-in_scale`; the longest matching prefix wins."""
    matches = [name for name in classes if stem.startswith(f"{name}_")]
    return max(matches, key=len) if matches else None


def _images_in(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def _xmls_in(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.glob("*.xml"))} if folder.is_dir() else {}


def _pairs(images: dict[str, tuple[Path, str | None]], annotations: dict[str, Path]) -> list[Pair]:
    pairs = []
    for stem in sorted(set(images) | set(annotations)):
        image_path, image_class = images.get(stem, (None, None))
        pairs.append(Pair(stem, image_class, image_path, annotations.get(stem)))
    return pairs


def discover(root: Path, layout: str, classes: list[str]) -> tuple[Layout, list[Pair]]:
    """Find every image/annotation pair under `root` (unmatched files become half-empty pairs)."""
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; set data.root=DIR to a NEU-DET folder")
    found: Layout = detect_layout(root) if layout == "auto" else layout  # type: ignore[assignment]
    images: dict[str, tuple[Path, str | None]] = {}
    annotations: dict[str, Path] = {}
    if found == "original":
        for stem, path in _images_in(root / "IMAGES").items():
            images[stem] = (path, class_from_stem(stem, classes))
        annotations = _xmls_in(root / "ANNOTATIONS")
    else:
        for split in KAGGLE_SPLITS:
            image_root = root / split / "images"
            if not image_root.is_dir():
                continue
            for class_dir in sorted(p for p in image_root.iterdir() if p.is_dir()):
                for stem, path in _images_in(class_dir).items():
                    images[stem] = (path, class_dir.name if class_dir.name in classes else None)
            annotations.update(_xmls_in(root / split / "annotations"))
    return found, _pairs(images, annotations)


def _filename_escapes(name: str) -> bool:
    """True when an XML `<filename>` is not a plain name inside its folder."""
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.drive or len(pure.parts) != 1 or pure.name in ("..", "."):
            return True
    return False


def _read_image_size(path: Path) -> tuple[int, int]:
    """Fully decode the image (catches truncated files) and return (width, height)."""
    with Image.open(path) as image:
        image.load()
        return image.size


def _parse_box(obj: ET.Element, width: int, height: int, classes: list[str], file: str) -> tuple[Box | None, Problem | None]:
    label = (obj.findtext("name") or "").strip()
    if label not in classes:
        return None, Problem(file, f"unknown class '{label}' (known: {', '.join(classes)})", "dropped box")
    bndbox = obj.find("bndbox")
    try:
        xmin, ymin, xmax, ymax = (float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[union-attr,arg-type]
    except (AttributeError, TypeError, ValueError):
        return None, Problem(file, f"box of class '{label}' has missing or non-numeric coordinates", "dropped box")
    clipped = (max(xmin, 0.0), max(ymin, 0.0), min(xmax, float(width)), min(ymax, float(height)))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None, Problem(file, f"box {(xmin, ymin, xmax, ymax)} is empty or outside the {width}x{height} image", "dropped box")
    box = Box(label, *clipped)
    if clipped != (xmin, ymin, xmax, ymax):
        return box, Problem(file, f"box {(xmin, ymin, xmax, ymax)} extends outside the {width}x{height} image", "clipped box")
    return box, None


def load_sample(pair: Pair, classes: list[str], root: Path) -> tuple[Sample | None, list[Problem]]:
    """Validate one pair; returns the sample (None when it must be skipped) and every problem found."""
    def skip(file: Path | None, problem: str) -> tuple[None, list[Problem]]:
        name = file.relative_to(root).as_posix() if file else pair.id
        return None, [Problem(name, problem, "skipped image")]

    if pair.image_path is None:
        return skip(pair.annotation_path, "annotation has no matching image")
    if pair.annotation_path is None:
        return skip(pair.image_path, "image has no annotation XML")
    if pair.image_class is None:
        return skip(pair.image_path, f"image class is not one of: {', '.join(classes)}")
    xml_file = pair.annotation_path.relative_to(root).as_posix()
    try:
        tree = ET.parse(pair.annotation_path)
    except ET.ParseError as exc:
        return skip(pair.annotation_path, f"malformed XML ({exc})")
    filename = (tree.findtext("filename") or "").strip()
    if filename and _filename_escapes(filename):
        return skip(pair.annotation_path, f"<filename> '{filename}' points outside the image folder")
    try:
        width, height = _read_image_size(pair.image_path)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, ImportError) as exc:
        # ImportError: once ultralytics is imported it patches Image.open to load pi-heif for unknown files.
        return skip(pair.image_path, f"corrupt or truncated image ({type(exc).__name__})")

    objects = tree.findall("object")
    if not objects:
        return skip(pair.annotation_path, "annotation has no <object> boxes")
    boxes, problems = [], []
    for obj in objects:
        box, problem = _parse_box(obj, width, height, classes, xml_file)
        if box is not None:
            boxes.append(box)
        if problem is not None:
            problems.append(problem)
    if not boxes:
        return None, [*problems, Problem(xml_file, "no valid box left", "skipped image")]
    sample = Sample(pair.id, pair.image_class, pair.image_path, pair.annotation_path, width, height, boxes)
    return sample, problems
