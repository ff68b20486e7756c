"""The image metrics of a real and a synthetic folder, per class and overall: what `neu-det metrics` reports
and the first half of Step 5.

Each feature extractor runs once per image (and once per machine with a shared `evaluation.feature_cache_dir`);
KID, FID and precision/recall of every class reuse those features. A feature space or the LPIPS backbone that cannot
load (offline, no weights file) does not stop the others: `not_computed` names each metric left out, why, and the fix.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.evaluation.features import FeatureCache, FeatureExtractor, load_extractor
from neu_det_pipeline.evaluation.fidelity import distribution_metrics
from neu_det_pipeline.evaluation.images import EVALUATION_SIDE, ImageFolder
from neu_det_pipeline.evaluation.perceptual import LPIPS_DTYPE, LPIPSDistance, intra_cluster_lpips, lbp_class_matrix, lbp_histogram, nearest_by_lpips
from neu_det_pipeline.models import DTYPE_NAMES, resolve_device

T = TypeVar("T")
Track = Callable[[Iterable[T], int, str], Iterator[T]]

OVERALL = "all"
FEATURE_CACHE_DIR = "feature_cache"
"""The feature cache's folder inside the step or `--out` folder when `evaluation.feature_cache_dir` is null."""
MIN_IMAGES_FOR_WORKERS = 64
"""Below this many images, starting LBP worker processes costs more than it saves."""

# torchmetrics warns on every KID that it keeps all features in memory: they are precomputed here anyway.
warnings.filterwarnings("ignore", message="Metric `Kernel Inception Distance` will save all extracted features")


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(float(np.mean(kept)), 5) if kept else None


def per_class_means(values: list[float | None], labels: list[str], classes: list[str]) -> dict[str, float | None]:
    """Mean of per-image values per class and over all images."""
    out = {name: _mean(v for v, label in zip(values, labels) if label == name) for name in classes}
    out[OVERALL] = _mean(values)
    return out


