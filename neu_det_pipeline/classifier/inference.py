"""Prediction from a checkpoint (`.pt`) or an ONNX export (`.onnx`), overlays, and the ONNX export itself.

The ONNX file takes `pixels` [batch, 3, S, S] (RGB in [0, 1]; normalisation is inside the model) and gives
`logits`, plus `mask_logits` [batch, 1, S, S] and `attention` [batch, 1, h, w] for multitask models. Its
metadata carries the classes, the input size and the input mode, so prediction needs nothing but the file.

A model trained on box crops (`classifier.input=box_crops`) classifies boxes: `predict(..., boxes=LABEL_DIR)` reads
each image's boxes from `LABEL_DIR/<stem>.xml` (Pascal VOC) or `LABEL_DIR/<stem>.txt` (YOLO, `class xc yc w h
[confidence]`, normalised; the class is ignored), e.g. a detector's output, crops each with the evaluation margin
and writes one row per box.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from neu_det_pipeline.classifier.checkpoints import load_classifier
from neu_det_pipeline.classifier.data import crop_box, evaluation_margins, load_rgb
from neu_det_pipeline.classifier.model import AttentionGuidedClassifier
from neu_det_pipeline.data.neu_det import IMAGE_SUFFIXES
from neu_det_pipeline.errors import DataError, PipelineError
from neu_det_pipeline.io import atomic_write_bytes, atomic_write_text, save_image
from neu_det_pipeline.recipe import console

ONNX_INPUT = "pixels"
ONNX_OUTPUTS = ("logits", "mask_logits", "attention")
ONNX_METADATA_KEY = "neu_det_classifier"
OPSET = 18
PARITY_TOLERANCE = 1e-3
RESULTS_SUMMARY = "results_summary.txt"
PANEL = 256  # overlay panel side in pixels
MASK_COLOUR = np.array([255, 40, 40], dtype=np.float32)


@dataclass
class Outputs:
    probabilities: np.ndarray
    """[B, classes]."""
    masks: np.ndarray | None
    """[B, S, S] defect probability at the input size."""
    attention: np.ndarray | None
    """[B, h, w] attention weights on the feature grid."""


class _ExportModule(nn.Module):
    """The classifier with tuple outputs (ONNX has no optional outputs)."""

    def __init__(self, model: AttentionGuidedClassifier):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixels)
        return (out.logits,) if out.mask_logits is None else (out.logits, out.mask_logits, out.attention)


class TorchPredictor:
    def __init__(self, checkpoint: Path, device: torch.device = torch.device("cpu")):
        self.model, _ = load_classifier(checkpoint)
        self.model.to(device)
        self.device = device
        self.classes, self.image_size = self.model.spec.classes, self.model.spec.image_size
        self.input, self.crop_margin = self.model.spec.input, self.model.spec.crop_margin

    @torch.no_grad()
    def __call__(self, pixels: np.ndarray) -> Outputs:
        out = self.model(torch.from_numpy(pixels).to(self.device))
        masks = out.mask_logits.sigmoid()[:, 0].cpu().numpy() if out.mask_logits is not None else None
        attention = out.attention[:, 0].cpu().numpy() if out.attention is not None else None
        return Outputs(out.logits.softmax(1).cpu().numpy(), masks, attention)


class OnnxPredictor:
    def __init__(self, path: Path):
        import onnxruntime

        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            meta = json.loads(self.session.get_modelmeta().custom_metadata_map[ONNX_METADATA_KEY])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable or foreign files
            raise PipelineError(
                f"{path} is not an ONNX classifier exported by `neu-det export-onnx` ({type(exc).__name__}); re-export it"
            ) from None
        self.classes, self.image_size = meta["classes"], meta["image_size"]
        self.input, self.crop_margin = meta.get("input", "image"), meta.get("crop_margin", 0.1)  # older exports: images

    def __call__(self, pixels: np.ndarray) -> Outputs:
        outputs = self.session.run(None, {ONNX_INPUT: pixels})
        logits = torch.from_numpy(outputs[0])
        if len(outputs) == 1:
            return Outputs(logits.softmax(1).numpy(), None, None)
        masks = torch.from_numpy(outputs[1]).sigmoid()[:, 0].numpy()
        return Outputs(logits.softmax(1).numpy(), masks, outputs[2][:, 0])


def make_predictor(model_file: Path) -> TorchPredictor | OnnxPredictor:
    return OnnxPredictor(model_file) if model_file.suffix.lower() == ".onnx" else TorchPredictor(model_file)


# ----------------------------------------------------------------------------------------- predict


def list_images(target: Path) -> tuple[Path, list[Path]]:
    """(folder the CSV paths are relative to, images): a single file, or every image under a folder."""
    if target.is_file():
        return target.parent, [target]
    if target.is_dir():
        return target, sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    raise PipelineError(f"{target} does not exist; pass an image file or a folder of images")


def predict(model_file: Path, target: Path, out_dir: Path, batch_size: int = 16, boxes: Path | None = None) -> dict[str, Any]:
    """Overlay PNGs, `predictions.csv` (every class's probability) and `results_summary.txt` (file, class,
    probability) for every readable image (every box with `boxes`); each unreadable image gets one line."""
    predictor = make_predictor(model_file)
    if (boxes is not None) != (predictor.input == "box_crops"):
        raise PipelineError(
            f"{model_file} was trained on box crops (classifier.input=box_crops); pass --boxes LABEL_DIR with VOC XML or YOLO label files"
            if boxes is None else
            f"--boxes needs a model trained with classifier.input=box_crops; {model_file} classifies whole images (drop --boxes)"
        )
    root, files = list_images(target)
    if not files:
        raise PipelineError(f"{target} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if boxes is not None:
        return predict_boxes(predictor, root, files, boxes, out_dir, batch_size)
    rows, unreadable = [], []
    for start in range(0, len(files), batch_size):
        batch: list[tuple[Path, Image.Image]] = []
        for path in files[start : start + batch_size]:
            try:
                batch.append((path, load_rgb(path)))
            except DataError as exc:
                unreadable.append(str(path))
                console.print(f"[yellow]skipped:[/] {exc}", highlight=False, soft_wrap=True)
        if not batch:
            continue
        outputs = predictor(_network_input([image for _, image in batch], predictor.image_size))
        for i, (path, image) in enumerate(batch):
            name = path.relative_to(root).as_posix()
            probabilities = outputs.probabilities[i]
            label = predictor.classes[int(probabilities.argmax())]
            rows.append({"file": name, "class": label, **{c: f"{p:.6f}" for c, p in zip(predictor.classes, probabilities)}})
            overlay = render_overlay(
                image, label, float(probabilities.max()),
                None if outputs.masks is None else outputs.masks[i], None if outputs.attention is None else outputs.attention[i],
            )
            save_image(overlay, out_dir / "overlays" / f"{name.replace('/', '__').rsplit('.', 1)[0]}.png")
    return _write_predictions(rows, ["file", "class", *predictor.classes], out_dir, "image(s)", unreadable, [])


def _network_input(images: list[Image.Image], size: int) -> np.ndarray:
    """RGB images resized (bicubic) to `size` px, as one contiguous float32 NCHW batch in [0, 1]."""
    pixels = np.stack([np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255 for image in images])
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


def _write_predictions(rows: list[dict[str, str]], fieldnames: list[str], out_dir: Path, unit: str, unreadable: list[str],
                       without_boxes: list[str]) -> dict[str, Any]:
    """`predictions.csv` and `results_summary.txt` from the rows; what `predict` returns."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "predictions.csv", buffer.getvalue())
    write_results_summary(rows, out_dir / RESULTS_SUMMARY)
    return {"predicted": len(rows), "unit": unit, "unreadable": unreadable, "without_boxes": without_boxes, "csv": str(out_dir / "predictions.csv")}


