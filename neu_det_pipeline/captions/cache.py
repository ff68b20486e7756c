"""Per-image results of a run in progress, so an interrupted run continues where it stopped."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from neu_det_pipeline.io import jsonl_text, write_jsonl


class ResultCache:
    """A JSON-lines file of result rows keyed by `row[key]`, appended one batch per write.

    A batch is appended in a single write and fsynced, so a crash can only leave a partial last
    line; :meth:`load` drops it and rewrites the file before anything is appended again.
    """

    def __init__(self, path: Path, key: str = "id") -> None:
        self.path, self.key = path, key

    def load(self) -> dict[str, dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return rows
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # the partial batch of an interrupted write: recomputed
            rows[row[self.key]] = row
        write_jsonl(self.path, list(rows.values()))
        return rows

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(jsonl_text(rows))
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
