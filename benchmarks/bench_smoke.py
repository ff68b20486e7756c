"""Wall time of the README's first run, `neu-det run-all --config configs/smoke.yaml`, per step and in total.

    python benchmarks/bench_smoke.py
    python benchmarks/bench_smoke.py --only step0_prepare,step4_generate

Runs the command as a user does (a new process, default threads) into a fresh output folder, then reads each
step's `wall_time_s` from its summary; the total includes the process start, imports and the final table.
Building the tiny models (once per checkout, into `.tiny-models/`) is timed apart, into a temporary folder.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from neu_det_pipeline.io import read_json
from neu_det_pipeline.runner import select_steps
from neu_det_pipeline.testing.tiny_models import build_tiny_models

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "smoke.yaml")
    parser.add_argument("--only", default=None, metavar="STEP[,STEP]", help="time only these steps (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        build_tiny_models(Path(tmp) / "tiny")
        print(f"{'tiny models (once per checkout)':32s} {time.perf_counter() - started:7.1f} s")
        build_tiny_models(REPO / ".tiny-models")  # what the config points at, so the run below does not build them
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "neu_det_pipeline.cli", "run-all", "--config", str(args.config), f"run.output_dir={out}"]
        if args.only:
            command += ["--only", args.only]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        total = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"run-all failed:\n{result.stderr[-3000:]}")
        for name in select_steps(only=args.only):
            print(f"{name:32s} {read_json(out / name / 'summary.json')['wall_time_s']:7.1f} s")
        print(f"{'run-all total (process)':32s} {total:7.1f} s")


if __name__ == "__main__":
    main()
