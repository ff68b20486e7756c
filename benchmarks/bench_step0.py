"""Step 0 wall time on a NEU-DET folder: a first run and a re-run with nothing changed.

    python benchmarks/bench_step0.py --data ../shared/neu-det

Each run is a fresh `python -m neu_det_pipeline.step0_prepare` process (imports included), as a user runs it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed_run(data: Path, out: Path) -> float:
    command = [sys.executable, "-m", "neu_det_pipeline.step0_prepare", "--config", str(REPO / "configs" / "base.yaml"),
               f"data.root={data}", f"run.output_dir={out}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "neu-det")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n_images = sum(1 for p in args.data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"))
    first, rerun = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            first.append(timed_run(args.data, Path(tmp)))
            rerun.append(timed_run(args.data, Path(tmp)))
    best_first, best_rerun = min(first), min(rerun)
    print(f"images: {n_images}")
    print(f"first run: {best_first:.2f} s ({n_images / best_first:.0f} images/s), runs: {[round(t, 2) for t in first]}")
    print(f"re-run:    {best_rerun:.2f} s ({n_images / best_rerun:.0f} images/s), runs: {[round(t, 2) for t in rerun]}")


if __name__ == "__main__":
    main()
