"""Classifier examples (real, synthetic, defect-free, or a user's own data), joint augmentation, seeded order.

Where examples come from:
- Step 0: the train / val / test splits, training copies and box masks (`train_heldout` is never used).
- Synthetic: Step 4's manifest (`step4`) or Step 5's curated manifest (`step5`; paths relative to the Step 4
  folder), `classifier.synthetic_ratio` images per real training image, per class, seeded. Training only.
- `classifier.normal_dir`: defect-free images (all-zero masks); the task becomes binary normal/defect.
- `classifier.own_data`: the seed guide's layout, replacing Step 0:
      images/<file>          any image
      masks/<stem>.png       white defect pixels; an image without a mask is defect-free
      train_labels.txt       `file,label` lines (also val_labels.txt; test_labels.txt optional, else val is the test)

`classifier.input=box_crops`: every VOC object of Step 0's (or Step 4's) manifest is a sample labelled with its
own class; training crops its box with a random margin of up to `crop_margin` of the box's width / height per
side, evaluation with half of it (clipped to the image), and the box mask is cropped alongside.

Exact resume: an epoch's order and every sample's augmentation (and crop) depend only on (seed, epoch, index).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from neu_det_pipeline.artifacts import MANIFEST_FILE
from neu_det_pipeline.config import ClassifierAugmentationConfig, PipelineConfig
from neu_det_pipeline.data.neu_det import IMAGE_SUFFIXES
from neu_det_pipeline.data.split import SPLITS, stratified_split
from neu_det_pipeline.errors import DataError, MissingStepOutputError
from neu_det_pipeline.io import read_jsonl

NORMAL, DEFECT = "normal", "defect"
OWN_DATA_LABEL_FILES = {"train": "train_labels.txt", "val": "val_labels.txt", "test": "test_labels.txt"}
CURATED_MANIFEST = Path("curated") / MANIFEST_FILE
"""Step 5's curated set, relative to its output folder."""

BoxFractions = tuple[float, float, float, float]
"""(xmin, ymin, xmax, ymax) as fractions of the image's width and height: the same box on any copy's size."""


@dataclass(frozen=True)
class Example:
    image: Path
    mask: Path | None
    """White-on-black defect mask; None: defect-free (all-zero target)."""
    label: int
    origin: str
    """`real`, `synthetic` or `normal`."""
    box: BoxFractions | None = None
    """`box_crops`: the object this sample is (its label is the object's class); None: the whole image."""


@dataclass
class ClassifierData:
    classes: list[str]
    splits: dict[str, list[Example]]
    """train, val, test."""
    notes: list[str] = field(default_factory=list)
    """Choices worth a line in the summary (e.g. the test split standing in for a missing one)."""

    def counts(self, distinct_images: bool = False) -> dict[str, dict[str, int]]:
        """Samples per split and origin; `distinct_images`: images instead (box crops share their image)."""
        def count(examples: list[Example]) -> dict[str, int]:
            unique = {(e.origin, e.image) for e in examples} if distinct_images else [(e.origin, e.image) for e in examples]
            return dict(Counter(origin for origin, _ in unique))

        return {name: count(examples) for name, examples in self.splits.items()}


def inside(folder: Path, relative: str, listed_in: Path) -> Path:
    """`folder / relative`, refusing paths from a data file that escape the folder."""
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise DataError(f"{listed_in}: path '{relative}' points outside {folder}; fix the file")
    return path


