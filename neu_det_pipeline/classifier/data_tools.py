"""`neu-det data organize | dummy | check`: build, fake and check the own-data layout `classifier.own_data` reads.

    OUT/images/<file>          every image (defect and defect-free), names unique
    OUT/masks/<stem>.png       one binary mask per defect image (white = defect), at its image's size
    OUT/train_labels.txt       `file,label` lines, label 1 = defect, 0 = defect-free (the seed guide's);
    OUT/val_labels.txt         class names instead of 0/1 work too (e.g. NEU-DET's), each name a class
    [OUT/test_labels.txt]      optional; without it the validation images are also the test set

`organize` copies a folder of defect images (+ a folder of their masks, matched by file stem, `<stem>.*` or
`<stem>_mask.*`) and a folder of defect-free images into it, split per label (stratified, seeded like
`data.split`). Masks are binarised (values above half their maximum: 0/1 and 0/255 masks both work) and resized
to their image with nearest-neighbour sampling. `dummy` writes a small synthetic set (grey steel-like texture;
defects are dark scratches and blobs, their masks exact) for a first run without data. The output folder is
built beside OUT and renamed into place, so OUT is either complete or absent.

`check` lists every problem, one line each: label lines that do not parse, labels other than 0/1 or class names
(or both mixed), files listed twice or in two splits, images that are missing or do not decode, defect images
without a mask (unless masks are not needed: `classifier.mask_source` attention / cam / none), masks that do
not decode, are in colour, or have another aspect ratio than their image (a scaled mask is fine), masks of
defect-free images with defect pixels. Step 6 runs it on `classifier.own_data` before training.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, UnidentifiedImageError

from neu_det_pipeline.classifier.data import NORMAL, OWN_DATA_LABEL_FILES, image_files
from neu_det_pipeline.data.split import stratified_split
from neu_det_pipeline.errors import DataError
from neu_det_pipeline.recipe import console

DEFECT_LABEL, NORMAL_LABEL = "1", "0"
"""The own-data label file's labels (the seed guide's)."""
NORMAL_LABELS = frozenset({NORMAL, NORMAL_LABEL})
"""Class names of defect-free images: the binary normal/defect task's, and own data's `0` (the seed guide's)."""
ASPECT_TOLERANCE = 0.02
"""Relative difference of width/height ratios up to which a mask of another size is taken as a scaled copy."""
DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, ImportError, Image.DecompressionBombError)


# ------------------------------------------------------------------------------------------ layout


def _images_in(folder: Path, option: str) -> list[Path]:
    return image_files(folder, f"{option} {folder}", "pass a folder of images")


