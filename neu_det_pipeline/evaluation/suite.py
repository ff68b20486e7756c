"""The image metrics of a real and a synthetic folder, per class and overall: what `neu-det metrics` reports
and the first half of Step 5.

Each feature extractor runs once per image; KID, FID and precision/recall of every class reuse those features.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any, TypeVar

import numpy as np
import torch

from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.evaluation.features import load_extractor
from neu_det_pipeline.evaluation.fidelity import distribution_metrics
from neu_det_pipeline.evaluation.images import ImageFolder
from neu_det_pipeline.evaluation.perceptual import LPIPSDistance, lbp_class_matrix, lbp_histogram
from neu_det_pipeline.models import resolve_device

T = TypeVar("T")
Track = Callable[[Iterable[T], int, str], Iterator[T]]

OVERALL = "all"
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


class MetricSuite:
    """Feature extractors, LPIPS and LBP with one config; `track` draws progress bars."""

    def __init__(self, config: PipelineConfig, track: Track) -> None:
        self.config, self.track = config, track
        self.cfg = config.evaluation
        self.timings: dict[str, float] = {}
        self.images_timed: dict[str, int] = {}
        self._lpips: LPIPSDistance | None = None

    def _timed(self, key: str, started: float, images: int) -> None:
        self.timings[key] = round(self.timings.get(key, 0.0) + time.perf_counter() - started, 3)
        self.images_timed[key] = self.images_timed.get(key, 0) + images

    @property
    def lpips(self) -> LPIPSDistance:
        if self._lpips is None:
            device = resolve_device(self.config.run.device)
            self._lpips = LPIPSDistance(self.cfg.lpips_net, self.cfg.lpips_pretrained_backbone, device, self.cfg.batch_size)
        return self._lpips

    def features(self, folders: dict[str, ImageFolder]) -> dict[str, dict[str, torch.Tensor]]:
        """extractor name -> folder key -> (N, D) features."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name in self.cfg.features:
            extractor = load_extractor(name, self.config)
            out[name] = {}
            for key, folder in folders.items():
                started = time.perf_counter()
                batches = range(0, len(folder), extractor.batch_size)
                chunks = [extractor(folder.pixels[i : i + extractor.batch_size])
                          for i in self.track(batches, len(batches), f"{name} features: {key}")]
                out[name][key] = torch.cat(chunks)
                self._timed(f"features_{name}", started, len(folder))
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

    def diversity(self, folder: ImageFolder, classes: list[str]) -> dict[str, float | None]:
        """Mean LPIPS between random same-class pairs, per class (higher: more varied)."""
        started = time.perf_counter()
        out = {}
        for i, name in enumerate(self.track(classes, len(classes), "LPIPS diversity")):
            indices = folder.indices_of(name)
            out[name] = self.lpips.diversity(folder.pixels[indices], self.cfg.lpips_pairs, self.config.run.seed + i)
        out[OVERALL] = _mean(out.values())
        self._timed("lpips_diversity", started, len(folder))
        return out

    def nearest_real(self, synth: ImageFolder, real: ImageFolder, synth_features: torch.Tensor,
                     real_features: torch.Tensor) -> tuple[list[float], list[str]]:
        """Each synthetic image's LPIPS to its nearest real image: the smallest LPIPS among the
        `lpips_candidates` real images nearest in feature space (cosine). Returns distances and real names."""
        started = time.perf_counter()
        k = min(self.cfg.lpips_candidates, len(real))
        cosine = torch.nn.functional.normalize(synth_features, dim=1) @ torch.nn.functional.normalize(real_features, dim=1).T
        candidates = cosine.topk(k, dim=1).indices.numpy()
        # Batches of (synthetic, candidate) pairs across images, not one image's k pairs at a time.
        synth_index = np.repeat(np.arange(len(synth)), k)
        pairs = range(0, len(synth_index), self.cfg.batch_size)
        lpips = np.concatenate([
            self.lpips(synth.pixels[synth_index[i : i + self.cfg.batch_size]], real.pixels[candidates.ravel()[i : i + self.cfg.batch_size]])
            for i in self.track(pairs, len(pairs), "LPIPS to nearest real")
        ]).reshape(len(synth), k)
        distances = [round(float(d), 5) for d in lpips.min(axis=1)]
        names = [real.images[candidates[i][j]].name for i, j in enumerate(lpips.argmin(axis=1))]
        self._timed("lpips_nearest_real", started, len(synth))
        return distances, names

    def lbp_histograms(self, folder: ImageFolder, description: str) -> np.ndarray:
        started = time.perf_counter()
        compute = partial(lbp_histogram, radii=self.cfg.lbp_radii)
        workers = len(os.sched_getaffinity(0))
        if len(folder) < MIN_IMAGES_FOR_WORKERS or workers == 1:
            hists = np.stack([compute(p) for p in self.track(folder.pixels, len(folder), description)])
        else:
            with ProcessPoolExecutor(workers) as pool:
                chunk = max(1, len(folder) // (workers * 8))
                hists = np.stack(list(self.track(pool.map(compute, folder.pixels, chunksize=chunk), len(folder), description)))
        self._timed("lbp", started, len(folder))
        return hists

    def compare(self, real: ImageFolder, synth: ImageFolder, extra_real: dict[str, ImageFolder] | None = None) -> dict[str, Any]:
        """The unpaired metrics of `synth` against `real` (both loaded); `extra_real` folders (e.g. a real
        test split) get their distribution metrics against `real` as a reference: the metric's noise floor."""
        classes = real.classes
        extra_real = extra_real or {}
        features = self.features({"real": real, "synthetic": synth, **extra_real})
        fidelity = {}
        for name, feats in features.items():
            fidelity[name] = {"synthetic": self.distributions(feats["real"], real.labels, feats["synthetic"], synth.labels, classes)}
            for key, folder in extra_real.items():
                fidelity[name][key] = self.distributions(feats["real"], real.labels, feats[key], folder.labels, classes)
        first = self.cfg.features[0]
        nearest, nearest_names = self.nearest_real(synth, real, features[first]["synthetic"], features[first]["real"])
        real_hists = self.lbp_histograms(real, "LBP: real")
        synth_hists = self.lbp_histograms(synth, "LBP: synthetic")
        lbp = {"radii": self.cfg.lbp_radii, "classes": classes, "synthetic_vs_real": lbp_class_matrix(synth_hists, synth.labels, real_hists, real.labels, classes)}
        for key, folder in extra_real.items():
            lbp[f"{key}_vs_real"] = lbp_class_matrix(self.lbp_histograms(folder, f"LBP: {key}"), folder.labels, real_hists, real.labels, classes)
        return {
            "sample_sizes": {"real": real.counts(), "synthetic": synth.counts(), **{k: f.counts() for k, f in extra_real.items()}},
            "fidelity": fidelity,
            "lpips": {
                "net": self.cfg.lpips_net,
                "pretrained_backbone": self.cfg.lpips_pretrained_backbone,
                "diversity": {"real": self.diversity(real, classes), "synthetic": self.diversity(synth, classes)},
                "nearest_real": per_class_means(nearest, synth.labels, classes),
            },
            "lbp": lbp,
            "per_image": {"nearest_real_lpips": nearest, "nearest_real_name": nearest_names},
        }

    def throughput(self) -> dict[str, dict[str, float]]:
        """Seconds and images/s per metric so far."""
        return {key: {"seconds": t, "images": self.images_timed[key], "images_per_s": round(self.images_timed[key] / t, 1) if t else None}
                for key, t in self.timings.items()}
