"""Distribution metrics between real and synthetic features: KID, FID, k-NN precision and recall.

Features are extracted once per image (see :mod:`.features`) and fed to torchmetrics' KID through a
pass-through feature module, so overall and per-class scores, and every metric, reuse them. FID is computed here
in closed form (see `frechet_distance`); a test holds it to torchmetrics' value.

Small samples: KID is unbiased, so it comes first, as mean and std over random subsets; FID is biased
upward when an estimate rests on fewer images than feature dimensions (its covariance is then singular),
so such FIDs carry a note and `fid_reliable: false`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch_fidelity.metric_prc import calculate_precision_recall_full
from torchmetrics.image.kid import KernelInceptionDistance

MIN_IMAGES = 2
"""Fewest images per side for any distribution metric (a covariance, a kernel mean)."""


class PrecomputedFeatures(nn.Module):
    """torchmetrics' custom feature module, given features instead of images: returns its input."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _covariance_factor(features: torch.Tensor) -> torch.Tensor:
    """F with F F^T = the unbiased covariance of the rows: the centred rows / sqrt(n - 1) (d x n) when n <= d, else
    from the covariance's eigendecomposition (d x d)."""
    n, dim = features.shape
    centred = features - features.mean(dim=0)
    if n <= dim:
        return centred.T / (n - 1) ** 0.5
    values, vectors = torch.linalg.eigh(centred.T @ centred / (n - 1))
    return vectors * values.clamp(min=0).sqrt()


def frechet_distance(real: torch.Tensor, synth: torch.Tensor) -> float:
    """FID = |mu_r - mu_s|^2 + tr(S_r) + tr(S_s) - 2 tr sqrt(S_r S_s), unbiased covariances (as torchmetrics and
    torch-fidelity). tr sqrt(S_r S_s) is the nuclear norm of F_r^T F_s for any factors S = F F^T (the eigenvalues of
    S_r S_s are the squared singular values of F_r^T F_s): exact, and it spares the general eigendecomposition of a
    d x d product that torchmetrics runs (over a minute on CPU at d = 2048)."""
    real, synth = real.double(), synth.double()
    factor_real, factor_synth = _covariance_factor(real), _covariance_factor(synth)
    mean_term = (real.mean(dim=0) - synth.mean(dim=0)).square().sum()
    trace_sqrt = torch.linalg.svdvals(factor_real.T @ factor_synth).sum()
    return float(mean_term + factor_real.square().sum() + factor_synth.square().sum() - 2 * trace_sqrt)


def kernel_distance(real: torch.Tensor, synth: torch.Tensor, subsets: int, subset_size: int, seed: int) -> tuple[float, float]:
    """KID mean and std over `subsets` random subsets of `subset_size` images per side (seeded)."""
    metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets, subset_size=subset_size)
    metric.update(real.double(), real=True)
    metric.update(synth.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def precision_recall(real: torch.Tensor, synth: torch.Tensor, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. (2019): precision = share of synthetic samples inside the real k-NN manifold
    (realism), recall = share of real samples inside the synthetic one (coverage)."""
    precision, recall = calculate_precision_recall_full(synth.float(), real.float(), neighborhood=k)
    return float(precision), float(recall)


def distribution_metrics(
    real: torch.Tensor, synth: torch.Tensor, kid_subsets: int, kid_subset_size: int, k: int, seed: int
) -> dict[str, Any]:
    """Every distribution metric with the sample sizes it rests on; a metric the sizes do not allow is None,
    with the reason in `notes`."""
    n_real, n_synth, dim = len(real), len(synth), real.shape[1]
    result: dict[str, Any] = {"n_real": n_real, "n_synth": n_synth, "feature_dim": dim, "notes": []}
    if min(n_real, n_synth) < MIN_IMAGES:
        result.update(kid_mean=None, kid_std=None, kid_subset_size=None, fid=None, fid_reliable=False,
                      precision=None, recall=None)
        result["notes"].append(f"needs at least {MIN_IMAGES} images per side (real {n_real}, synthetic {n_synth})")
        return result
    # At most half the smaller side: subsets of a whole set would all be equal and their spread meaningless.
    subset_size = min(kid_subset_size, max(MIN_IMAGES, min(n_real, n_synth) // 2))
    result["kid_mean"], result["kid_std"] = kernel_distance(real, synth, kid_subsets, subset_size, seed)
    result["kid_subset_size"] = subset_size
    result["fid"] = frechet_distance(real, synth)
    result["fid_reliable"] = min(n_real, n_synth) >= dim
    if not result["fid_reliable"]:
        result["notes"].append(f"FID on {min(n_real, n_synth)} < {dim} (feature dim) images is biased upward: compare KID")
    if min(n_real, n_synth) > k:
        result["precision"], result["recall"] = precision_recall(real, synth, k)
    else:
        result["precision"] = result["recall"] = None
        result["notes"].append(f"precision/recall need more than k={k} images per side")
    return result