def load_rgb(path: Path) -> Image.Image:
    """An RGB image (grayscale ones get 3 identical channels); one clear error for an unreadable file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, ImportError) as exc:
        # ImportError: once ultralytics is imported it patches Image.open to load pi-heif for unknown files.
        raise DataError(f"{path}: unreadable image ({type(exc).__name__}); replace or remove the file") from None


# ------------------------------------------------------------------------------------------ sources


def load_data(config: PipelineConfig, step0_dir: Path, synthetic_dir: Path | None) -> ClassifierData:
    """Real splits (Step 0 or own data), plus defect-free and synthetic training images as configured."""
    section = config.classifier
    objects = section.input == "box_crops"
    if section.own_data is not None:
        data = own_data(section.own_data)
    else:
        data = step0_data(step0_dir, config.data.classes, objects)
    if section.normal_dir is not None:
        add_normal_images(data, section.normal_dir, config)
    if section.synthetic != "none":
        synthetic = synthetic_examples(synthetic_dir, section.synthetic, data.classes, objects)
        if section.synthetic_only:
            data.splits["train"] = synthetic
        else:
            data.splits["train"] += sample_per_class(synthetic, data.splits["train"], section.synthetic_ratio, config.run.seed)
    if not data.splits["train"]:
        raise DataError("the classifier has no training images; check the data source and classifier.synthetic_ratio")
    return data


def object_examples(row: dict[str, Any], image: Path, mask: Path, classes: list[str], origin: str, listed_in: Path) -> list[Example]:
    """One example per box of a manifest row (Step 0's or Step 4's: `boxes` in pixels of `width` x `height`)."""
    width, height = row["width"], row["height"]
    examples = []
    for box in row["boxes"]:
        if box["label"] not in classes:
            raise DataError(f"{listed_in}: box class '{box['label']}' of {image.name} is not one of {classes}")
        fractions = (box["xmin"] / width, box["ymin"] / height, box["xmax"] / width, box["ymax"] / height)
        examples.append(Example(image, mask, classes.index(box["label"]), origin, fractions))
    return examples


def step0_data(step0_dir: Path, classes: list[str], objects: bool = False) -> ClassifierData:
    manifest = step0_dir / MANIFEST_FILE
    rerun = f"re-run `python -m neu_det_pipeline.step0_prepare --config <same config>` to rebuild {step0_dir}"
    if not manifest.is_file():
        raise MissingStepOutputError(f"{manifest} is missing; {rerun}")
    splits: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for row in sorted(read_jsonl(manifest), key=lambda row: row["id"]):
        if row["split"] not in splits:
            continue  # train_heldout: the low-data protocol keeps it from every model but Step 5's oracle
        image, mask = step0_dir / row["image"], step0_dir / row["mask"]
        for path in (image, mask):
            if not path.is_file():
                raise MissingStepOutputError(f"{path} (listed in {manifest}) is missing; {rerun}")
        if objects:
            splits[row["split"]] += object_examples(row, image, mask, classes, "real", manifest)
        else:
            splits[row["split"]].append(Example(image, mask, classes.index(row["class"]), "real"))
    return ClassifierData(list(classes), splits)


def synthetic_examples(folder: Path, source: str, classes: list[str], objects: bool = False) -> list[Example]:
    """Step 4's images (`step4`: `folder` is the Step 4 output), Step 5's curated ones (`step5`: `folder` is
    the Step 5 output and paths are relative to the sibling Step 4 folder) or a Step 5 control arm's (`classical`,
    `copy_paste`: `folder` is its dataset, in Step 4's layout)."""
    manifest = folder / (CURATED_MANIFEST if source == "step5" else MANIFEST_FILE)
    step4_dir = folder.parent / "step4_generate" if source == "step5" else folder
    if not manifest.is_file():
        raise MissingStepOutputError(f"{manifest} is missing; re-run the step that writes {folder}")
    examples = []
    for row in sorted(read_jsonl(manifest), key=lambda row: row["name"]):
        if row["class"] not in classes:
            raise DataError(f"{manifest}: class '{row['class']}' of {row['name']} is not one of {classes}")
        image, mask = inside(step4_dir, row["file"], manifest), inside(step4_dir, row["mask"], manifest)
        for path in (image, mask):
            if not path.is_file():
                raise MissingStepOutputError(f"{path} (listed in {manifest}) is missing; re-run the step that wrote it")
        if objects:
            examples += object_examples(row, image, mask, classes, "synthetic", manifest)
        else:
            examples.append(Example(image, mask, classes.index(row["class"]), "synthetic"))
    return examples


def sample_per_class(pool: list[Example], real: list[Example], ratio: float, seed: int) -> list[Example]:
    """`ratio` synthetic images per real training image of each class (seeded; fewer when fewer exist)."""
    real_counts = Counter(e.label for e in real)
    chosen = []
    for label in sorted({e.label for e in pool}):
        candidates = [e for e in pool if e.label == label]
        random.Random(f"{seed}:synthetic:{label}").shuffle(candidates)
        chosen += candidates[: round(ratio * real_counts[label])]
    return chosen


