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

Exact resume: an epoch's order and every sample's augmentation depend only on (seed, epoch, index).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import InterpolationMode

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


@dataclass(frozen=True)
class Example:
    image: Path
    mask: Path | None
    """White-on-black defect mask; None: defect-free (all-zero target)."""
    label: int
    origin: str
    """`real`, `synthetic` or `normal`."""


@dataclass
class ClassifierData:
    classes: list[str]
    splits: dict[str, list[Example]]
    """train, val, test."""
    notes: list[str] = field(default_factory=list)
    """Choices worth a line in the summary (e.g. the test split standing in for a missing one)."""

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: dict(Counter(e.origin for e in examples)) for name, examples in self.splits.items()}


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
    if section.own_data is not None:
        data = own_data(section.own_data)
    else:
        data = step0_data(step0_dir, config.data.classes)
    if section.normal_dir is not None:
        add_normal_images(data, section.normal_dir, config)
    if section.synthetic != "none":
        synthetic = synthetic_examples(synthetic_dir, section.synthetic, data.classes)
        if section.synthetic_only:
            data.splits["train"] = synthetic
        else:
            data.splits["train"] += sample_per_class(synthetic, data.splits["train"], section.synthetic_ratio, config.run.seed)
    if not data.splits["train"]:
        raise DataError("the classifier has no training images; check the data source and classifier.synthetic_ratio")
    return data


def step0_data(step0_dir: Path, classes: list[str]) -> ClassifierData:
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
        splits[row["split"]].append(Example(image, mask, classes.index(row["class"]), "real"))
    return ClassifierData(list(classes), splits)


def synthetic_examples(folder: Path, source: str, classes: list[str]) -> list[Example]:
    """Step 4's images (`step4`: `folder` is the Step 4 output) or Step 5's curated ones (`step5`: `folder` is
    the Step 5 output and paths are relative to the sibling Step 4 folder)."""
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


def add_normal_images(data: ClassifierData, folder: Path, config: PipelineConfig) -> None:
    """Binary normal/defect: every defect class becomes `defect`; `folder`'s images are split like `data.split`."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise DataError(f"classifier.normal_dir={folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); set it to a folder of defect-free images")
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


class ClassifierDataset(Dataset):
    """Images in [0, 1] and {0, 1} masks at `image_size`; training keys (index, epoch) get augmented.

    Decoded, resized images are cached (a few hundred MB for NEU-DET at 224 px): epochs after the first
    decode nothing.
    """

    def __init__(self, examples: list[Example], image_size: int, seed: int, augmentation: ClassifierAugmentationConfig | None = None):
        self.examples, self.image_size, self.seed, self.augmentation = examples, image_size, seed, augmentation
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def labels(self) -> list[int]:
        return [e.label for e in self.examples]

    def decoded(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 image [3, S, S] and uint8 mask [1, S, S] (0 / 1)."""
        if index not in self._cache:
            example, size = self.examples[index], (self.image_size, self.image_size)
            image = load_rgb(example.image).resize(size, Image.Resampling.BICUBIC)
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
            if example.mask is None:
                mask = torch.zeros(1, *size, dtype=torch.uint8)
            else:
                gray = load_rgb(example.mask).convert("L").resize(size, Image.Resampling.NEAREST)
                mask = torch.from_numpy((np.asarray(gray) > 127).astype(np.uint8))[None]
            self._cache[index] = (pixels, mask)
        return self._cache[index]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        pixels, mask = self.decoded(index)
        if epoch is not None and self.augmentation is not None:
            rng = random.Random(f"{self.seed}:augment:{epoch}:{index}")
            pixels, mask = augment(pixels, mask, self.augmentation, rng)
        return {
            "pixels": pixels.float() / 255,
            "masks": mask.float(),
            "labels": torch.tensor(self.examples[index].label),
            "index": torch.tensor(index),
        }


def augment(
    pixels: torch.Tensor, mask: torch.Tensor, cfg: ClassifierAugmentationConfig, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same geometric transform on image and mask (flips, quarter turns, small affine); brightness and
    contrast on the image only. Grayscale textures: no hue or colour changes."""
    if cfg.hflip and rng.random() < 0.5:
        pixels, mask = pixels.flip(-1), mask.flip(-1)
    if cfg.vflip and rng.random() < 0.5:
        pixels, mask = pixels.flip(-2), mask.flip(-2)
    if cfg.rot90:
        turns = rng.randrange(4)
        pixels, mask = pixels.rot90(turns, (-2, -1)), mask.rot90(turns, (-2, -1))
    if cfg.max_rotation or cfg.max_translate or cfg.max_scale:
        side = pixels.shape[-1]
        angle = rng.uniform(-cfg.max_rotation, cfg.max_rotation)
        shift = [round(rng.uniform(-cfg.max_translate, cfg.max_translate) * side) for _ in range(2)]
        scale = rng.uniform(1 - cfg.max_scale, 1 + cfg.max_scale)
        # Uncovered corners take the image's mean grey, not black, which would read as a dark defect.
        fill = [float(v) for v in pixels.float().mean(dim=(1, 2)).round()]
        pixels = TF.affine(pixels, angle=angle, translate=shift, scale=scale, shear=[0.0], interpolation=InterpolationMode.BILINEAR, fill=fill)
        mask = TF.affine(mask, angle=angle, translate=shift, scale=scale, shear=[0.0], interpolation=InterpolationMode.NEAREST, fill=[0.0])
    if cfg.brightness:
        pixels = TF.adjust_brightness(pixels, rng.uniform(1 - cfg.brightness, 1 + cfg.brightness))
    if cfg.contrast:
        pixels = TF.adjust_contrast(pixels, rng.uniform(1 - cfg.contrast, 1 + cfg.contrast))
    return pixels.contiguous(), mask.contiguous()


def steps_per_epoch(num_examples: int, batch_size: int, accumulation: int, processes: int) -> int:
    """Optimizer steps per epoch (a partial last batch still counts as a micro-batch)."""
    return max(1, math.ceil(math.ceil(num_examples / (batch_size * processes)) / accumulation))
