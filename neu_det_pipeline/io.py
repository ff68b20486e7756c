"""Crash-safe file writing (every output is written to a temporary sibling and renamed into place), and reading."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, payload: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def jsonl_text(rows: Iterable[dict[str, Any]]) -> str:
    """One sorted-key JSON object per line: the only JSONL format the project writes."""
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    return atomic_write_text(path, jsonl_text(rows))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


FAST_PNG = {"compress_level": 1}
"""PNG options for files written in bulk: lossless all the same, and several times faster to encode than PIL's
default level 6, for files about 10 % larger."""


def save_image(image: Image.Image, path: str | Path, **save_kwargs: Any) -> Path:
    """Encode in memory, then write atomically; the format follows the suffix."""
    path = Path(path)
    buffer = io.BytesIO()
    image.save(buffer, format=Image.registered_extensions()[path.suffix.lower()], **save_kwargs)
    return atomic_write_bytes(path, buffer.getvalue())


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link `source` to `target` (replacing it), or copy it atomically where links are impossible."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        atomic_write_bytes(target, source.read_bytes())


def sha256_of_files(paths: Iterable[Path]) -> str:
    """sha256 over the files' names and contents, in name order (read in chunks: weights files are large)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()