def own_data(root: Path) -> ClassifierData:
    """The seed guide's layout; class names are the sorted labels found in the label files."""
    images, masks = root / "images", root / "masks"
    for needed in (images, masks, root / OWN_DATA_LABEL_FILES["train"], root / OWN_DATA_LABEL_FILES["val"]):
        if not needed.exists():
            raise DataError(
                f"{needed} is missing; classifier.own_data needs images/, masks/ (white defect pixels), "
                f"train_labels.txt and val_labels.txt with `file,label` lines"
            )
    lines = {
        split: _label_lines(root / name) for split, name in OWN_DATA_LABEL_FILES.items() if (root / name).is_file()
    }
    classes = sorted({label for rows in lines.values() for _, label in rows}, key=lambda s: (not s.isdigit(), s.zfill(9)))
    splits = {}
    for split, rows in lines.items():
        listed_in = root / OWN_DATA_LABEL_FILES[split]
        splits[split] = []
        for file, label in rows:
            image = inside(images, file, listed_in)
            if not image.is_file():
                raise DataError(f"{listed_in}: image '{file}' not found in {images}; fix the line or add the image")
            mask = masks / f"{Path(file).stem}.png"
            splits[split].append(Example(image, mask if mask.is_file() else None, classes.index(label), "real"))
    notes = []
    if "test" not in splits:
        splits["test"] = splits["val"]
        notes.append(f"{root} has no test_labels.txt: the validation images are also the test set")
    return ClassifierData(classes, splits, notes)


