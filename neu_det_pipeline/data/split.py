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
