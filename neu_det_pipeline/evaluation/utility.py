"""Downstream utility: ultralytics YOLO trained on real, real + synthetic and (low-data protocol) oracle data,
each evaluated on the same real test split; plus label consistency of synthetic images under the real model.

Every run lives in the step's folder: `datasets/<dataset>/` (hard links to Step 0 / curated files, so
ultralytics' label caches stay inside it too) and `runs/<dataset>-seed<k>/`, whose `result.json` is written
last: a resumed step reuses every run that has one.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from neu_det_pipeline.config import UtilityConfig
from neu_det_pipeline.io import atomic_write_text, link_or_copy, read_json, write_json
from neu_det_pipeline.yolo import prepare_offline_ultralytics

RESULT_FILE = "result.json"
IOU_MATCH = 0.5


@dataclass(frozen=True)
class TrainImage:
    """One YOLO training image and its label file."""

    name: str
    image: Path
    label: Path


@dataclass(frozen=True)
class Dataset:
    name: str
    """`real`, `real+synthetic-0.5`, `oracle`, ..."""
    train: list[TrainImage]
    n_real: int
    n_synthetic: int


def build_dataset(root: Path, dataset: Dataset, val: list[TrainImage], test: list[TrainImage], classes: list[str]) -> Path:
    """Link the dataset's files under `root/<name>/` with a relocatable data.yaml; returns the data.yaml."""
    folder = root / dataset.name
    for split, images in (("train", dataset.train), ("val", val), ("test", test)):
        for item in images:
            link_or_copy(item.image, folder / "images" / split / f"{item.name}{item.image.suffix}")
            link_or_copy(item.label, folder / "labels" / split / f"{item.name}.txt")
    # No `path:`: ultralytics resolves the splits next to the file.
    data = {"train": "images/train", "val": "images/val", "test": "images/test", "nc": len(classes), "names": dict(enumerate(classes))}
    return atomic_write_text(folder / "data.yaml", yaml.safe_dump(data, sort_keys=False))


def synthetic_subset(names: list[str], n_real: int, ratio: float, seed: int) -> list[str]:
    """`ratio * n_real` curated names (all of them when fewer), from one seeded order: a smaller ratio's
    images are a subset of a larger one's, so runs differ only in how much synthetic data they add."""
    order = sorted(names)
    random.Random(f"{seed}:synthetic-order").shuffle(order)
    return order[: min(len(order), round(ratio * n_real))]


class YoloRunner:
    """Trains and tests YOLO runs with one configuration; finished runs are read back, not retrained."""

    def __init__(self, model: str, config: UtilityConfig, out_dir: Path, device: str) -> None:
        # Absolute: ultralytics puts a relative `project` under its own `runs/` folder, outside the step's output.
        out_dir = out_dir.resolve()
        prepare_offline_ultralytics(out_dir / "ultralytics-settings")
        self.model, self.config, self.out_dir, self.device = model, config, out_dir, device

    def run(self, data_yaml: Path, name: str, seed: int) -> dict[str, Any]:
        """Train on the dataset, test the best weights on its test split; the result dict is also saved."""
        run_dir = self.out_dir / "runs" / name
        if (run_dir / RESULT_FILE).is_file():
            return {**read_json(run_dir / RESULT_FILE), "reused": True}
        from ultralytics import YOLO

        cfg = self.config
        common = {"imgsz": cfg.imgsz, "batch": cfg.batch, "device": self.device, "plots": False, "verbose": False,
                  "workers": cfg.workers, "project": str(run_dir.parent)}
        model = YOLO(self.model)
        model.train(data=str(data_yaml), epochs=cfg.epochs, seed=seed, deterministic=True, name=name, exist_ok=True,
                    **common)
        weights = run_dir / "weights" / "best.pt"
        metrics = YOLO(str(weights)).val(data=str(data_yaml), split="test", name=f"{name}-test", exist_ok=True, **common)
        names = yaml.safe_load(data_yaml.read_text())["names"]
        per_class = {names[int(c)]: round(float(ap), 5) for c, ap in zip(metrics.box.ap_class_index, metrics.box.ap50)}
        result = {"run": name, "seed": seed, "weights": str(weights.relative_to(self.out_dir)),
                  "map50": round(float(metrics.box.map50), 5), "map50_95": round(float(metrics.box.map), 5),
                  "ap50_per_class": per_class}
        write_json(run_dir / RESULT_FILE, result)
        return {**result, "reused": False}

    def predict(self, weights: Path, images: list[Path]) -> list[list[dict[str, Any]]]:
        """Detections per image: [{"label": class id, "conf", "xmin", "ymin", "xmax", "ymax"}] in image pixels."""
        from ultralytics import YOLO

        model = YOLO(str(weights))
        detections = []
        for start in range(0, len(images), self.config.batch):
            batch = [str(p) for p in images[start : start + self.config.batch]]
            for result in model.predict(batch, imgsz=self.config.imgsz, conf=self.config.conf, device=self.device, verbose=False):
                boxes = result.boxes
                detections.append([
                    {"label": int(c), "conf": float(s), "xmin": float(b[0]), "ymin": float(b[1]), "xmax": float(b[2]), "ymax": float(b[3])}
                    for b, c, s in zip(boxes.xyxy.tolist(), boxes.cls.tolist(), boxes.conf.tolist())
                ])
        return detections