def _binary_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    gray = np.asarray(mask.convert("L"), dtype=np.uint8)
    binary = gray > max(int(gray.max()), 1) / 2  # 0/1 and 0/255 masks alike
    return Image.fromarray(binary.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_layout(out: Path, files: dict[str, tuple[bytes, bytes | None, str]], val_fraction: float, test_fraction: float, seed: int) -> dict[str, int]:
    """Write `{file name: (image bytes, mask PNG bytes or None, label)}` as the layout, built in a sibling folder
    and renamed to `out`. Returns the images per split."""
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} already exists and is not empty; pass a new --out folder")
    building = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    try:
        (building / "images").mkdir(parents=True)
        (building / "masks").mkdir()
        for name, (image, mask, _) in files.items():
            (building / "images" / name).write_bytes(image)
            if mask is not None:
                (building / "masks" / f"{Path(name).stem}.png").write_bytes(mask)
        splits = stratified_split({name: label for name, (_, _, label) in files.items()}, (1 - val_fraction - test_fraction, val_fraction, test_fraction), seed)
        for split, names in splits.items():
            if split != "test" or test_fraction > 0:
                lines = "".join(f"{name},{files[name][2]}\n" for name in names)
                (building / OWN_DATA_LABEL_FILES[split]).write_text(lines, encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        building.rename(out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return {split: len(names) for split, names in splits.items()}


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction}: need 0 < val, 0 <= test, val + test < 1")


def _find_mask(masks: dict[str, Path], stem: str) -> Path | None:
    return masks.get(stem) or masks.get(f"{stem}_mask")


def organize(
    defect_images: Path, defect_masks: Path | None, normal_images: Path, out: Path,
    val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0,
) -> dict[str, int]:
    """The own-data layout from a folder of defect images (+ their masks) and a folder of defect-free images."""
    _check_fractions(val_fraction, test_fraction)
    defects, normals = _images_in(defect_images, "--defect-images"), _images_in(normal_images, "--normal-images")
    clashes = sorted({p.name for p in defects} & {p.name for p in normals}) + sorted(
        name for name, count in Counter(p.stem for p in defects + normals).items() if count > 1
    )
    if clashes:
        raise DataError(f"file names must be unique across both folders (masks are matched by stem): {', '.join(clashes[:5])} occur twice; rename them")
    masks = {p.stem: p for p in _images_in(defect_masks, "--defect-masks")} if defect_masks is not None else {}
    missing = [p.name for p in defects if defect_masks is not None and _find_mask(masks, p.stem) is None]
    if missing:
        raise DataError(
            f"{len(missing)} defect image(s) have no mask in {defect_masks} (e.g. {missing[0]}: looked for "
            f"{Path(missing[0]).stem}.* and {Path(missing[0]).stem}_mask.*); add them, or leave out --defect-masks for weak supervision"
        )
    files: dict[str, tuple[bytes, bytes | None, str]] = {}
    for path, label in [(p, DEFECT_LABEL) for p in defects] + [(p, NORMAL_LABEL) for p in normals]:
        try:
            with Image.open(path) as image:
                size = image.size
            mask = None
            if label == DEFECT_LABEL and defect_masks is not None:
                with Image.open(_find_mask(masks, path.stem)) as mask_image:
                    mask = _png(_binary_mask(mask_image, size))
        except DECODE_ERRORS as exc:
            raise DataError(f"{path} (or its mask): unreadable image ({type(exc).__name__}); replace or remove it") from None
        files[path.name] = (path.read_bytes(), mask, label)
    return _write_layout(out, files, val_fraction, test_fraction, seed)


def dummy(out: Path, num_defect: int, num_normal: int, size: int = 128, val_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """A synthetic demo set: grey rolled-steel texture; defect images get dark scratches or blobs and exact masks."""
    if num_defect < 2 or num_normal < 2:
        raise DataError("--num-defect and --num-normal must be at least 2 (one training and one validation image each)")
    _check_fractions(val_fraction, 0.0)
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    files: dict[str, tuple[bytes, bytes | None, str]] = {}
    for index in range(num_defect + num_normal):
        defect = index < num_defect
        # Horizontal rolling streaks plus grain, blurred a little: a plain NEU-DET-like background.
        streaks = noise.normal(0, 6, size=(size, 1)) + noise.normal(0, 10, size=(size, size))
        texture = Image.fromarray(np.clip(128 + streaks, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))
        mask = Image.new("L", (size, size), 0)
        if defect:
            draw, mask_draw = ImageDraw.Draw(texture), ImageDraw.Draw(mask)
            for _ in range(rng.randint(1, 3)):
                x, y = rng.randrange(size // 8, size - size // 4), rng.randrange(size // 8, size - size // 4)
                if rng.random() < 0.5:  # a scratch
                    shape = [(x, y), (x + rng.randrange(size // 8, size // 3), y + rng.randrange(-size // 8, size // 8))]
                    width = rng.randint(2, 4)
                    draw.line(shape, fill=rng.randint(40, 80), width=width)
                    mask_draw.line(shape, fill=255, width=width)
                else:  # a pit or inclusion
                    shape = [x, y, x + rng.randrange(4, size // 6), y + rng.randrange(4, size // 6)]
                    draw.ellipse(shape, fill=rng.randint(30, 70))
                    mask_draw.ellipse(shape, fill=255)
        name = f"{'defect' if defect else 'normal'}_{index:04d}.png"
        files[name] = (_png(texture), _png(mask) if defect else None, DEFECT_LABEL if defect else NORMAL_LABEL)
    return _write_layout(out, files, val_fraction, 0.0, seed)


# ------------------------------------------------------------------------------------------- check


def _decode(path: Path) -> tuple[Image.Image | None, str | None]:
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy(), None
    except DECODE_ERRORS as exc:
        return None, f"does not decode ({type(exc).__name__})"


def _mask_problem(mask: Image.Image, image_size: tuple[int, int], normal: bool) -> str | None:
    if mask.mode not in ("1", "L", "P", "I", "I;16", "LA"):
        channels = np.asarray(mask.convert("RGB"), dtype=np.int16)
        if np.abs(channels[..., 0] - channels[..., 1]).max() or np.abs(channels[..., 1] - channels[..., 2]).max():
            return f"is a colour image ({mask.mode}); masks are binary or grayscale (white = defect)"
    (width, height), (image_width, image_height) = mask.size, image_size
    if abs(width / height - image_width / image_height) > ASPECT_TOLERANCE * image_width / image_height:
        return f"is {width}x{height}, its image {image_width}x{image_height}: another aspect ratio, not a scaled copy"
    if normal and np.asarray(mask.convert("L")).max() > 127:
        return "has defect pixels but its image is labelled defect-free"
    return None


def check_dataset(root: Path, require_masks: bool = True) -> list[str]:
    """Every problem of the own-data layout at `root`, one line each (empty: fine)."""
    images_dir, masks_dir = root / "images", root / "masks"
    problems = [f"{path}: missing" for path in (images_dir, root / OWN_DATA_LABEL_FILES["train"], root / OWN_DATA_LABEL_FILES["val"]) if not path.exists()]
    if require_masks and not masks_dir.is_dir():
        problems.append(f"{masks_dir}: missing (one mask per defect image; or train with classifier.mask_source=attention, cam or none)")
    if problems:
        return problems
    listed: dict[str, str] = {}  # file -> first place it is listed
    rows: list[tuple[str, str, str]] = []  # (where, file, label)
    for split, name in OWN_DATA_LABEL_FILES.items():
        path = root / name
        if not path.is_file():
            continue
        count = 0
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            file, sep, label = (part.strip() for part in line.partition(","))
            if not sep or not file or not label or "," in label:
                problems.append(f"{where}: {line!r} is not a `file,label` line")
                continue
            if file in listed:
                problems.append(f"{where}: {file} is listed twice (also {listed[file]})")
                continue
            listed[file] = where
            rows.append((where, file, label))
            count += 1
        if count == 0 and split != "test":
            problems.append(f"{path}: no images listed")
    labels = {label for _, _, label in rows}
    numeric = {label for label in labels if label.lstrip("+-").replace(".", "", 1).isdigit()}
    if numeric - {"0", "1"}:
        problems.append(f"labels {sorted(numeric - {'0', '1'})}: numeric labels must be 0 (defect-free) or 1 (defect); else use class names")
    elif numeric and labels - numeric:
        problems.append(f"labels mix 0/1 with class names ({sorted(labels - numeric)[:5]}); use one or the other")
    mask_owner: dict[str, str] = {}
    for where, file, label in rows:
        image_path = (images_dir / file).resolve()
        if not image_path.is_relative_to(images_dir.resolve()):
            problems.append(f"{where}: {file} points outside {images_dir}")
            continue
        if not image_path.is_file():
            problems.append(f"{where}: image {images_dir / file} not found")
            continue
        image, error = _decode(image_path)
        if image is None:
            problems.append(f"{image_path}: {error}")
            continue
        mask_path = masks_dir / f"{Path(file).stem}.png"
        if mask_path.name in mask_owner:
            problems.append(f"{mask_path}: shared by {mask_owner[mask_path.name]} and {file} (masks are matched by stem); rename one image")
        mask_owner[mask_path.name] = file
        normal = label in NORMAL_LABELS
        if not mask_path.is_file():
            if require_masks and not normal:
                problems.append(f"{where}: defect image {file} has no mask {mask_path}")
            continue
        mask, error = _decode(mask_path)
        problem = error or _mask_problem(mask, image.size, normal)
        if problem:
            problems.append(f"{mask_path}: {problem}")
    return problems


def require_valid(root: Path, require_masks: bool) -> None:
    """Step 6's gate: one error listing every problem of `classifier.own_data` (the first 20 of them)."""
    problems = check_dataset(root, require_masks)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise DataError(
            f"classifier.own_data={root} has {len(problems)} problem(s); fix them (`neu-det data check {root}` lists them):\n  "
            + "\n  ".join(shown)
        )


# ------------------------------------------------------------------------------------------ command


def data_command(args: argparse.Namespace) -> int:
    if args.data_command == "check":
        problems = check_dataset(args.dir, require_masks=not args.no_masks)
        for problem in problems:
            console.print(problem, highlight=False, soft_wrap=True, markup=False)
        console.print(f"{args.dir}: {len(problems)} problem(s)" if problems else f"{args.dir}: no problems", highlight=False)
        return 1 if problems else 0
    if args.data_command == "organize":
        counts = organize(args.defect_images, args.defect_masks, args.normal_images, args.out, args.val_fraction, args.test_fraction, args.seed)
    else:
        counts = dummy(args.out, args.num_defect, args.num_normal, args.size, seed=args.seed)
    split_text = ", ".join(f"{split} {count}" for split, count in counts.items() if count)
    console.print(f"wrote {args.out} ({split_text}); train with classifier.own_data={args.out}", highlight=False, soft_wrap=True)
    return 0
