"""The benchmark scripts still run (a few steps each): BENCHMARKS.md must stay reproducible.

The measured numbers live in BENCHMARKS.md; here only that every script runs and reports its ratio.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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


def _realsize_module():
    """benchmarks/realsize_check.py imported in-process (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("realsize_check", REPO / "benchmarks" / "realsize_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_realsize_check_at_tiny_size(tiny_models_dir: Path, tmp_path: Path) -> None:
    """The real-size check's own code on the tiny models: one child process per part, one table row each."""
    out = bench("realsize_check.py", "--size", "tiny", "--models-dir", str(tiny_models_dir), "--parts", "step4-sdxl", "step6",
                "--json", str(tmp_path / "realsize.json"))
    for part in ("step4-sdxl", "step6"):
        assert re.search(rf"^\| {part} \| [\d.]+ \| [\d.]+ \| .* \| yes \| ", out, re.MULTILINE), out
    results = {row["part"]: row for row in json.loads((tmp_path / "realsize.json").read_text())}
    sdxl = results["step4-sdxl"]
    assert sdxl["nonfinite"] == {"inputs": 0, "outputs": 0} and "bfloat16" in sdxl["detail"], sdxl
    assert results["step6"]["optimizer_steps"] == 2 and results["step6"]["peak_rss_gib"] > 0


def test_realsize_check_cuda_arguments(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`--device cuda` without CUDA: one clear line and exit 2; with CUDA, the plan of what it measures."""
    realsize = _realsize_module()
    monkeypatch.setattr(realsize.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        realsize.parse_args(["--device", "cuda", "--dtype", "fp16"])
    error = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(error.splitlines()) == 1 and "no CUDA device" in error, error

    monkeypatch.setattr(realsize.torch.cuda, "is_available", lambda: True)
    args = realsize.parse_args(["--device", "cuda", "--dtype", "fp16", "--parts", "step1", "step4-sdxl"])
    plan = realsize.plan_lines(args)
    assert plan[0] == "models (real size): sd15, sdxl, controlnet-sdxl-union, annotators, depth", plan
    assert plan[1] == "step1: 20 optimizer steps, steps/s after the first, peak GPU memory", plan
    assert "images/s at batch 1, 4, 8, compile off and on, fp16 at 1024 px" in plan[2], plan
    child = realsize.child_command(args, "step1", Path("run"))
    assert child[child.index("--device") + 1] == "cuda" and child[child.index("--dtype") + 1] == "fp16"


def test_realsize_check_finds_planted_nan() -> None:
    """The NaN/Inf watch on the VAE decoder counts non-finite latents (inputs) and images (outputs)."""
    realsize = _realsize_module()
    decoder = torch.nn.Conv2d(4, 3, 3, padding=1)
    watch = realsize.FiniteWatch()
    with watch.watching(decoder):
        decoder(torch.randn(1, 4, 8, 8))
    assert watch.finite and watch.nonfinite == {"inputs": 0, "outputs": 0}
    latents = torch.randn(1, 4, 8, 8)
    latents[0, 1, 2, 3] = float("nan")
    latents[0, 2, 5, 5] = float("inf")
    with watch.watching(decoder):
        images = decoder(latents)
    assert watch.nonfinite["inputs"] == 2 and watch.nonfinite["outputs"] == realsize.nonfinite_count(images) > 0
    assert not watch.finite
    decoder(latents)  # the hook is gone after the block
    assert watch.nonfinite["inputs"] == 2
