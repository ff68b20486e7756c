"""Step 4's files: each synthetic image with its labels, the crash-safe manifest parts, and the final merge.

An image is finished when its PNG, VOC XML, mask and YOLO files are written (each atomically) and then its
row is appended to its process's manifest part. A killed run therefore leaves at most a trailing partial
line, which the next run drops, and images without a row, which it makes again (same seed, same pixels).
Knowing what is done costs one read of the parts and a listing of `images/`.
"""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from neu_det_pipeline.artifacts import MANIFEST_FILE
from neu_det_pipeline.data.export import (
    box_mask,
    write_yolo_data_yaml,
    yolo_label_lines,
)
from neu_det_pipeline.data.neu_det import Box
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.evaluation.report import Tile, labelled_sheet
from neu_det_pipeline.io import (
    FAST_PNG,
    atomic_write_text,
    jsonl_text,
    link_or_copy,
    save_image,
    write_jsonl,
)

PARTS_DIR = "manifest.parts"
SHEET_SOURCES_PER_CLASS = 4
SHEET_TILE = 128


def relative_paths(name: str, image_class: str) -> dict[str, str]:
    """Where an image's files live, relative to the step folder (the layout later steps read)."""
    return {
        "file": f"images/{image_class}/{name}.png",
        "mask": f"masks/{name}.png",
        "label": f"labels/{name}.xml",
        "yolo_image": f"yolo/images/{name}.png",
        "yolo_label": f"yolo/labels/{name}.txt",
    }


def voc_xml(file_name: str, width: int, height: int, channels: int, boxes: Iterable[Box]) -> str:
    """A Pascal VOC annotation in the NEU-DET schema."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "images"
    ET.SubElement(root, "filename").text = file_name
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", channels)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for box in boxes:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = box.label
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bndbox = ET.SubElement(obj, "bndbox")
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            ET.SubElement(bndbox, tag).text = str(round(getattr(box, tag)))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def write_image_files(out_dir: Path, row: dict[str, Any], image: Image.Image, classes: list[str]) -> None:
    """The image and its labels (VOC, mask, YOLO), each written atomically; the manifest row comes after."""
    boxes = [Box(**box) for box in row["boxes"]]
    width, height = image.size
    save_image(image, out_dir / row["file"], **FAST_PNG)
    atomic_write_text(out_dir / row["label"], voc_xml(Path(row["file"]).name, width, height, len(image.getbands()), boxes))
    save_image(box_mask(boxes, width, height), out_dir / row["mask"], **FAST_PNG)
    link_or_copy(out_dir / row["file"], out_dir / row["yolo_image"])
    atomic_write_text(out_dir / row["yolo_label"], yolo_label_lines(boxes, width, height, classes))


class ManifestPart:
    """One process's append-only list of finished rows (`manifest.parts/rank-<N>.jsonl`)."""

    def __init__(self, out_dir: Path, rank: int):
        self.path = out_dir / PARTS_DIR / f"rank-{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)

    def append(self, rows: list[dict[str, Any]]) -> None:
        with self.path.open("a", encoding="utf-8") as file:
            file.write(jsonl_text(rows))
            file.flush()
            os.fsync(file.fileno())


def _drop_partial_last_line(path: Path) -> None:
    """A process killed mid-append leaves a line without its newline; cut it so appends start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as file:
            file.truncate(data.rfind(b"\n") + 1)


def finished_rows(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Name -> row of every image whose row is in the manifest (or a part) and whose PNG exists (a listing, no decoding)."""
    rows: dict[str, dict[str, Any]] = {}
    merged = [out_dir / MANIFEST_FILE] if (out_dir / MANIFEST_FILE).is_file() else []
    parts = sorted((out_dir / PARTS_DIR).glob("rank-*.jsonl")) if (out_dir / PARTS_DIR).is_dir() else []
    for part in merged + parts:
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the cut-off last line of a killed process
            rows[row["name"]] = row
    images_dir = out_dir / "images"
    existing = {f"images/{folder.name}/{file}" for folder in images_dir.iterdir() if folder.is_dir() for file in os.listdir(folder)} if images_dir.is_dir() else set()
    return {name: row for name, row in rows.items() if row["file"] in existing}