def iou(a: dict[str, float], b: dict[str, float]) -> float:
    width = min(a["xmax"], b["xmax"]) - max(a["xmin"], b["xmin"])
    height = min(a["ymax"], b["ymax"]) - max(a["ymin"], b["ymin"])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    area = lambda box: (box["xmax"] - box["xmin"]) * (box["ymax"] - box["ymin"])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def image_consistency(image_class: str, boxes: list[dict[str, Any]], detections: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """Recall of the carried boxes (same class, IoU >= 0.5, each detection matched once) and whether the
    most confident detection has the image's class."""
    unused = sorted(detections, key=lambda d: -d["conf"])
    found = 0
    for box in boxes:
        matches = [d for d in unused if classes[d["label"]] == box["label"] and iou(box, d) >= IOU_MATCH]
        if matches:
            found += 1
            unused.remove(max(matches, key=lambda d: iou(box, d)))
    top = max(detections, key=lambda d: d["conf"], default=None)
    return {
        "recall": found / len(boxes) if boxes else 0.0,
        "agrees": top is not None and classes[top["label"]] == image_class,
        "top": f"{classes[top['label']]} {top['conf']:.2f}" if top else None,
    }


def consistency_by_class(rows: list[dict[str, Any]], checks: dict[str, dict[str, Any]], classes: list[str]) -> dict[str, dict[str, Any]]:
    """Per class (and `all`): images, recall of carried boxes at IoU 0.5, fraction of images whose top detection agrees."""
    out = {}
    for name in [*classes, "all"]:
        chosen = [row for row in rows if name in ("all", row["class"])]
        boxes = sum(len(row["boxes"]) for row in chosen)
        recalled = sum(checks[row["name"]]["recall"] * len(row["boxes"]) for row in chosen)
        out[name] = {
            "images": len(chosen),
            "box_recall": round(recalled / boxes, 4) if boxes else None,
            "class_agreement": round(sum(checks[row["name"]]["agrees"] for row in chosen) / len(chosen), 4) if chosen else None,
        }
    return out


def summarise_runs(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread (population std; 0 for one seed) of a dataset's runs over seeds."""
    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": round(statistics.fmean(values), 5), "std": round(statistics.pstdev(values), 5)}

    return {"seeds": [r["seed"] for r in results], "map50": stats([r["map50"] for r in results]),
            "map50_95": stats([r["map50_95"] for r in results])}


def gain_recovered(real: float, synthetic: float, oracle: float) -> float | None:
    """(mAP real+synthetic - mAP real) / (mAP oracle - mAP real): the share of the held-back real data's value
    the synthetic data buys (None when the oracle does not beat real-only)."""
    return round((synthetic - real) / (oracle - real), 4) if oracle > real else None
