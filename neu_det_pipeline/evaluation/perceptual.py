"""Image-level similarity: LPIPS (lpips package) and IC-LPIPS, edge-SSIM and multi-scale LBP texture (scikit-image).

IC-LPIPS (intra-cluster LPIPS; Ojha et al. 2021, used for defect images by DFMGAN and AnomalyDiffusion): each
synthetic image joins the cluster of the real image nearest to it in LPIPS; the score is the mean pairwise LPIPS
among (up to `cluster_size` random) members of each cluster with two or more members, averaged over those clusters.
High: the generator varies around each real image; near 0: it copies one image per cluster (overfitting).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from skimage.feature import local_binary_pattern
from skimage.filters import sobel
from skimage.metrics import structural_similarity

from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.models import DTYPE_NAMES

LPIPS_DTYPE = torch.float32
"""LPIPS runs in fp32 whatever `run.mixed_precision`: its linear layers were calibrated on fp32 features, and its
distances are small differences of normalised activations."""


class LPIPSDistance:
    """LPIPS between grayscale uint8 images (replicated to 3 channels, scaled to [-1, 1])."""

    def __init__(self, net: str, pretrained_backbone: bool, device: torch.device, batch_size: int) -> None:
        import lpips

        try:
            # lpips prints its setup; its linear calibration layers ship with the package, only the backbone downloads.
            # A random backbone (offline tests) is drawn from a fixed seed, so its distances repeat from run to run.
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
                warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation, inside lpips
                torch.manual_seed(0)
                self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained_backbone, verbose=False)
        except OSError as exc:  # URLError is an OSError
            raise PipelineError(
                f"LPIPS {net} backbone weights could not be downloaded ({exc}); run once with network access, "
                f"or set evaluation.lpips_pretrained_backbone=false (random backbone: offline tests only)"
            ) from None
        self.model = self.model.to(device, LPIPS_DTYPE).eval()
        self.device, self.batch_size = device, batch_size
        self._identity: str | None = None

    @property
    def identity(self) -> str:
        """sha256 of the network's weights (backbone and linear layers) and dtype: what its distances depend on.
        Hashing the tensors, not naming the net, also tells two random backbones apart."""
        if self._identity is None:
            digest = hashlib.sha256(DTYPE_NAMES[LPIPS_DTYPE].encode())
            for name, tensor in sorted(self.model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self._identity = f"lpips-{digest.hexdigest()}"
        return self._identity

    def _tensor(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(pixels).to(self.device, LPIPS_DTYPE).div(127.5).sub(1)
        return x.unsqueeze(1).expand(-1, 3, -1, -1)

    def indexed(self, a: np.ndarray, b: np.ndarray, index_a: np.ndarray, index_b: np.ndarray) -> np.ndarray:
        """Distances between a[index_a[i]] and b[index_b[i]], batched without stacking every pair at once."""
        out = [self(a[index_a[i : i + self.batch_size]], b[index_b[i : i + self.batch_size]]) for i in range(0, len(index_a), self.batch_size)]
        return np.concatenate(out) if out else np.zeros(0)

    @torch.inference_mode()
    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Distances between a[i] and b[i] for stacks of equal shape (N, H, W)."""
        out = []
        for start in range(0, len(a), self.batch_size):
            batch = slice(start, start + self.batch_size)
            out.append(self.model(self._tensor(a[batch]), self._tensor(b[batch])).flatten().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)

    def diversity(self, pixels: np.ndarray, max_pairs: int, seed: int) -> float | None:
        """Mean LPIPS over up to `max_pairs` random distinct pairs (None for fewer than 2 images)."""
        pairs = random_pairs(len(pixels), max_pairs, seed)
        if not pairs:
            return None
        first, second = zip(*pairs)
        return float(self(pixels[list(first)], pixels[list(second)]).mean())


