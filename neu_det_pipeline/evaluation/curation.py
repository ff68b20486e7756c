"""Which synthetic images may train a detector: each rule rejects with a reason and a detail.

    degenerate          blank, near-constant, all-black (a NaN decode) or saturated
    memorised           a near-copy of a real training image, also flipped or rotated by 90 degrees
    off-class           the real-data detector's most confident box has another class (or there is none)
    label-inconsistent  the detector finds none of the boxes the image carries from its source
    off-distribution    `keep: top_k | top_p`: among the images the rules kept, not one of the nearest to the real
                        class in feature space (the distribution score below)

The first rule that fires decides the reason; the curated set is the Step 4 rows no rule rejected.

Distribution score: each synthetic image's distance to the real training images of its class in a feature space:
Mahalanobis distance to the class mean under the Ledoit-Wolf shrunk covariance (well defined with fewer images than
dimensions), or the mean Euclidean distance to the k nearest real images. Lower is more typical of the class.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from neu_det_pipeline.artifacts import MANIFEST_FILE
from neu_det_pipeline.config import CurationConfig
from neu_det_pipeline.io import atomic_write_text, link_or_copy, write_jsonl

REASONS = ("degenerate", "memorised", "off-class", "label-inconsistent", "off-distribution")
POLICIES = ("top_k", "top_p")
REJECTIONS_FILE = "rejections.jsonl"

# The eight symmetries of the square: a memorised image may come back flipped or rotated.
DIHEDRAL = {
    "identity": lambda a: a,
    "hflip": lambda a: a[..., :, ::-1],
    "vflip": lambda a: a[..., ::-1, :],
    "rot90": lambda a: np.rot90(a, 1, axes=(-2, -1)),
    "rot180": lambda a: np.rot90(a, 2, axes=(-2, -1)),
    "rot270": lambda a: np.rot90(a, 3, axes=(-2, -1)),
    "transpose": lambda a: np.swapaxes(a, -2, -1),
    "antitranspose": lambda a: np.rot90(np.swapaxes(a, -2, -1), 2, axes=(-2, -1)),
}


@dataclass(frozen=True)
class Rejection:
    name: str
    image_class: str
    reason: str
    detail: str

    def to_record(self) -> dict[str, str]:
        return {"name": self.name, "class": self.image_class, "reason": self.reason, "detail": self.detail}


def degenerate_detail(pixels: np.ndarray, min_std: float, max_saturated_fraction: float) -> str | None:
    """Why an image is degenerate, or None."""
    std = float(pixels.std())
    if pixels.max() == 0:
        return "all black (a NaN decode?)"
    if std < min_std:
        return f"near-constant (std {std:.2f} < {min_std} gray levels)"
    saturated = float(np.mean((pixels == 0) | (pixels == 255)))
    if saturated > max_saturated_fraction:
        return f"saturated ({saturated:.0%} of pixels at 0 or 255)"
    return None


def thumbnails(pixels: np.ndarray, size: int) -> np.ndarray:
    """(N, size, size) zero-mean, unit-norm grayscale thumbnails: their dot product is a correlation."""
    small = np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BOX), np.float32) for p in pixels])
    small -= small.mean(axis=(1, 2), keepdims=True)
    norms = np.sqrt((small**2).sum(axis=(1, 2), keepdims=True))
    return small / np.maximum(norms, 1e-6)


def nearest_copies(synth: np.ndarray, real: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """For each synthetic image: the highest correlation with any real image under any square symmetry,
    the real index and the symmetry."""
    synth_flat = thumbnails(synth, size).reshape(len(synth), -1)
    real_thumbs = thumbnails(real, size)
    best = np.full(len(synth), -np.inf, np.float32)
    index = np.zeros(len(synth), np.int64)
    transform = ["identity"] * len(synth)
    for name, apply in DIHEDRAL.items():
        similarity = synth_flat @ np.ascontiguousarray(apply(real_thumbs)).reshape(len(real), -1).T
        top = similarity.argmax(axis=1)
        values = similarity[np.arange(len(synth)), top]
        for i in np.flatnonzero(values > best):
            best[i], index[i], transform[i] = values[i], top[i], name
    return best, index, transform


def ledoit_wolf_covariance(x: torch.Tensor) -> torch.Tensor:
    """Ledoit & Wolf (2004) covariance of the rows of `x`: the sample covariance shrunk toward a scaled identity by
    the weight that minimises the expected squared error; invertible for any number of rows >= 2."""
    n, p = x.shape
    centred = x - x.mean(dim=0)
    sample = centred.T @ centred / n
    mu = torch.trace(sample) / p
    delta = ((sample - mu * torch.eye(p, dtype=x.dtype)) ** 2).sum() / p
    beta = ((centred**2).sum(dim=1) ** 2).sum() / n - (sample**2).sum()
    beta = torch.clamp(beta / (n * p), max=delta)
    shrinkage = beta / delta if delta > 0 else torch.tensor(1.0, dtype=x.dtype)
    return shrinkage * mu * torch.eye(p, dtype=x.dtype) + (1 - shrinkage) * sample


def distribution_scores(synth: torch.Tensor, synth_labels: list[str], real: torch.Tensor, real_labels: list[str],
                        method: str, neighbours: int) -> np.ndarray:
    """Each synthetic feature row's distance to the real rows of its class (`mahalanobis` or `knn`); NaN where the
    class has fewer than 2 real images."""
    scores = np.full(len(synth), np.nan)
    synth_np, real_np = np.asarray(synth_labels), np.asarray(real_labels)
    for name in sorted(set(synth_labels)):
        s_idx, r_idx = np.flatnonzero(synth_np == name), np.flatnonzero(real_np == name)
        if len(r_idx) < 2:
            continue
        real_class, synth_class = real[r_idx].double(), synth[s_idx].double()
        if method == "mahalanobis":
            diff = synth_class - real_class.mean(dim=0)
            solved = torch.linalg.solve(ledoit_wolf_covariance(real_class), diff.T).T
            scores[s_idx] = (diff * solved).sum(dim=1).clamp(min=0).sqrt().numpy()
        else:
            k = min(neighbours, len(r_idx))
            scores[s_idx] = torch.cdist(synth_class, real_class).topk(k, dim=1, largest=False).values.mean(dim=1).numpy()
    return scores


def policy_keeps(scores: np.ndarray, labels: list[str], candidates: np.ndarray, policy: str, top_k: int, top_p: float) -> np.ndarray:
    """Which images `policy` keeps: per class, among the `candidates` (the rules kept them), the `top_k` or the
    ceil(`top_p` * n) with the lowest score; `all` keeps every candidate. An image without a score (NaN) is kept."""
    keep = candidates.copy()
    if policy == "all":
        return keep
    labels_np = np.asarray(labels)
    for name in set(labels):
        ranked = np.flatnonzero(candidates & (labels_np == name) & np.isfinite(scores))
        allowed = top_k if policy == "top_k" else int(np.ceil(top_p * len(ranked)))
        order = ranked[np.argsort(scores[ranked], kind="stable")]
        keep[order[allowed:]] = False
    return keep


def curate(
    rows: list[dict[str, Any]],
    synth_pixels: np.ndarray,
    real_pixels: np.ndarray,
    real_names: list[str],
    config: CurationConfig,
    consistency: dict[str, dict[str, Any]] | None,
    scores: np.ndarray | None = None,
) -> tuple[list[dict[str, Any]], list[Rejection], list[float]]:
    """Apply the rules to Step 4 `rows` (aligned with `synth_pixels`); `consistency` (name -> {"agrees",
    "recall", "top"}) is None when the label rule is off; `scores` (distribution scores, aligned) feed
    `config.keep`. Returns kept rows, rejections, copy similarities."""
    similarity, nearest, transform = nearest_copies(synth_pixels, real_pixels, config.memorised_size)
    verdicts: list[tuple[str, str] | None] = []
    for i, row in enumerate(rows):
        found = degenerate_detail(synth_pixels[i], config.min_std, config.max_saturated_fraction)
        reason = "degenerate" if found else None
        if reason is None and similarity[i] >= config.memorised_similarity:
            reason = "memorised"
            found = f"correlation {similarity[i]:.3f} with {real_names[nearest[i]]} ({transform[i]})"
        if reason is None and consistency is not None:
            check = consistency[row["name"]]
            if not check["agrees"]:
                reason, found = "off-class", f"top detection: {check['top'] or 'none'}"
            elif check["recall"] == 0:
                reason, found = "label-inconsistent", f"none of its {len(row['boxes'])} boxes detected at IoU 0.5"
        verdicts.append((reason, found) if reason else None)
    if scores is not None and config.keep != "all":
        labels = [row["class"] for row in rows]
        candidates = np.array([v is None for v in verdicts])
        keep = policy_keeps(scores, labels, candidates, config.keep, config.top_k, config.top_p)
        threshold = f"top_k={config.top_k}" if config.keep == "top_k" else f"top_p={config.top_p}"
        for i in np.flatnonzero(candidates & ~keep):
            verdicts[i] = ("off-distribution", f"{config.score} score {scores[i]:.3f}: not among the nearest to real {labels[i]} ({threshold})")
    kept = [row for row, verdict in zip(rows, verdicts) if verdict is None]
    rejected = [Rejection(row["name"], row["class"], *verdict) for row, verdict in zip(rows, verdicts) if verdict is not None]
    return kept, rejected, [round(float(s), 4) for s in similarity]


def rejection_table(rejections: list[Rejection], classes: list[str]) -> dict[str, dict[str, int]]:
    """reason -> class -> count (every reason and class listed)."""
    counts = Counter((r.reason, r.image_class) for r in rejections)
    return {reason: {name: counts[reason, name] for name in classes} for reason in REASONS}


def write_curated(out_dir: Path, step4_dir: Path, kept: list[dict[str, Any]], rejections: list[Rejection], names: list[str]) -> None:
    """`curated/`: the kept Step 4 rows (unchanged), a YOLO dataset of them and the rejections."""
    yolo = out_dir / "yolo"
    for row in kept:
        link_or_copy(step4_dir / row["yolo_image"], yolo / "images" / Path(row["yolo_image"]).name)
        link_or_copy(step4_dir / row["yolo_label"], yolo / "labels" / Path(row["yolo_label"]).name)
    data = {"train": "images", "val": "images", "nc": len(names), "names": dict(enumerate(names))}
    atomic_write_text(yolo / "data.yaml", yaml.safe_dump(data, sort_keys=False))
    write_jsonl(out_dir / REJECTIONS_FILE, [r.to_record() for r in rejections])
    write_jsonl(out_dir / MANIFEST_FILE, kept)