PixelBox = tuple[float, float, float, float]
BOX_COLUMNS = ["file", "xmin", "ymin", "xmax", "ymax", "class", "probability"]


def label_file(boxes_dir: Path, relative: Path) -> Path | None:
    """`<stem>.xml` or `<stem>.txt` beside the image's relative folder in `boxes_dir`, else directly in it (XML first)."""
    for folder in dict.fromkeys((boxes_dir / relative.parent, boxes_dir)):
        for suffix in (".xml", ".txt"):
            candidate = folder / f"{relative.stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def read_boxes(path: Path, width: int, height: int) -> list[PixelBox]:
    """Pixel boxes (xmin, ymin, xmax, ymax) clipped to the image, from a VOC XML or a YOLO label file; empty boxes
    (after clipping) are dropped. A malformed file raises one line naming it."""
    raw: list[PixelBox] = []
    if path.suffix == ".xml":
        try:
            objects = ET.parse(path).findall("object")
            raw = [tuple(float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")) for obj in objects]  # type: ignore[misc,union-attr,arg-type]
        except (ET.ParseError, AttributeError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: not a Pascal VOC file with numeric <bndbox> xmin/ymin/xmax/ymax ({type(exc).__name__}); fix or remove it") from None
    else:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) not in (5, 6):
                    raise ValueError
                xc, yc, w, h = (float(v) for v in fields[1:5])
            except ValueError:
                raise DataError(f"{path} line {number}: {line!r} is not a YOLO line `class x_center y_center width height [confidence]`") from None
            raw.append(((xc - w / 2) * width, (yc - h / 2) * height, (xc + w / 2) * width, (yc + h / 2) * height))
    clipped = [(max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)) for x0, y0, x1, y1 in raw]
    return [box for box in clipped if box[2] > box[0] and box[3] > box[1]]


def predict_boxes(predictor, root: Path, files: list[Path], boxes_dir: Path, out_dir: Path, batch_size: int) -> dict[str, Any]:
    """One `predictions.csv` row per box (file, box in pixels, class, probability, per-class probabilities) and an
    overlay per image with its boxes labelled; images without a label file are counted, not classified."""
    if not boxes_dir.is_dir():
        raise PipelineError(f"--boxes {boxes_dir} is not a folder; pass the folder of VOC XML or YOLO label files")
    margins = evaluation_margins(predictor.crop_margin)
    rows, unreadable, without_boxes = [], [], []
    for path in files:
        relative = path.relative_to(root)
        labels = label_file(boxes_dir, relative)
        if labels is None:
            without_boxes.append(relative.as_posix())
            continue
        try:
            image = load_rgb(path)
        except DataError as exc:
            unreadable.append(str(path))
            console.print(f"[yellow]skipped:[/] {exc}", highlight=False, soft_wrap=True)
            continue
        width, height = image.size
        image_rows = []
        found = read_boxes(labels, width, height)
        for start in range(0, len(found), batch_size):
            chunk = found[start : start + batch_size]
            crops = [crop_box(image, (x0 / width, y0 / height, x1 / width, y1 / height), margins) for x0, y0, x1, y1 in chunk]
            probabilities = predictor(_network_input(crops, predictor.image_size)).probabilities
            for box, p in zip(chunk, probabilities):
                image_rows.append({
                    "file": relative.as_posix(), **{k: f"{v:.1f}" for k, v in zip(BOX_COLUMNS[1:5], box)},
                    "class": predictor.classes[int(p.argmax())], "probability": f"{p.max():.6f}",
                    **{c: f"{v:.6f}" for c, v in zip(predictor.classes, p)},
                })
        rows += image_rows
        overlay = render_box_overlay(image, [(tuple(float(r[k]) for k in BOX_COLUMNS[1:5]), r["class"], float(r["probability"])) for r in image_rows])
        save_image(overlay, out_dir / "overlays" / f"{relative.as_posix().replace('/', '__').rsplit('.', 1)[0]}.png")
    return _write_predictions(rows, [*BOX_COLUMNS, *predictor.classes], out_dir, "box(es)", unreadable, without_boxes)


def render_box_overlay(image: Image.Image, boxes: list[tuple[PixelBox, str, float]]) -> Image.Image:
    """The image with each box outlined and labelled with its class and probability."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for (x0, y0, x1, y1), label, probability in boxes:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=tuple(int(v) for v in MASK_COLOUR), width=2)
        draw.text((x0 + 3, y0 + 2), f"{label} {probability:.2f}", fill="yellow")
    return canvas


def write_results_summary(rows: list[dict[str, str]], path: Path) -> Path:
    """`results_summary.txt`: one line per image, `file<TAB>class<TAB>probability` (of the predicted class); with
    `--boxes` one line per box, `file<TAB>xmin,ymin,xmax,ymax<TAB>class<TAB>probability`."""
    def where(row: dict[str, str]) -> str:
        return f"{row['file']}\t{','.join(row[k] for k in BOX_COLUMNS[1:5])}" if "xmin" in row else row["file"]

    return atomic_write_text(path, "".join(f"{where(row)}\t{row['class']}\t{float(row[row['class']]):.4f}\n" for row in rows))


def render_overlay(image: Image.Image, label: str, probability: float, mask: np.ndarray | None, attention: np.ndarray | None) -> Image.Image:
    """Panels: the image, the predicted mask in red over it, the attention map over it; class and probability on top."""
    base = image.convert("RGB").resize((PANEL, PANEL), Image.Resampling.BICUBIC)
    panels = [base]
    if mask is not None:
        mask_image = Image.fromarray((mask * 255).astype(np.uint8), mode="L").resize((PANEL, PANEL), Image.Resampling.BILINEAR)
        weight = (np.asarray(mask_image, dtype=np.float32) / 255 > 0.5)[..., None] * 0.45
        blended = np.asarray(base, dtype=np.float32) * (1 - weight) + MASK_COLOUR * weight
        panels.append(Image.fromarray(blended.astype(np.uint8)))
    if attention is not None:
        from matplotlib import colormaps

        scaled = (attention - attention.min()) / max(float(np.ptp(attention)), 1e-6)
        heat = Image.fromarray((scaled * 255).astype(np.uint8), mode="L").resize((PANEL, PANEL), Image.Resampling.BILINEAR)
        coloured = colormaps["inferno"](np.asarray(heat, dtype=np.float32) / 255)[..., :3] * 255
        panels.append(Image.fromarray((0.5 * coloured + 0.5 * np.asarray(base, dtype=np.float32)).astype(np.uint8)))
    header = 24
    canvas = Image.new("RGB", (PANEL * len(panels), PANEL + header), "white")
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * PANEL, header))
    draw = ImageDraw.Draw(canvas)
    titles = ["image", "predicted mask", "attention"][: len(panels)]
    for i, title in enumerate(titles):
        draw.text((i * PANEL + 4, 6), title if i else f"{label}  p={probability:.3f}", fill="black")
    return canvas


# ------------------------------------------------------------------------------------------ export


def export_onnx(checkpoint: Path, out: Path) -> dict[str, Any]:
    """Export with a dynamic batch axis, then compare onnxruntime with torch on a batch of 3 (another size
    than the export example, so the dynamic axis is exercised). Raises when they disagree."""
    import onnx
    import onnxruntime

    model, _ = load_classifier(checkpoint)
    spec = model.spec
    wrapper = _ExportModule(model).eval()
    # The exporter's graph optimiser warns once per multi-output op it leaves unfolded (timm ViTs): not a problem.
    logging.getLogger("onnxscript.optimizer._constant_folding").setLevel(logging.ERROR)
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, 3, spec.image_size, spec.image_size, generator=generator)
    names = list(ONNX_OUTPUTS[: 3 if spec.multitask else 1])
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(
            wrapper, (example,), raw, input_names=[ONNX_INPUT], output_names=names, opset_version=OPSET,
            dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1, max=4096)}}, external_data=False, verbose=False,
        )
        proto = onnx.load(raw)
    meta = {"classes": spec.classes, "image_size": spec.image_size, "multitask": spec.multitask, "input": spec.input, "crop_margin": spec.crop_margin}
    onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: json.dumps(meta)})
    data = proto.SerializeToString()

    check = torch.rand(3, 3, spec.image_size, spec.image_size, generator=generator)
    with torch.no_grad():
        expected = wrapper(check)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {ONNX_INPUT: check.numpy()})
    differences = {name: float(np.abs(g - e.numpy()).max()) for name, g, e in zip(names, got, expected)}
    worst = max(differences.values())
    if worst > PARITY_TOLERANCE:
        raise PipelineError(f"ONNX export of {checkpoint} disagrees with torch (max abs difference {worst:.2e}); {out} not written")
    atomic_write_bytes(out, data)
    return {"onnx": str(out), "outputs": names, "max_abs_difference": differences, "opset": OPSET}