@functools.cache
def library_versions() -> dict[str, str | None]:
    """Versions of the libraries the numbers depend on (None: not installed); looked up once per process."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "torchvision", "torch-fidelity", "torchmetrics", "lpips", "scikit-image", "timm", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


class MetricSuite:
    """Feature extractors, LPIPS and LBP with one config; `track` draws progress bars; features are cached
    under `cache_dir`."""

    def __init__(self, config: PipelineConfig, track: Track, cache_dir: Path) -> None:
        self.config, self.track = config, track
        self.cfg = config.evaluation
        self.cache = FeatureCache(cache_dir)
        self.timings: dict[str, float] = {}
        self.images_timed: dict[str, int] = {}
        self.not_computed: list[dict[str, str]] = []
        """One entry per metric left out: `metric`, `why` (with the fix)."""
        self.feature_spaces: dict[str, dict[str, Any]] = {}
        self.cache_counts = {"computed": 0, "reused": 0}
        self.diversity_counts = {"computed": 0, "reused": 0}
        self._lpips: LPIPSDistance | None = None
        self._lpips_error: str | None = None
        self.computed_features: dict[str, dict[str, torch.Tensor]] = {}
        """What the last `compare` extracted: feature space -> set -> (N, D) features (curation scores reuse them)."""

    def _timed(self, key: str, started: float, images: int) -> None:
        self.timings[key] = round(self.timings.get(key, 0.0) + time.perf_counter() - started, 3)
        self.images_timed[key] = self.images_timed.get(key, 0) + images

    def skip(self, metric: str, why: str) -> None:
        if not any(entry["metric"] == metric for entry in self.not_computed):
            self.not_computed.append({"metric": metric, "why": why})

    @property
    def lpips(self) -> LPIPSDistance | None:
        """The LPIPS network, or None when it cannot load (the reason is kept for `skip`)."""
        if self._lpips is None and self._lpips_error is None:
            device = resolve_device(self.config.run.device)
            try:
                self._lpips = LPIPSDistance(self.cfg.lpips_net, self.cfg.lpips_pretrained_backbone, device, self.cfg.batch_size)
            except PipelineError as exc:
                self._lpips_error = str(exc)
        return self._lpips

    def lpips_or_skip(self, *metrics: str) -> LPIPSDistance | None:
        if self.lpips is None:
            for metric in metrics:
                self.skip(metric, self._lpips_error or "")
        return self.lpips

    def lpips_description(self) -> dict[str, Any]:
        """What metrics.json records of the LPIPS network."""
        backbone = f"torchvision ImageNet {self.cfg.lpips_net}" if self.cfg.lpips_pretrained_backbone else "random (offline tests only)"
        return {"net": self.cfg.lpips_net, "backbone": backbone, "linear_layers": "lpips package v0.1", "dtype": DTYPE_NAMES[LPIPS_DTYPE],
                "input_size": {"whole_image": EVALUATION_SIDE, "box_crop": self.cfg.box_crop_size}}

    def _cached(self, extractor: FeatureExtractor, pixels: np.ndarray, description: str) -> torch.Tensor:
        """`extractor`'s features of `pixels` through the cache, with a progress bar; counts what was computed."""
        bar = self.track(range(len(pixels)), len(pixels), description)
        features, computed = self.cache.features(extractor, pixels, lambda n: [next(bar, None) for _ in range(n)])
        for _ in bar:  # closes the bar
            pass
        self.cache_counts["computed"] += computed
        self.cache_counts["reused"] += len(pixels) - computed
        return features

    def features(self, pixels: dict[str, np.ndarray], first_only: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """extractor name -> key -> (N, D) features for every loadable extractor; the `first_only` sets (box
        crops) go through the first one only."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name in self.cfg.features:
            try:
                extractor = load_extractor(name, self.config)
            except PipelineError as exc:
                self.skip(f"KID, FID, precision/recall in {name} space", str(exc))
                continue
            self.feature_spaces[name] = extractor.describe()
            sets = {**pixels, **(first_only or {})} if not out else pixels
            out[name] = {}
            for key, images in sets.items():
                started = time.perf_counter()
                out[name][key] = self._cached(extractor, images, f"{name} features: {key}")
                self._timed(f"features_{name}", started, len(images))
            del extractor
        return out

    def distributions(self, real: torch.Tensor, real_labels: list[str], synth: torch.Tensor, synth_labels: list[str],
                      classes: list[str]) -> dict[str, Any]:
        """Distribution metrics overall and for each class present on both sides."""
        cfg, seed = self.cfg, self.config.run.seed
        started = time.perf_counter()
        result = {OVERALL: distribution_metrics(real, synth, cfg.kid_subsets, cfg.kid_subset_size, cfg.pr_neighbourhood, seed)}
        real_labels_np, synth_labels_np = np.asarray(real_labels), np.asarray(synth_labels)
        for name in classes:
            r, s = torch.from_numpy(real_labels_np == name), torch.from_numpy(synth_labels_np == name)
            if r.any() and s.any():
                result[name] = distribution_metrics(real[r], synth[s], cfg.kid_subsets, cfg.kid_subset_size, cfg.pr_neighbourhood, seed)
        self._timed("kid_fid_precision_recall", started, len(real) + len(synth))
        return result

    def diversity(self, lpips: LPIPSDistance, pixels: np.ndarray, labels: list[str], classes: list[str], key: str = "lpips_diversity") -> dict[str, float | None]:
        """Mean LPIPS between random same-class pairs, per class (higher: more varied). Each class's value is
        cached by its images' contents, the pairs drawn and the LPIPS weights: the real side is computed once."""
        started = time.perf_counter()
        out = {}
        labels_np = np.asarray(labels)
        for i, name in enumerate(self.track(classes, len(classes), "LPIPS diversity")):
            members, pairs, seed = pixels[labels_np == name], self.cfg.lpips_pairs, self.config.run.seed + i
            identity = f"{lpips.identity}|pairs={pairs}|seed={seed}|{','.join(self.cache.content_keys(members))}"
            out[name], computed = self.cache.value("lpips-diversity", identity, functools.partial(lpips.diversity, members, pairs, seed))
            self.diversity_counts["computed" if computed else "reused"] += 1
        out[OVERALL] = _mean(out.values())
        self._timed(key, started, len(pixels))
        return out

    def nearest_real(self, lpips: LPIPSDistance, synth: np.ndarray, synth_labels: list[str], real: np.ndarray, real_labels: list[str],
                     synth_features: torch.Tensor, real_features: torch.Tensor, key: str = "lpips_nearest_real") -> tuple[np.ndarray, np.ndarray]:
        """Each synthetic image's LPIPS to its nearest real image of the same class: the smallest LPIPS among
        the `lpips_candidates` real images of its class nearest in feature space (cosine). Returns the distances
        and the real indices (-1 and NaN where its class has no real image)."""
        started = time.perf_counter()
        distances, nearest = np.full(len(synth), np.nan), np.full(len(synth), -1)
        real_labels_np, synth_labels_np = np.asarray(real_labels), np.asarray(synth_labels)
        synth_unit, real_unit = (torch.nn.functional.normalize(f.float(), dim=1) for f in (synth_features, real_features))
        classes = sorted(set(synth_labels) & set(real_labels))
        for name in self.track(classes, len(classes), "LPIPS to nearest real"):
            s_idx, r_idx = np.flatnonzero(synth_labels_np == name), np.flatnonzero(real_labels_np == name)
            k = min(self.cfg.lpips_candidates, len(r_idx))
            candidates = (synth_unit[s_idx] @ real_unit[r_idx].T).topk(k, dim=1).indices.numpy()
            found, chosen = nearest_by_lpips(lpips, synth[s_idx], real[r_idx], candidates)
            distances[s_idx], nearest[s_idx] = found, r_idx[chosen]
        self._timed(key, started, len(synth))
        return distances, nearest

    def ic_lpips(self, lpips: LPIPSDistance, synth: np.ndarray, synth_labels: list[str], nearest: np.ndarray, classes: list[str],
                 key: str = "ic_lpips") -> dict[str, Any]:
        """IC-LPIPS per class (clusters: the real images of the class), overall the mean over classes."""
        started = time.perf_counter()
        labels_np = np.asarray(synth_labels)
        per_class = {}
        for i, name in enumerate(classes):
            members = np.flatnonzero((labels_np == name) & (nearest >= 0))
            if len(members):
                per_class[name] = intra_cluster_lpips(lpips, synth[members], nearest[members], self.cfg.ic_lpips_cluster_size,
                                                      self.config.run.seed + i)
        out = {name: m["ic_lpips"] for name, m in per_class.items()}
        out[OVERALL] = _mean(out.values())
        self._timed(key, started, len(synth))
        return {"value": out, "clusters": {name: [m["clusters_scored"], m["clusters"]] for name, m in per_class.items()}}

    def lbp_histograms(self, folder: ImageFolder, description: str) -> np.ndarray:
        """Each image's LBP histograms, through the feature cache (computed in worker processes when many)."""
        started = time.perf_counter()
        compute = partial(lbp_histogram, radii=self.cfg.lbp_radii)
        workers = len(os.sched_getaffinity(0))

        def encode(pixels: np.ndarray) -> torch.Tensor:
            if len(pixels) < MIN_IMAGES_FOR_WORKERS or workers == 1:
                return torch.from_numpy(np.stack([compute(p) for p in pixels]))
            with ProcessPoolExecutor(workers) as pool:
                return torch.from_numpy(np.stack(list(pool.map(compute, pixels, chunksize=max(1, len(pixels) // (workers * 8))))))

        dim = sum(8 * r + 2 for r in self.cfg.lbp_radii)
        # One batch: the worker pool splits it. The key: the LBP variant (uniform, radii) and scikit-image's version.
        extractor = FeatureExtractor("lbp", dim, encode, max(1, len(folder)), "skimage local_binary_pattern uniform",
                                     f"scikit-image {library_versions()['scikit-image']}, radii {self.cfg.lbp_radii}")
        hists = self._cached(extractor, folder.pixels, description)
        self._timed("lbp", started, len(folder))
        return hists.double().numpy()

    def compare(self, real: ImageFolder, synth: ImageFolder, extra_real: dict[str, ImageFolder] | None = None) -> dict[str, Any]:
        """The unpaired metrics of `synth` against `real` (both loaded); `extra_real` folders (e.g. a real
        test split) get their distribution metrics against `real` as a reference: the metric's noise floor."""
        classes, cfg = real.classes, self.cfg
        extra_real = extra_real or {}
        boxes = self._box_crops(real, synth) if cfg.in_box else None
        first_only = {"real_boxes": boxes[0][0], "synthetic_boxes": boxes[1][0]} if boxes else None
        features = self.features({"real": real.pixels, "synthetic": synth.pixels, **{k: f.pixels for k, f in extra_real.items()}}, first_only)
        self.computed_features = features
        fidelity = {}
        for name, feats in features.items():
            fidelity[name] = {"synthetic": self.distributions(feats["real"], real.labels, feats["synthetic"], synth.labels, classes)}
            for key, folder in extra_real.items():
                fidelity[name][key] = self.distributions(feats["real"], real.labels, feats[key], folder.labels, classes)
        space = next(iter(features), None)
        lpips_metrics = {"net": cfg.lpips_net, "pretrained_backbone": cfg.lpips_pretrained_backbone,
                         "diversity": None, "nearest_real": None, "ic_lpips": None}
        nearest, nearest_names = [None] * len(synth), [None] * len(synth)
        lpips = self.lpips_or_skip("LPIPS diversity", "LPIPS to nearest real", "IC-LPIPS")
        if lpips is not None:
            lpips_metrics["diversity"] = {"real": self.diversity(lpips, real.pixels, real.labels, classes),
                                          "synthetic": self.diversity(lpips, synth.pixels, synth.labels, classes)}
            if space is None:
                for metric in ("LPIPS to nearest real", "IC-LPIPS"):
                    self.skip(metric, "needs a feature space to pick its real candidates, and none loaded (see above)")
            else:
                distances, index = self.nearest_real(lpips, synth.pixels, synth.labels, real.pixels, real.labels,
                                                     features[space]["synthetic"], features[space]["real"])
                nearest = [None if i < 0 else round(float(d), 5) for d, i in zip(distances, index)]
                nearest_names = [None if i < 0 else real.images[i].name for i in index]
                lpips_metrics["nearest_real"] = per_class_means(nearest, synth.labels, classes)
                lpips_metrics["ic_lpips"] = self.ic_lpips(lpips, synth.pixels, synth.labels, index, classes)
        real_hists = self.lbp_histograms(real, "LBP: real")
        synth_hists = self.lbp_histograms(synth, "LBP: synthetic")
        lbp = {"radii": cfg.lbp_radii, "classes": classes, "synthetic_vs_real": lbp_class_matrix(synth_hists, synth.labels, real_hists, real.labels, classes)}
        for key, folder in extra_real.items():
            lbp[f"{key}_vs_real"] = lbp_class_matrix(self.lbp_histograms(folder, f"LBP: {key}"), folder.labels, real_hists, real.labels, classes)
        return {
            "sample_sizes": {"real": real.counts(), "synthetic": synth.counts(), **{k: f.counts() for k, f in extra_real.items()}},
            "fidelity": fidelity,
            "lpips": lpips_metrics,
            "in_box": self._in_box(boxes, features, space, classes) if boxes else None,
            "lbp": lbp,
            "provenance": {"versions": dict(library_versions()), "feature_spaces": self.feature_spaces, "lpips": self.lpips_description(),
                           "image_side": EVALUATION_SIDE},
            "feature_cache": {"dir": str(self.cache.root), **self.cache_counts, "lpips_diversity": self.diversity_counts},
            "not_computed": self.not_computed,
            "per_image": {"nearest_real_lpips": nearest, "nearest_real_name": nearest_names},
        }

    def _box_crops(self, real: ImageFolder, synth: ImageFolder) -> tuple[tuple[np.ndarray, list[str]], tuple[np.ndarray, list[str]]] | None:
        """Both folders' box crops and their labels, or None (and why) when a folder has no boxes."""
        crops = []
        for side, folder in (("real", real), ("synthetic", synth)):
            pixels, labels, _ = folder.box_crops(self.cfg.box_crop_size)
            if not len(pixels):
                self.skip("in-box KID and LPIPS", f"the {side} folder {folder.root} has no boxes ({folder.layout} layout); "
                                                   f"pass a NEU-DET, YOLO or Step 4 folder, or set evaluation.in_box=false")
                return None
            crops.append((pixels, labels))
        return crops[0], crops[1]

    def _in_box(self, boxes: tuple[tuple[np.ndarray, list[str]], tuple[np.ndarray, list[str]]], features: dict[str, dict[str, torch.Tensor]],
                space: str | None, classes: list[str]) -> dict[str, Any]:
        """KID (first feature space) and LPIPS of the box crops, per box label."""
        (real, real_labels), (synth, synth_labels) = boxes
        out: dict[str, Any] = {"crop_size": self.cfg.box_crop_size, "feature_space": space,
                               "boxes": {"real": dict(Counter(real_labels)), "synthetic": dict(Counter(synth_labels))},
                               "fidelity": None, "lpips": None}
        if space is not None:
            out["fidelity"] = self.distributions(features[space]["real_boxes"], real_labels, features[space]["synthetic_boxes"], synth_labels, classes)
        else:
            self.skip("in-box KID", "needs a feature space, and none loaded (see above)")
        lpips = self.lpips_or_skip("in-box LPIPS")
        if lpips is not None:
            out["lpips"] = {"diversity": {"real": self.diversity(lpips, real, real_labels, classes, "in_box_lpips"),
                                          "synthetic": self.diversity(lpips, synth, synth_labels, classes, "in_box_lpips")}}
            if space is not None:
                _, index = self.nearest_real(lpips, synth, synth_labels, real, real_labels, features[space]["synthetic_boxes"],
                                             features[space]["real_boxes"], "in_box_lpips")
                out["lpips"]["ic_lpips"] = self.ic_lpips(lpips, synth, synth_labels, index, classes, "in_box_lpips")
        return out

    def throughput(self) -> dict[str, dict[str, float]]:
        """Seconds and images/s per metric so far."""
        return {key: {"seconds": t, "images": self.images_timed[key], "images_per_s": round(self.images_timed[key] / t, 1) if t else None}
                for key, t in self.timings.items()}
