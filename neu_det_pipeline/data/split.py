"""Deterministic stratified train/val/test split."""

from __future__ import annotations

import random
from collections import defaultdict

SPLITS = ("train", "val", "test")


def stratified_split(labels: dict[str, str], fractions: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """Split ids by their label so each split keeps the class balance.

    Per class, ids are sorted then shuffled with a generator seeded by (seed, class), so the
    result depends only on the ids, the fractions and the seed, never on listing order.
    Validation and test sizes are rounded; training takes the rest.
    """
    by_class: dict[str, list[str]] = defaultdict(list)
    for sample_id, label in labels.items():
        by_class[label].append(sample_id)
    result: dict[str, list[str]] = {name: [] for name in SPLITS}
    for label in sorted(by_class):
        ids = sorted(by_class[label])
        random.Random(f"{seed}:{label}").shuffle(ids)
        n_val = round(len(ids) * fractions[1])
        n_test = round(len(ids) * fractions[2])
        result["val"] += ids[:n_val]
        result["test"] += ids[n_val : n_val + n_test]
        result["train"] += ids[n_val + n_test :]
    return {name: sorted(ids) for name, ids in result.items()}


HELD_OUT_SPLIT = "train_heldout"
"""Training images the low-data protocol (`data.train_fraction` < 1) holds back from Steps 1-4."""


def hold_out_training(train_ids: list[str], labels: dict[str, str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Keep `fraction` of each class's training ids (at least one), hold back the rest: (kept, held out).

    Seeded per class like :func:`stratified_split`, so the kept ids depend only on the ids, the fraction
    and the seed; a smaller fraction keeps a subset of what a larger one keeps.
    """
    by_class: dict[str, list[str]] = defaultdict(list)
    for sample_id in train_ids:
        by_class[labels[sample_id]].append(sample_id)
    kept: list[str] = []
    for label in sorted(by_class):
        ids = sorted(by_class[label])
        random.Random(f"{seed}:{label}:train_fraction").shuffle(ids)
        kept += ids[: max(1, round(len(ids) * fraction))]
    held_out = sorted(set(train_ids) - set(kept))
    return sorted(kept), held_out
