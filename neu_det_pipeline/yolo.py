"""Ultralytics without surprises: a private settings folder and a local font, so nothing is fetched."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any


def prepare_offline_ultralytics(config_dir: Path) -> None:
    """Point ultralytics at `config_dir` with a local Arial.ttf; call before the first `import ultralytics`.

    Ultralytics reads YOLO_CONFIG_DIR (and YOLO_VERBOSE) once at import, looks up hosts unless YOLO_OFFLINE is set,
    and downloads Arial.ttf for its plots when the settings folder has none.
    """
    if "ultralytics" in sys.modules:
        return
    import matplotlib

    font_dir = config_dir / "Ultralytics"
    font_dir.mkdir(parents=True, exist_ok=True)
    font = font_dir / "Arial.ttf"
    if not font.exists():
        shutil.copyfile(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    # Its banners, per-epoch tables and tqdm bars would fill the step's display; the step shows its own progress.
    # YOLO_VERBOSE=true in the environment brings them back.
    os.environ.setdefault("YOLO_VERBOSE", "false")


def check_yolo_dataset(data_yaml: Path, config_dir: Path) -> dict[str, Any]:
    """Ultralytics' own dataset check (no download attempted); raises if it rejects the dataset."""
    prepare_offline_ultralytics(config_dir)
    from ultralytics.data.utils import check_det_dataset

    return check_det_dataset(str(data_yaml), autodownload=False)
