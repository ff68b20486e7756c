"""What a captioning run found, per class: the keywords that describe its images best."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from statistics import fmean
from typing import Any

from rich.table import Table


def top_keywords_by_class(rows: Iterable[dict[str, Any]], k: int) -> dict[str, list[tuple[str, float]]]:
    """Class -> its k keywords with the highest mean ensemble score over the class's images."""
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for keyword, score in row["keyword_scores"]["ensemble"].items():
            scores[row["class"]][keyword].append(score)
    means = {name: [(kw, round(fmean(values), 3)) for kw, values in by_kw.items()] for name, by_kw in scores.items()}
    return {name: sorted(pairs, key=lambda pair: -pair[1])[:k] for name, pairs in means.items()}


def keyword_table(
    top_keywords: dict[str, list[tuple[str, float]]], counts: dict[str, int], classes: Sequence[str]
) -> Table:
    table = Table(title="step2_captions: top keywords per class (mean normalised score)", title_justify="left")
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("top keywords")
    for name in classes:
        keywords = ", ".join(f"{kw} ({score:+.2f})" for kw, score in top_keywords.get(name, []))
        table.add_row(name, str(counts.get(name, 0)), keywords)
    return table
