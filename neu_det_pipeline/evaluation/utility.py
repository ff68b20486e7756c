"""Downstream utility: ultralytics YOLO trained on real, real + synthetic, the control arms (real + classical
augmentation, real + copy-paste) and (low-data protocol) oracle data, each evaluated on the same real test split;
plus label consistency of synthetic images under the real model.

Every run lives in the step's folder: `datasets/<dataset>/` (hard links to Step 0 / curated files, so
ultralytics' label caches stay inside it too) and `runs/<dataset>-seed<k>/`, whose `result.json` is written
last: a resumed step reuses every run that has one.

Fair protocol. Under `budget: iterations` every run trains the same number of batches whatever its dataset
size: ultralytics counts epochs, so a run gets the whole number of epochs closest to the budget
(`epochs_for_budget`; at most half an epoch's batches off, the batches trained are recorded). ultralytics
accumulates gradients to a nominal batch of 64, so equal batches at one batch size are equal optimizer steps.
Comparisons with `real` are paired over the test images: each run's test-split detections are saved, every
detection is matched once to the ground truth of its own image (IoU >= 0.5, most confident first), and a
bootstrap resample of the test images re-weights those fixed matches, so AP50 of every run is recomputed on the
same resample (`paired_bootstrap`); the interval is the 2.5-97.5 percentile range of the difference of
mean-over-runs mAP50. AP is ultralytics' 101-point interpolation of the precision envelope.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from neu_det_pipeline.config import UtilityConfig
from neu_det_pipeline.data.export import boxes_from_yolo
from neu_det_pipeline.evaluation.control_arms import ARM_FOLDERS
from neu_det_pipeline.io import atomic_write_text, link_or_copy, read_json, write_json
from neu_det_pipeline.yolo import prepare_offline_ultralytics

RESULT_FILE = "result.json"
PREDICTIONS_FILE = "test_predictions.json"
IOU_MATCH = 0.5
EVAL_CONF = 0.001
"""Confidence floor of the saved test detections (ultralytics' validation default: the whole PR curve)."""


@dataclass(frozen=True)
class TrainImage:
    """One YOLO training image and its label file."""

    name: str
    image: Path
    label: Path


@dataclass(frozen=True)
class Dataset:
    name: str
    """`real`, `real+synthetic-0.5`, `real+classical-0.5`, `oracle`, ... (`-g<seed>` per generation seed)."""
    train: list[TrainImage]
    n_real: int
    n_synthetic: int
    """Added (synthetic or control-arm) images."""


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


def replace_subset(real: list[TrainImage], added: list[TrainImage], seed: int) -> list[TrainImage]:
    """`mode: replace`: the added images take the place of as many real ones (a seeded choice; all of them at
    most), so the training set keeps the real-only size when there are enough added images."""
    keep = sorted(real, key=lambda item: item.name)
    random.Random(f"{seed}:replace").shuffle(keep)
    return keep[: max(len(real) - len(added), 0)] + added[: len(real)]


def batches_per_epoch(n_images: int, batch: int) -> int:
    """ultralytics' training loader keeps the last partial batch."""
    return math.ceil(n_images / batch)


def epochs_for_budget(n_images: int, config: UtilityConfig, n_real: int) -> int:
    """Epochs of a run on `n_images` images: `epochs`, or under `budget: iterations` the whole number of epochs
    (at least 1) whose batches come closest to the iteration budget (default: the real-only set's `epochs`)."""
    if config.budget == "epochs":
        return config.epochs
    iterations = config.iterations or config.epochs * batches_per_epoch(n_real, config.batch)
    return max(1, round(iterations / batches_per_epoch(n_images, config.batch)))


class YoloRunner:
    """Trains and tests YOLO runs with one configuration; finished runs are read back, not retrained."""

    def __init__(self, model: str, config: UtilityConfig, out_dir: Path, device: str) -> None:
        # Absolute: ultralytics puts a relative `project` under its own `runs/` folder, outside the step's output.
        out_dir = out_dir.resolve()
        prepare_offline_ultralytics(out_dir / "ultralytics-settings")
        self.model, self.config, self.out_dir, self.device = model, config, out_dir, device

    def run(self, data_yaml: Path, name: str, seed: int, epochs: int | None = None) -> dict[str, Any]:
        """Train on the dataset (`epochs`, default `config.epochs`), test the best weights on its test split and
        save their test detections; the result dict is also saved."""
        run_dir = self.out_dir / "runs" / name
        if (run_dir / RESULT_FILE).is_file() and (run_dir / PREDICTIONS_FILE).is_file():  # runs saved before predictions were: redo
            return {**read_json(run_dir / RESULT_FILE), "reused": True}
        from ultralytics import YOLO

        cfg = self.config
        epochs = epochs or cfg.epochs
        common = {"imgsz": cfg.imgsz, "batch": cfg.batch, "device": self.device, "plots": False, "verbose": False,
                  "workers": cfg.workers, "project": str(run_dir.parent)}
        model = YOLO(self.model)
        model.train(data=str(data_yaml), epochs=epochs, seed=seed, deterministic=True, name=name, exist_ok=True,
                    **common)
        weights = run_dir / "weights" / "best.pt"
        metrics = YOLO(str(weights)).val(data=str(data_yaml), split="test", name=f"{name}-test", exist_ok=True, **common)
        names = yaml.safe_load(data_yaml.read_text())["names"]
        per_class = {names[int(c)]: round(float(ap), 5) for c, ap in zip(metrics.box.ap_class_index, metrics.box.ap50)}
        test_images = sorted((data_yaml.parent / "images" / "test").iterdir())
        detections = self.predict(weights, test_images, EVAL_CONF)
        write_json(run_dir / PREDICTIONS_FILE, {"images": [p.stem for p in test_images], "detections": detections})
        n_train = len(list((data_yaml.parent / "images" / "train").iterdir()))
        result = {"run": name, "seed": seed, "weights": str(weights.relative_to(self.out_dir)),
                  "predictions": str((run_dir / PREDICTIONS_FILE).relative_to(self.out_dir)),
                  "epochs": epochs, "batches": epochs * batches_per_epoch(n_train, cfg.batch),
                  "map50": round(float(metrics.box.map50), 5), "map50_95": round(float(metrics.box.map), 5),
                  "ap50_per_class": per_class}
        write_json(run_dir / RESULT_FILE, result)
        return {**result, "reused": False}

    def predict(self, weights: Path, images: list[Path], conf: float | None = None) -> list[list[dict[str, Any]]]:
        """Detections per image (confidence >= `conf`, default `config.conf`): [{"label": class id, "conf",
        "xmin", "ymin", "xmax", "ymax"}] in image pixels."""
        from ultralytics import YOLO

        model = YOLO(str(weights))
        detections = []
        for start in range(0, len(images), self.config.batch):
            batch = [str(p) for p in images[start : start + self.config.batch]]
            for result in model.predict(batch, imgsz=self.config.imgsz, conf=conf or self.config.conf, device=self.device, verbose=False):
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
    """Mean and spread (population std; 0 for one run) of an arm's runs over training (and generation) seeds,
    with the mean AP50 of each class (over the runs that saw it in the test split)."""
    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": round(statistics.fmean(values), 5), "std": round(statistics.pstdev(values), 5)}

    per_class: dict[str, list[float]] = {}
    for result in results:
        for name, ap in result["ap50_per_class"].items():
            per_class.setdefault(name, []).append(ap)
    return {"seeds": [r["seed"] for r in results], "runs": len(results), "map50": stats([r["map50"] for r in results]),
            "map50_95": stats([r["map50_95"] for r in results]), "batches": max(r.get("batches", 0) for r in results),
            "ap50_per_class": {name: round(statistics.fmean(values), 5) for name, values in sorted(per_class.items())}}


# ------------------------------------------------------------------------------------------ paired bootstrap


@dataclass(frozen=True)
class MatchedDetections:
    """One run's test detections, each matched once within its own image: what every resample re-weights."""

    image: np.ndarray
    """Test-image index of each detection (all arrays sorted by falling confidence)."""
    label: np.ndarray
    conf: np.ndarray
    true_positive: np.ndarray
    gt_counts: np.ndarray
    """(test images, classes): ground-truth boxes of each class in each image."""


def test_ground_truth(data_yaml: Path, names: list[str], classes: list[str]) -> list[list[dict[str, Any]]]:
    """Boxes (pixels) of the dataset's test images `names` (stems), from their YOLO labels and image sizes."""
    folder = data_yaml.parent
    out = []
    for name in names:
        image = next((folder / "images" / "test").glob(f"{name}.*"))
        with Image.open(image) as opened:
            width, height = opened.size
        label = folder / "labels" / "test" / f"{name}.txt"
        boxes = boxes_from_yolo(label.read_text(), width, height, classes) if label.is_file() else []
        out.append([{"label": classes.index(b.label), "xmin": b.xmin, "ymin": b.ymin, "xmax": b.xmax, "ymax": b.ymax} for b in boxes])
    return out


def match_detections(detections: list[list[dict[str, Any]]], truth: list[list[dict[str, Any]]], n_classes: int) -> MatchedDetections:
    """VOC matching per image: detections by falling confidence, each takes the unmatched same-class box of
    highest IoU >= 0.5 (true positive) or none (false positive)."""
    image, label, conf, hit = [], [], [], []
    gt_counts = np.zeros((len(truth), n_classes), dtype=np.int64)
    for i, (found, boxes) in enumerate(zip(detections, truth)):
        for box in boxes:
            gt_counts[i, box["label"]] += 1
        free = list(boxes)
        for det in sorted(found, key=lambda d: -d["conf"]):
            candidates = [(iou(det, box), k) for k, box in enumerate(free) if box["label"] == det["label"]]
            best = max(candidates, default=(0.0, -1))
            matched = best[0] >= IOU_MATCH
            if matched:
                free.pop(best[1])
            image.append(i), label.append(det["label"]), conf.append(det["conf"]), hit.append(matched)
    order = np.argsort(-np.array(conf, dtype=np.float64), kind="stable")  # once: every resample keeps this order
    return MatchedDetections(np.array(image, dtype=np.int64)[order], np.array(label, dtype=np.int64)[order],
                             np.array(conf, dtype=np.float64)[order], np.array(hit, dtype=bool)[order], gt_counts)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """ultralytics' AP: 101-point interpolation (trapezoid) of the precision envelope of the PR curve."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    x = np.linspace(0, 1, 101)
    return float(np.trapezoid(np.interp(x, mrec, mpre), x))


def weighted_map50(matched: MatchedDetections, weights: np.ndarray) -> tuple[float, dict[int, float]]:
    """mAP50 (and AP50 per class) when test image i counts `weights[i]` times: the mean over classes with ground truth."""
    gt = weights @ matched.gt_counts
    image_weights = weights[matched.image]  # per detection
    per_class = {}
    for c in np.flatnonzero(gt):
        chosen = (matched.label == c) & (image_weights > 0)
        w = image_weights[chosen]
        tp = np.cumsum(w * matched.true_positive[chosen])
        fp = np.cumsum(w * ~matched.true_positive[chosen])
        per_class[int(c)] = average_precision(tp / gt[c], tp / np.maximum(tp + fp, 1e-12)) if len(w) else 0.0
    return (float(np.mean(list(per_class.values()))) if per_class else 0.0), per_class


def _resampled_weights(n_images: int, resamples: int, seed: int) -> list[np.ndarray]:
    """How often each test image is drawn in each resample (with replacement): the same draws for every arm."""
    rng = np.random.default_rng(seed)
    return [np.bincount(rng.integers(0, n_images, n_images), minlength=n_images).astype(np.float64) for _ in range(resamples)]


def _bootstrap_scores(runs: list[MatchedDetections], resampled: list[np.ndarray]) -> tuple[float, np.ndarray]:
    """Mean-over-runs mAP50 on the full test split and on each resample."""
    def mean_map50(weights: np.ndarray) -> float:
        return float(np.mean([weighted_map50(m, weights)[0] for m in runs]))

    return mean_map50(np.ones(len(runs[0].gt_counts))), np.array([mean_map50(weights) for weights in resampled])


def _paired_difference(arm: tuple[float, np.ndarray], other: tuple[float, np.ndarray]) -> dict[str, Any]:
    low, high = np.percentile(arm[1] - other[1], [2.5, 97.5])
    return {"difference": round(arm[0] - other[0], 5), "ci95": [round(float(low), 5), round(float(high), 5)], "resamples": len(arm[1])}


def paired_bootstrap(arm: list[MatchedDetections], real: list[MatchedDetections], resamples: int, seed: int) -> dict[str, Any]:
    """Mean-over-runs mAP50 of `arm` minus that of `real` on the full test split, and its 95 % paired bootstrap
    interval: every resample of the test images (with replacement) scores all runs of both arms."""
    n_images = len(real[0].gt_counts)
    resampled = _resampled_weights(n_images, resamples, seed)
    return {**_paired_difference(_bootstrap_scores(arm, resampled), _bootstrap_scores(real, resampled)), "test_images": n_images}


def arms_not_run(config: UtilityConfig, held_out_images: int) -> dict[str, str]:
    """The configured arms that have nothing to train on, each with why and the fix (the report and the summary
    list them, so an arm is never silently missing from the utility table)."""
    reasons = {}
    if "oracle" in config.arms and not held_out_images:
        reasons["oracle"] = "no held-back real images: set data.train_fraction < 1 (the low-data protocol) to train it"
    if not any(ratio > 0 for ratio in config.synthetic_ratios):
        reasons |= {arm: "evaluation.utility.synthetic_ratios has no ratio > 0" for arm in config.arms if arm not in ("real", "oracle")}
    return reasons


def gain_recovered(real: float, synthetic: float, oracle: float) -> float | None:
    """(mAP real+synthetic - mAP real) / (mAP oracle - mAP real): the share of the held-back real data's value
    the synthetic data buys (None when the oracle does not beat real-only)."""
    return round((synthetic - real) / (oracle - real), 4) if oracle > real else None


def compare_arms(arm_runs: dict[str, list[dict[str, Any]]], root: Path, test_yaml: Path, resamples: int, seed: int,
                 classes: list[str]) -> dict[str, Any]:
    """Paired bootstrap over the test images: every arm against `real`, and each synthetic arm against the
    control arms of its ratio (`<arm> vs <other>`: mean-over-runs mAP50 difference and its 95 % interval)."""
    matched: dict[str, list[MatchedDetections]] = {}
    truths: dict[tuple[str, ...], list[list[dict[str, Any]]]] = {}  # every run predicts the same test split
    for arm, runs in arm_runs.items():
        matched[arm] = []
        for run in runs:
            saved = read_json(root / run["predictions"])
            images = tuple(saved["images"])
            if images not in truths:
                truths[images] = test_ground_truth(test_yaml, saved["images"], classes)
            matched[arm].append(match_detections(saved["detections"], truths[images], len(classes)))
    pairs = [(arm, "real") for arm in arm_runs if arm != "real"]
    for arm in arm_runs:
        if arm.startswith("real+synthetic-"):
            ratio = arm.removeprefix("real+synthetic-")
            pairs += [(arm, other) for other in (f"{control}-{ratio}" for control in ARM_FOLDERS) if other in arm_runs]
    if not pairs:
        return {}
    n_images = len(matched[pairs[0][1]][0].gt_counts)
    resampled = _resampled_weights(n_images, resamples, seed)  # drawn once: each arm is scored once on them
    scores = {arm: _bootstrap_scores(matched[arm], resampled) for arm in {name for pair in pairs for name in pair}}
    return {f"{arm} vs {other}": {**_paired_difference(scores[arm], scores[other]), "test_images": n_images} for arm, other in pairs}