def _label_lines(path: Path) -> list[tuple[str, str]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        file, sep, label = (part.strip() for part in line.partition(","))
        if not sep or not file or not label:
            raise DataError(f"{path} line {number}: {line!r} is not a `file,label` line")
        rows.append((file, label))
    return rows


def image_files(folder: Path, named: str, fix: str) -> list[Path]:
    """The image files directly in `folder`, sorted; none (or no folder) raises one line: `named` holds no images; `fix`."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise DataError(f"{named} holds no images ({', '.join(IMAGE_SUFFIXES)}); {fix}")
    return files


def add_normal_images(data: ClassifierData, folder: Path, config: PipelineConfig) -> None:
    """Binary normal/defect: every defect class becomes `defect`; `folder`'s images are split like `data.split`."""
    files = image_files(folder, f"classifier.normal_dir={folder}", "set it to a folder of defect-free images")
    fractions = (config.data.split.train, config.data.split.val, config.data.split.test)
    by_name = {p.name: p for p in files}
    normal_splits = stratified_split({name: NORMAL for name in by_name}, fractions, config.run.seed)
    for split, examples in data.splits.items():
        data.splits[split] = [Example(e.image, e.mask, 1, e.origin) for e in examples]
        data.splits[split] += [Example(by_name[name], None, 0, "normal") for name in normal_splits[split]]
    data.classes = [NORMAL, DEFECT]


# ------------------------------------------------------------------------------------- dataset and order


class EpochSampler(Sampler[tuple[int, int]]):
    """One epoch of (index, epoch) keys: a seeded permutation, or class-balanced draws with replacement."""

    def __init__(self, labels: list[int], seed: int, epoch: int, class_balanced: bool):
        self.labels, self.seed, self.epoch, self.class_balanced = labels, seed, epoch, class_balanced

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # Seeded from a string through random.Random: stable across processes, unlike hash() of a str.
        generator = torch.Generator().manual_seed(random.Random(f"{self.seed}:order:{self.epoch}").getrandbits(63))
        if self.class_balanced:
            counts = Counter(self.labels)
            weights = torch.tensor([1.0 / counts[label] for label in self.labels], dtype=torch.float64)
            order = torch.multinomial(weights, len(self.labels), replacement=True, generator=generator)
        else:
            order = torch.randperm(len(self.labels), generator=generator)
        for index in order.tolist():
            yield index, self.epoch


def crop_box(image: Image.Image, box: BoxFractions, margins: tuple[float, float, float, float]) -> Image.Image:
    """The box widened by `margins` (left, top, right, bottom, as fractions of the box's width / height),
    clipped to the image; at least one pixel."""
    width, height = image.size
    x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    box_w, box_h = x1 - x0, y1 - y0
    left = min(width - 1, max(0, round(x0 - margins[0] * box_w)))
    top = min(height - 1, max(0, round(y0 - margins[1] * box_h)))
    right = max(left + 1, min(width, round(x1 + margins[2] * box_w)))
    bottom = max(top + 1, min(height, round(y1 + margins[3] * box_h)))
    return image.crop((left, top, right, bottom))


def training_margins(seed: int, epoch: int, index: int, crop_margin: float) -> tuple[float, float, float, float]:
    """A training crop's margins (left, top, right, bottom), each drawn from [0, crop_margin] by (seed, epoch, index)."""
    rng = random.Random(f"{seed}:crop:{epoch}:{index}")
    return tuple(rng.uniform(0, crop_margin) for _ in range(4))  # type: ignore[return-value]


def evaluation_margins(crop_margin: float) -> tuple[float, float, float, float]:
    """Evaluation and prediction crops: half the training margin's maximum on every side."""
    return (crop_margin / 2,) * 4


class ClassifierDataset(Dataset):
    """Images (or box crops) in [0, 1] and {0, 1} masks at `image_size`; training keys (index, epoch) get augmented
    and, for box crops, a random margin.

    Decoded, resized images are cached (a few hundred MB for NEU-DET at 224 px): epochs after the first
    decode nothing. Box crops cache their source images at full size (training crops differ every epoch).
    """

    def __init__(
        self, examples: list[Example], image_size: int, seed: int, augmentation: ClassifierAugmentationConfig | None = None,
        crop_margin: float = 0.1,
    ):
        self.examples, self.image_size, self.seed = examples, image_size, seed
        self.crop_margin = crop_margin
        self._augmentation = None if augmentation is None else JointAugmentation(augmentation, image_size)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._sources: dict[Path, tuple[Image.Image, Image.Image | None]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def labels(self) -> list[int]:
        return [e.label for e in self.examples]

    def decoded(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 image [3, S, S] and uint8 mask [1, S, S] (0 / 1); box crops with the evaluation margin."""
        if index not in self._cache:
            self._cache[index] = self._tensors(index, evaluation_margins(self.crop_margin))
        return self._cache[index]

    def _source(self, example: Example) -> tuple[Image.Image, Image.Image | None]:
        """Full-size RGB image and L mask (None: defect-free); kept for box crops, which reuse them every epoch."""
        if example.image in self._sources:
            return self._sources[example.image]
        image = load_rgb(example.image)
        mask = None if example.mask is None else load_rgb(example.mask).convert("L")
        if example.box is not None:
            self._sources[example.image] = (image, mask)
        return image, mask

    def _tensors(self, index: int, margins: tuple[float, float, float, float]) -> tuple[torch.Tensor, torch.Tensor]:
        example, size = self.examples[index], (self.image_size, self.image_size)
        image, mask = self._source(example)
        if example.box is not None:
            image = crop_box(image, example.box, margins)
            mask = None if mask is None else crop_box(mask, example.box, margins)
        pixels = torch.from_numpy(np.array(image.resize(size, Image.Resampling.BICUBIC))).permute(2, 0, 1).contiguous()
        if mask is None:
            return pixels, torch.zeros(1, *size, dtype=torch.uint8)
        gray = mask.resize(size, Image.Resampling.NEAREST)
        return pixels, torch.from_numpy((np.asarray(gray) > 127).astype(np.uint8))[None]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        if epoch is not None and self.examples[index].box is not None:
            pixels, mask = self._tensors(index, training_margins(self.seed, epoch, index, self.crop_margin))
        else:
            pixels, mask = self.decoded(index)
        if epoch is not None and self._augmentation is not None:
            pixels, mask = self._augmentation(pixels, mask, random.Random(f"{self.seed}:augment:{epoch}:{index}").getrandbits(63))
        return {
            "pixels": pixels.float() / 255,
            "masks": mask.float(),
            "labels": torch.tensor(self.examples[index].label),
            "index": torch.tensor(index),
        }


class JointAugmentation:
    """One albumentations pipeline for image and mask; every call is seeded on its own, so a sample's augmentation
    depends only on its seed (not on the worker or what the worker drew before).

    Geometric transforms move image and mask together (nearest-neighbour for the mask); photometric ones touch the
    image only. Uncovered pixels (affine corners, dropout holes) take the sample's mean grey: black would read as a
    dark defect. Grayscale textures: no hue, colour or channel changes.
    """

    def __init__(self, cfg: ClassifierAugmentationConfig, image_size: int):
        transforms = guide_transforms(image_size) if cfg.preset == "guide" else default_transforms(cfg)
        self.compose = A.Compose(transforms)
        self.grey_filled = [t for t in self.compose.transforms if isinstance(t, (A.Affine, A.CoarseDropout))]

    def __call__(self, pixels: torch.Tensor, mask: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 image [3, S, S] and mask [1, S, S] in, the same shapes out."""
        image = np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())
        if self.grey_filled:  # only then: the mean grey is a pass over every pixel of every sample
            grey = tuple(float(v) for v in image.reshape(-1, 3).mean(0).round())
            for transform in self.grey_filled:
                transform.fill = grey
        # Shared generators, not Compose(seed=...) / set_random_seed: albumentations 2.0.8 gives every transform its own
        # generator seeded with the same value, so e.g. HorizontalFlip and VerticalFlip always fire together.
        self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = self.compose(image=image, mask=np.ascontiguousarray(mask[0].numpy()))
        return torch.from_numpy(out["image"]).permute(2, 0, 1).contiguous(), torch.from_numpy(out["mask"])[None].contiguous()


def default_transforms(cfg: ClassifierAugmentationConfig) -> list[A.BasicTransform]:
    """Flips, quarter turns and a small affine (image and mask), brightness and contrast (image), as configured."""
    transforms: list[A.BasicTransform] = []
    if cfg.hflip:
        transforms.append(A.HorizontalFlip(p=0.5))
    if cfg.vflip:
        transforms.append(A.VerticalFlip(p=0.5))
    if cfg.rot90:
        transforms.append(A.RandomRotate90(p=1.0))  # 0, 1, 2 or 3 turns
    if cfg.max_rotation or cfg.max_translate or cfg.max_scale:
        transforms.append(A.Affine(
            rotate=(-cfg.max_rotation, cfg.max_rotation), translate_percent=(-cfg.max_translate, cfg.max_translate),
            scale=(1 - cfg.max_scale, 1 + cfg.max_scale), interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
            border_mode=cv2.BORDER_CONSTANT, fill_mask=0, p=1.0,
        ))
    if cfg.brightness or cfg.contrast:
        transforms.append(A.RandomBrightnessContrast(
            brightness_limit=cfg.brightness, contrast_limit=cfg.contrast, brightness_by_max=False, p=1.0
        ))
    return transforms


def guide_transforms(image_size: int) -> list[A.BasicTransform]:
    """The seed guide's set at its usual settings. ShiftScaleRotate is deprecated in albumentations 2 in favour of
    Affine (it warns "a special case of Affine"): the same ranges through Affine. Dropout holes are cleared from the
    mask too (a hidden defect is not a visible one). ChannelShuffle is left out (grayscale)."""
    padded = image_size + image_size // 8
    return [
        A.PadIfNeeded(min_height=padded, min_width=padded, border_mode=cv2.BORDER_REFLECT_101),
        A.RandomCrop(height=image_size, width=image_size),
        A.Affine(  # ShiftScaleRotate's defaults: shift 0.0625, scale 0.1, rotation 45 degrees
            rotate=(-45, 45), translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, fill_mask=0, p=0.5,
        ),
        A.OneOf([
            A.GridDistortion(border_mode=cv2.BORDER_REFLECT_101, mask_interpolation=cv2.INTER_NEAREST),
            A.ElasticTransform(border_mode=cv2.BORDER_REFLECT_101, mask_interpolation=cv2.INTER_NEAREST),
        ], p=0.3),
        A.CoarseDropout(num_holes_range=(1, 8), hole_height_range=(0.05, 0.1), hole_width_range=(0.05, 0.1), fill_mask=0, p=0.5),
    ]


def steps_per_epoch(num_examples: int, batch_size: int, accumulation: int, processes: int) -> int:
    """Optimizer steps per epoch (a partial last batch still counts as a micro-batch)."""
    return max(1, math.ceil(math.ceil(num_examples / (batch_size * processes)) / accumulation))