def merge_manifest(out_dir: Path, planned: list[str], classes: list[str]) -> list[dict[str, Any]]:
    """`manifest.jsonl` (sorted by name, one row per planned image; the parts are then removed) and `yolo/data.yaml`."""
    rows = finished_rows(out_dir)
    missing = [name for name in planned if name not in rows]
    if missing:
        raise PipelineError(f"{len(missing)} planned images are missing in {out_dir} (e.g. {missing[0]}); re-run the same command to make them")
    ordered = [rows[name] for name in sorted(planned)]
    write_jsonl(out_dir / MANIFEST_FILE, ordered)
    shutil.rmtree(out_dir / PARTS_DIR, ignore_errors=True)  # every row is in the manifest now
    # Synthetic images only, so its validation folder is its training folder (Step 5 mixes them with real splits).
    write_yolo_data_yaml(out_dir / "yolo", classes, {"train": "images", "val": "images"})
    return ordered


def boxes_record(boxes: Iterable[Box]) -> list[dict[str, Any]]:
    return [{key: round(value, 3) if isinstance(value, float) else value for key, value in asdict(box).items()} for box in boxes]


def sheet_source_ids(rows: list[dict[str, Any]]) -> set[str]:
    """The sources shown in the contact sheets: the first few of each class."""
    by_class: dict[str, set[str]] = {}
    for row in rows:
        by_class.setdefault(row["class"], set()).add(row["source"])
    return {source for sources in by_class.values() for source in sorted(sources)[:SHEET_SOURCES_PER_CLASS]}


def contact_sheet(rows: list[dict[str, Any]], out_dir: Path, source_image: dict[str, Path], maps: dict[str, dict[str, Path]]) -> Image.Image:
    """One row per source, labelled with its id: the real image, its control maps, then its synthetic images with their
    boxes (red), each column labelled, each synthetic image's name after the source id (seed index, layout
    augmentation) under it."""
    by_source: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["source"] in source_image:
            by_source.setdefault(row["source"], []).append(row)
    sources = sorted(by_source)
    map_names = sorted({name for source in sources for name in maps.get(source, {})})
    most = max(len(by_source[s]) for s in sources)
    columns = ["real (source)", *(f"{name} map" for name in map_names), *(f"synthetic {i + 1}" for i in range(most))]
    sheet_rows = []
    for source in sources:
        tiles: list[Tile | None] = [Tile(_tile(source_image[source]))]
        tiles += [Tile(_tile(maps[source][name])) if name in maps[source] else None for name in map_names]
        tiles += [Tile(_tile(out_dir / row["file"], row["boxes"]), row["name"].removeprefix(f"{source}-")) for row in by_source[source]]
        sheet_rows.append((source, tiles))
    title = (f"{rows[0]['class']}: each row a real training image, its control maps and the images generated from them "
             "(the source's boxes in red)")
    return labelled_sheet(sheet_rows, columns, title, SHEET_TILE)


def _tile(path: Path, boxes: list[dict[str, Any]] | None = None) -> Image.Image:
    with Image.open(path) as image:
        sx, sy = SHEET_TILE / image.width, SHEET_TILE / image.height  # the tile is square whatever the image
        tile = image.convert("RGB").resize((SHEET_TILE, SHEET_TILE), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(tile)
    for box in boxes or []:
        draw.rectangle([box["xmin"] * sx, box["ymin"] * sy, box["xmax"] * sx - 1, box["ymax"] * sy - 1], outline="red")
    return tile


def save_contact_sheets(out_dir: Path, rows: list[dict[str, Any]], source_image: dict[str, Path], maps: dict[str, dict[str, Path]]) -> list[str]:
    """`contact_sheets/<class>.png` per class; returns their paths relative to `out_dir`."""
    by_class: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_class.setdefault(row["class"], []).append(row)
    written = []
    for image_class, class_rows in sorted(by_class.items()):
        sheet = contact_sheet(class_rows, out_dir, source_image, maps)
        path = save_image(sheet, out_dir / "contact_sheets" / f"{image_class}.png", **FAST_PNG)
        written.append(path.relative_to(out_dir).as_posix())
    return written
