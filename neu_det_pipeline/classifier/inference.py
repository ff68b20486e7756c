"""Prediction from a checkpoint (`.pt`) or an ONNX export (`.onnx`), overlays, and the ONNX export itself.

The ONNX file takes `pixels` [batch, 3, S, S] (RGB in [0, 1]; normalisation is inside the model) and gives
`logits`, plus `mask_logits` [batch, 1, S, S] and `attention` [batch, 1, h, w] for multitask models. Its
metadata carries the classes and the input size, so prediction needs nothing but the file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from neu_det_pipeline.classifier.checkpoints import load_classifier
from neu_det_pipeline.classifier.data import load_rgb
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


def predict(model_file: Path, target: Path, out_dir: Path, batch_size: int = 16) -> dict[str, Any]:
    """Overlay PNGs and `predictions.csv` for every readable image; each unreadable one gets one line."""
    predictor = make_predictor(model_file)
    root, files = list_images(target)
    if not files:
        raise PipelineError(f"{target} holds no images ({', '.join(IMAGE_SUFFIXES)})")
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
        size = (predictor.image_size, predictor.image_size)
        pixels = np.stack([np.asarray(image.resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 255 for _, image in batch])
        outputs = predictor(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
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
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["file", "class", *predictor.classes])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "predictions.csv", buffer.getvalue())
    return {"predicted": len(rows), "unreadable": unreadable, "csv": str(out_dir / "predictions.csv")}


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
    meta = {"classes": spec.classes, "image_size": spec.image_size, "multitask": spec.multitask}
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
