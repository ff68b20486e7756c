"""Distribution-based curation: the score (Mahalanobis with Ledoit-Wolf shrinkage, or k-NN) and `keep: all |
top_k | top_p`, on features with planted outliers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neu_det_pipeline.config import CurationConfig
from neu_det_pipeline.evaluation.curation import curate, distribution_scores, ledoit_wolf_covariance, policy_keeps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _planted(dim: int, n_real: int, seed: int = 0) -> tuple[torch.Tensor, list[str], torch.Tensor, list[str]]:
    """Two real classes (A around 0, B around 5 on every axis), 10 synthetic A images drawn like the real ones and
    one planted far away (index 10), 5 synthetic B images."""
    rng = np.random.default_rng(seed)
    real = np.concatenate([rng.normal(0, 1, (n_real, dim)), rng.normal(5, 1, (n_real, dim))])
    synth = np.concatenate([rng.normal(0, 1, (10, dim)), np.full((1, dim), 8.0), rng.normal(5, 1, (5, dim))])
    return (torch.from_numpy(synth).float(), ["A"] * 11 + ["B"] * 5, torch.from_numpy(real).float(), ["A"] * n_real + ["B"] * n_real)


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
@pytest.mark.parametrize("dim, n_real", [(8, 40), (64, 12)])  # more and fewer real images than dimensions
def test_planted_far_point_scores_highest_in_its_class(method: str, dim: int, n_real: int) -> None:
    synth, synth_labels, real, real_labels = _planted(dim, n_real)
    scores = distribution_scores(synth, synth_labels, real, real_labels, method, neighbours=3)
    assert np.isfinite(scores).all()
    assert scores[:11].argmax() == 10 and scores[10] > 2 * np.max(scores[:10])


def test_keep_policies_drop_the_planted_point_and_all_keeps_it() -> None:
    synth, labels, real, real_labels = _planted(8, 40)
    scores = distribution_scores(synth, labels, real, real_labels, "mahalanobis", 5)
    candidates = np.ones(len(labels), bool)
    assert policy_keeps(scores, labels, candidates, "all", 10, 0.9).all()
    top_k = policy_keeps(scores, labels, candidates, "top_k", 10, 0.9)
    assert not top_k[10] and top_k[:10].all() and top_k[11:].all()  # class B has 5 <= 10 images: all kept
    top_p = policy_keeps(scores, labels, candidates, "top_p", 10, 10 / 11)
    assert not top_p[10] and top_p[:10].all()  # ceil(10/11 * 11) = 10 of A kept; ceil(10/11 * 5) = 5 of B
    # An image a rule already rejected is neither kept nor counted among the top k.
    candidates[0] = False
    assert policy_keeps(scores, labels, candidates, "top_k", 10, 0.9)[[0, 10]].tolist() == [False, True]


def test_curate_rejects_the_planted_point_as_off_distribution_only_under_top_k() -> None:
    synth, labels, real, real_labels = _planted(8, 40)
    scores = distribution_scores(synth, labels, real, real_labels, "knn", 5)
    rng = np.random.default_rng(1)
    pixels = rng.integers(30, 220, (len(labels), 32, 32), dtype=np.uint8)  # textured, unsaturated, no copies
    real_pixels = rng.integers(30, 220, (4, 32, 32), dtype=np.uint8)
    rows = [{"name": f"s{i}", "class": label, "boxes": []} for i, label in enumerate(labels)]
    kept, rejected, _ = curate(rows, pixels, real_pixels, [f"r{i}" for i in range(4)], CurationConfig(keep="all"), None, scores)
    assert len(kept) == len(rows) and not rejected
    kept, rejected, _ = curate(rows, pixels, real_pixels, [f"r{i}" for i in range(4)], CurationConfig(keep="top_k", top_k=10), None, scores)
    assert [(r.name, r.reason) for r in rejected] == [("s10", "off-distribution")] and len(kept) == len(rows) - 1


def test_ledoit_wolf_is_invertible_with_few_images_and_unshrunk_with_many() -> None:
    rng = np.random.default_rng(0)
    few = torch.from_numpy(rng.normal(0, 1, (5, 50)))
    torch.linalg.cholesky(ledoit_wolf_covariance(few))  # the sample covariance alone has rank 4 < 50
    mixing = torch.from_numpy(rng.normal(0, 1, (3, 3)))
    many = torch.from_numpy(rng.normal(0, 1, (5000, 3))) @ mixing
    centred = many - many.mean(dim=0)
    sample = centred.T @ centred / len(many)
    torch.testing.assert_close(ledoit_wolf_covariance(many), sample, rtol=0.05, atol=0.05)
