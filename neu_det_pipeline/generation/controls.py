"""Control maps for ControlNet: detectors, a content-addressed cache, and layout augmentation.

Detectors come from controlnet_aux (HED, PiDiNet, MiDaS, NormalBae with the weights of `models.annotators`,
Canny with none) or from transformers (`depth_anything`: the depth model of `models.depth`). Each turns an
RGB image into a 3-channel map of `resolution` x `resolution`.

Maps are cached as PNG files under `<cache>/<detector>-<resolution>-<weights>/<image sha256>.png`: the key is
the content of the source image, the detector and its weights, and the resolution, so later runs and other
experiments pointed at the same folder reuse them.
"""

from __future__ import annotations

import hashlib
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from neu_det_pipeline.config import ModelsConfig
from neu_det_pipeline.data.neu_det import Box
from neu_det_pipeline.io import FAST_PNG, save_image
from neu_det_pipeline.models import load_model

Detect = Callable[[Image.Image, int], Image.Image]
"""(RGB image, resolution) -> RGB control map of resolution x resolution."""

CANNY_THRESHOLDS = (100, 200)
"""controlnet_aux's defaults, the thresholds the SD 1.5 canny ControlNet was trained with."""


# ------------------------------------------------------------------------------------- detectors


def controlnet_aux_modules() -> types.ModuleType:
    """`controlnet_aux`, imported without the warnings its import prints when nothing is wrong."""
    with warnings.catch_warnings():
        # controlnet_aux imports every annotator, and timm warns about each one's deprecated registrations.
        warnings.simplefilter("ignore")
        import controlnet_aux
        import controlnet_aux.pidi
    return controlnet_aux


def _annotator(name: str, source: str) -> object:
    """A controlnet_aux detector loaded by its own `from_pretrained` (hub repo or a folder with the same files)."""
    aux = controlnet_aux_modules()
    loaders = {
        "hed": aux.HEDdetector.from_pretrained,
        "pidinet": aux.PidiNetDetector.from_pretrained,
        "normalbae": aux.NormalBaeDetector.from_pretrained,
        "midas": aux.MidasDetector.from_pretrained,
    }
    return load_model("models.annotators", source, lambda: loaders[name](source))


def annotator_detect(annotator: object, device: torch.device) -> Detect:
    """Wrap a controlnet_aux detector object (any of HED, PiDiNet, MiDaS, NormalBae, Canny) as a `Detect`."""
    if hasattr(annotator, "to"):
        annotator.to(device)

    def detect(image: Image.Image, resolution: int) -> Image.Image:
        kwargs = {"detect_resolution": resolution, "image_resolution": resolution, "output_type": "pil"}
        if type(annotator).__name__ == "CannyDetector":
            kwargs.update(low_threshold=CANNY_THRESHOLDS[0], high_threshold=CANNY_THRESHOLDS[1])
        with torch.no_grad():
            made = annotator(np.asarray(image.convert("RGB")), **kwargs)
        return _square_rgb(made, resolution)

    return detect