def nearest_by_lpips(lpips: LPIPSDistance, synth: np.ndarray, centres: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each synthetic image, the LPIPS-nearest of its `candidates` (N_synth, k) among `centres`: the distance
    and the centre's index (exact, as in the papers, when the candidates are all centres)."""
    k = candidates.shape[1]
    distances = lpips.indexed(synth, centres, np.repeat(np.arange(len(synth)), k), candidates.ravel()).reshape(len(synth), k)
    best = distances.argmin(axis=1)
    return distances[np.arange(len(synth)), best], candidates[np.arange(len(synth)), best]


def intra_cluster_lpips(lpips: LPIPSDistance, synth: np.ndarray, assigned: np.ndarray, cluster_size: int, seed: int) -> dict[str, float | int | None]:
    """IC-LPIPS of `synth`, whose image i belongs to the cluster of real image `assigned[i]`."""
    rng = random.Random(seed)
    means = []
    for centre in np.unique(assigned):
        members = [int(i) for i in np.flatnonzero(assigned == centre)]
        if len(members) < 2:
            continue  # a single member has no pair (Ojha et al. leave such clusters out of the mean)
        members = sorted(rng.sample(members, min(cluster_size, len(members))))
        first, second = zip(*[(members[i], members[j]) for i in range(len(members)) for j in range(i + 1, len(members))])
        means.append(float(lpips.indexed(synth, synth, np.array(first), np.array(second)).mean()))
    return {"ic_lpips": round(float(np.mean(means)), 5) if means else None, "clusters": int(len(np.unique(assigned))),
            "clusters_scored": len(means)}


def random_pairs(n: int, max_pairs: int, seed: int) -> list[tuple[int, int]]:
    """Up to `max_pairs` distinct unordered index pairs, seeded; all of them when there are few."""
    total = n * (n - 1) // 2
    if total <= max_pairs:
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    rng = random.Random(seed)
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < max_pairs:
        i, j = sorted(rng.sample(range(n), 2))
        chosen.add((i, j))
    return sorted(chosen)


def edge_map(pixels: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of a grayscale image in [0, 1]."""
    return sobel(pixels.astype(np.float64) / 255.0)


def edge_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of the two images' edge maps: does the synthetic image keep its source's structure?"""
    edges_a, edges_b = edge_map(a), edge_map(b)
    data_range = max(edges_a.max(), edges_b.max(), 1e-8)
    return float(structural_similarity(edges_a, edges_b, data_range=data_range))


def lbp_histogram(pixels: np.ndarray, radii: Sequence[int]) -> np.ndarray:
    """Concatenated uniform-LBP histograms (8 * r points at radius r), each normalised to sum 1 / len(radii)."""
    parts = []
    for radius in radii:
        points = 8 * radius
        codes = local_binary_pattern(pixels, points, radius, method="uniform")
        hist = np.bincount(codes.astype(np.int64).ravel(), minlength=points + 2).astype(np.float64)
        parts.append(hist / hist.sum() / len(radii))
    return np.concatenate(parts)


def histogram_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """1 - the symmetric chi-square distance of two histograms summing to 1: 1 when equal, 0 when disjoint.

    Chi-square weighs each bin's difference by the bin's mass, so the rare LBP codes that set NEU-DET classes
    apart count as much as the common flat-region codes (a Bhattacharyya coefficient lets the latter dominate).
    """
    total = a + b
    nonzero = total > 0
    return float(1.0 - 0.5 * ((a[nonzero] - b[nonzero]) ** 2 / total[nonzero]).sum())


def lbp_class_matrix(
    synth_hists: np.ndarray, synth_labels: Sequence[str], real_hists: np.ndarray, real_labels: Sequence[str], classes: Sequence[str]
) -> list[list[float | None]]:
    """Similarity of class-mean LBP histograms: rows synthetic classes, columns real classes (None: class absent)."""

    def class_means(hists: np.ndarray, labels: Sequence[str]) -> dict[str, np.ndarray]:
        labels = np.asarray(labels)
        return {name: hists[labels == name].mean(axis=0) for name in classes if (labels == name).any()}

    synth_means, real_means = class_means(synth_hists, synth_labels), class_means(real_hists, real_labels)
    return [
        [histogram_similarity(synth_means[row], real_means[col]) if row in synth_means and col in real_means else None for col in classes]
        for row in classes
    ]
