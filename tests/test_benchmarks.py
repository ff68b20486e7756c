"""The benchmark scripts still run (a few steps each): BENCHMARKS.md must stay reproducible.

The measured numbers live in BENCHMARKS.md; here only that every script runs and reports its ratio.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE_ROOT, SMOKE_CONFIG, smoke_overrides

FEW_STEPS = ["--steps", "4", "--warmup", "1", "--repeats", "1"]


def bench(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_step0_benchmark(tmp_path: Path) -> None:
    out = bench("bench_step0.py", "--data", str(SAMPLE_ROOT), "--repeats", "1")
    assert re.search(r"first run: [\d.]+ s", out) and re.search(r"re-run: +[\d.]+ s", out)


def test_adamw8bit_state_benchmark() -> None:
    out = bench("bench_adamw8bit_state.py")
    ratios = [float(r) for r in re.findall(r"AdamW8bit \(step 3\)\s+[\d.]+ MiB\s+ratio ([\d.]+)", out)]
    assert ratios and all(ratio <= 0.30 for ratio in ratios), out


@pytest.mark.parametrize("script", ["bench_step1_ti.py", "bench_step3_lora.py"])
def test_training_loop_benchmarks(script: str, tiny_models_dir: Path, tmp_path: Path) -> None:
    overrides = [o for o in smoke_overrides(tiny_models_dir, tmp_path) if not o.startswith("run.output_dir")]
    out = bench(script, "--config", str(SMOKE_CONFIG), *FEW_STEPS, *overrides)
    assert re.search(r"ratio \w+ / bare diffusers = [\d.]+", out), out


def test_classifier_benchmark(tiny_models_dir: Path, tmp_path: Path) -> None:
    overrides = [o for o in smoke_overrides(tiny_models_dir, tmp_path) if not o.startswith("run.output_dir")]
    out = bench("bench_classifier.py", "--config", str(SMOKE_CONFIG), "--out", str(tmp_path / "bench"), "--fractions", "0.5", *overrides)
    for name in ("multitask", "plain \\(LS \\+ focal\\)", "multitask, 50% of train"):
        assert re.search(rf"{name} +test accuracy [\d.]+ +macro-F1 [\d.]+", out), out
    assert re.search(r"plain .* mask IoU - ", out) and re.search(r"^multitask +.* mask IoU [\d.]+", out, re.MULTILINE), out
    assert re.search(r"torch +[\d.]+ images/s", out) and re.search(r"onnxruntime +[\d.]+ images/s", out), out


def test_step4_benchmark(tiny_models_dir: Path, tmp_path: Path) -> None:
    overrides = [o for o in smoke_overrides(tiny_models_dir, tmp_path) if not o.startswith("run.output_dir")]
    out = bench(
        "bench_step4.py", "--config", str(SMOKE_CONFIG), "--repeats", "1", "--batch-sizes", "2", "--map-images", "1",
        *overrides, "generation.images_per_source=1",
    )
    assert re.search(r"ratio step4 / bare diffusers = [\d.]+", out) and re.search(r"batch +2: +[\d.]+ images/s", out), out
    for detector in ("pidinet", "hed", "canny", "depth_anything", "normalbae", "midas"):
        assert re.search(rf"{detector} +first run +[\d.]+ images/s +cached +[\d.]+ images/s", out), out


def test_step5_metrics_benchmark(tiny_models_dir: Path) -> None:
    out = bench("bench_step5_metrics.py", "--data", str(SAMPLE_ROOT), "evaluation.features=[clip]",
                f"models.clip={tiny_models_dir / 'clip'}", "evaluation.lpips_pretrained_backbone=false",
                "evaluation.kid_subsets=5", "run.device=cpu")
    assert re.search(r"features_clip\s+[\d.]+ s\s+[\d.]+ images/s", out) and re.search(r"total .*: [\d.]+ s", out), out


def test_step5_yolo_benchmark() -> None:
    out = bench("bench_step5_yolo.py", "--data", str(SAMPLE_ROOT), "--epochs", "1", "--imgsz", "64", "--batch", "8")
    assert re.search(r"wall time: [\d.]+ s", out) and re.search(r"test mAP50: [\d.]+", out), out


def test_smoke_benchmark() -> None:
    out = bench("bench_smoke.py", "--only", "step0_prepare")
    assert re.search(r"tiny models \(once per checkout\) +[\d.]+ s", out) and re.search(r"step0_prepare +[\d.]+ s", out), out
    assert re.search(r"run-all total \(process\) +[\d.]+ s", out), out