def depth_anything_detect(model_id: str, device: torch.device) -> Detect:
    """Depth from a transformers depth estimator (Depth Anything V2 by default), min-max scaled to 0-255."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    def load() -> tuple:
        return AutoImageProcessor.from_pretrained(model_id), AutoModelForDepthEstimation.from_pretrained(model_id)

    processor, model = load_model("models.depth", model_id, load)
    model.to(device).eval()

    def detect(image: Image.Image, resolution: int) -> Image.Image:
        inputs = processor(images=image.convert("RGB"), return_tensors="pt").to(device)
        with torch.no_grad():
            depth = model(**inputs).predicted_depth[:, None].float()
        depth = torch.nn.functional.interpolate(depth, size=(resolution, resolution), mode="bicubic")[0, 0]
        low, high = depth.min(), depth.max()
        scaled = (depth - low) / (high - low) if high > low else torch.zeros_like(depth)
        gray = (scaled.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return Image.fromarray(gray, mode="L").convert("RGB")

    return detect


def load_detector(name: str, models: ModelsConfig, device: torch.device) -> Detect:
    """The detector `generation.detectors` names, loaded with its weights; a failed load is one error line."""
    if name == "depth_anything":
        return depth_anything_detect(models.depth, device)
    if name == "canny":
        return annotator_detect(controlnet_aux_modules().CannyDetector(), device)
    return annotator_detect(_annotator(name, models.annotators), device)


def detector_key(name: str, models: ModelsConfig, resolution: int) -> str:
    """Cache folder name: detector, resolution and which weights (maps of random test weights never mix with real ones)."""
    source = {"depth_anything": models.depth, "canny": "no-weights"}.get(name, models.annotators)
    return f"{name}-{resolution}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"


def _square_rgb(image: Image.Image | np.ndarray, resolution: int) -> Image.Image:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BILINEAR)
    return image


# ----------------------------------------------------------------------------------------- cache


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class ControlMapCache:
    """Control maps on disk, one PNG per (image content, detector + weights, resolution)."""

    root: Path

    def path(self, image_sha256: str, key: str) -> Path:
        return self.root / key / f"{image_sha256}.png"

    def get(self, image_path: Path, image_sha256: str, key: str, detect: Callable[[], Detect], resolution: int) -> tuple[Image.Image, bool]:
        """The map of `image_path` (cached, or made and cached); True when it was made now.

        `detect` is a factory, so a run whose maps are all cached never loads a detector.
        """
        def source() -> Image.Image:
            with Image.open(image_path) as image:
                return image.convert("RGB")

        return self._cached_or_made(self.path(image_sha256, key), source, detect, resolution)

    def get_for_pixels(self, image: Image.Image, key: str, detect: Callable[[], Detect], resolution: int) -> tuple[Image.Image, bool]:
        """The map of an image made in memory (a transplanted layout), keyed by the sha256 of its RGB pixels."""
        rgb = image.convert("RGB")
        digest = hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()
        return self._cached_or_made(self.path(digest, key), lambda: rgb, detect, resolution)

    @staticmethod
    def _cached_or_made(path: Path, source: Callable[[], Image.Image], detect: Callable[[], Detect], resolution: int) -> tuple[Image.Image, bool]:
        if path.is_file():
            with Image.open(path) as cached:
                return cached.convert("RGB"), False
        made = detect()(source(), resolution)
        save_image(made, path, **FAST_PNG)
        return made, True


# ---------------------------------------------------------------------------------- augmentation

AUGMENTATIONS: dict[str, Image.Transpose | None] = {
    "none": None,
    "hflip": Image.Transpose.FLIP_LEFT_RIGHT,
    "vflip": Image.Transpose.FLIP_TOP_BOTTOM,
    "rot90": Image.Transpose.ROTATE_90,  # counter-clockwise, as PIL and np.rot90 turn
    "rot180": Image.Transpose.ROTATE_180,
    "rot270": Image.Transpose.ROTATE_270,
}


def augment_image(image: Image.Image, augmentation: str) -> Image.Image:
    transpose = AUGMENTATIONS[augmentation]
    return image if transpose is None else image.transpose(transpose)


def augmented_size(width: int, height: int, augmentation: str) -> tuple[int, int]:
    return (height, width) if augmentation in ("rot90", "rot270") else (width, height)


def augment_box(box: Box, width: int, height: int, augmentation: str) -> Box:
    """`box` in a `width` x `height` image, moved as `augment_image` moves the pixels under it."""
    x0, y0, x1, y1 = box.xmin, box.ymin, box.xmax, box.ymax
    moved = {
        "none": (x0, y0, x1, y1),
        "hflip": (width - x1, y0, width - x0, y1),
        "vflip": (x0, height - y1, x1, height - y0),
        # Counter-clockwise: the pixel at (x, y) lands at (y, width - x).
        "rot90": (y0, width - x1, y1, width - x0),
        "rot180": (width - x1, height - y1, width - x0, height - y0),
        # Clockwise: the pixel at (x, y) lands at (height - y, x).
        "rot270": (height - y1, x0, height - y0, x1),
    }[augmentation]
    return Box(box.label, *moved)


def scale_box(box: Box, sx: float, sy: float) -> Box:
    return Box(box.label, box.xmin * sx, box.ymin * sy, box.xmax * sx, box.ymax * sy)
