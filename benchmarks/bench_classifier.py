"""Step 6 classifier on real NEU-DET: multitask vs plain, the low-data curve, inference speed.

    python benchmarks/bench_classifier.py --config configs/classifier_cpu.yaml data.root=../shared/neu-det

1. The multitask model and the same backbone without the segmentation branch (plain classification with the
   LS + focal loss, `classifier.multitask=false`), each under the same time budget (`--budget-minutes`, which
   sets `classifier.max_train_minutes`): test accuracy, macro-F1, mask IoU, training time.
2. The low-data curve: the multitask model on `--fractions` of each class's real training split
   (`data.train_fraction`, Step 0's seeded hold-out; 1.0 is run 1).
3. Inference images/s of the multitask `best.pt` in torch and of its ONNX export in onnxruntime, batch 32,
   on the test split.
4. (`--runs ...,sgd_restarts`) the multitask model with the seed guide's SGD (momentum 0.9, weight decay 1e-3) and
   cosine annealing with warm restarts at `--sgd-lr`, beside run 1's AdamW + warm-up cosine.
5. (`--runs ...,box_crops`) the multitask model on box crops (`classifier.input=box_crops`): one sample per VOC
   object, test accuracy and macro-F1 per object.

    python benchmarks/bench_classifier.py --runs sgd_restarts,box_crops --config configs/classifier_cpu.yaml data.root=../shared/neu-det

Every run is the real step (`run_step`) in its own output folder under `--out`; BENCHMARKS.md has the results.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from neu_det_pipeline.classifier.checkpoints import BEST_FILE
from neu_det_pipeline.classifier.data import load_data, load_rgb
from neu_det_pipeline.classifier.inference import OnnxPredictor, TorchPredictor, export_onnx
from neu_det_pipeline.config import PipelineConfig, load_config
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step0_prepare import STEP as STEP0
from neu_det_pipeline.step6_classifier import STEP as STEP6

REPO = Path(__file__).resolve().parents[1]
BATCH = 32
RUNS = ("multitask", "plain", "fractions", "inference", "sgd_restarts", "box_crops")
DEFAULT_RUNS = "multitask,plain,fractions,inference"


def train(config_path: Path, overrides: list[str], out: Path, *extra: str) -> dict:
    config = load_config(config_path, [*overrides, f"run.output_dir={out}", *extra])
    run_step(STEP0, config)
    return run_step(STEP6, config)


def row(name: str, summary: dict) -> str:
    iou = summary["test_mask_iou"]
    unit = "objects" if "objects" in summary else "images"
    return (
        f"{name:<24} test accuracy {summary['test_accuracy']:.4f}  macro-F1 {summary['test_macro_f1']:.4f}  "
        f"mask IoU {'-' if iou is None else f'{iou:.3f}'}  epochs {summary['epochs_trained']}  "
        f"training {summary['training_seconds'] / 60:.1f} min  train {unit} {sum(summary[unit]['train'].values())}"
    )


def images_per_second(predictor, pixels: np.ndarray) -> float:
    predictor(pixels[:BATCH])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(pixels), BATCH):
        predictor(pixels[start : start + BATCH])
    return len(pixels) / (time.perf_counter() - started)


def test_pixels(config: PipelineConfig, run_dir: Path, image_size: int) -> np.ndarray:
    examples = load_data(config, run_dir / STEP0.name, None).splits["test"]
    size = (image_size, image_size)
    pixels = [np.asarray(load_rgb(e.image).resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 255 for e in examples]
    return np.ascontiguousarray(np.stack(pixels).transpose(0, 3, 1, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "classifier_cpu.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_classifier")
    parser.add_argument("--budget-minutes", type=float, default=20.0)
    parser.add_argument("--fractions", type=lambda text: [float(f) for f in text.split(",") if f], default=[0.1, 0.3],
                        help="comma-separated training fractions of the low-data curve (empty: skip it)")
    parser.add_argument("--runs", type=lambda text: [r for r in text.split(",") if r], default=DEFAULT_RUNS.split(","),
                        help=f"comma-separated, from {', '.join(RUNS)} (default {DEFAULT_RUNS}; inference needs multitask)")
    parser.add_argument("--sgd-lr", type=float, default=0.02, help="peak learning rate of the sgd_restarts run")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    unknown = sorted(set(args.runs) - set(RUNS))
    if unknown or ("inference" in args.runs and "multitask" not in args.runs):
        parser.error(f"--runs: unknown {unknown}" if unknown else "--runs: inference measures the multitask run; add multitask")
    budget = f"classifier.max_train_minutes={args.budget_minutes}"
    print(f"budget {args.budget_minutes} min per run, config {args.config}")

    if "multitask" in args.runs:
        print(row("multitask", train(args.config, args.overrides, args.out / "multitask", budget)), flush=True)
    if "plain" in args.runs:
        print(row("plain (LS + focal)", train(args.config, args.overrides, args.out / "plain", budget, "classifier.multitask=false")), flush=True)
    for fraction in args.fractions if "fractions" in args.runs else []:
        summary = train(args.config, args.overrides, args.out / f"fraction-{fraction}", budget, f"data.train_fraction={fraction}")
        print(row(f"multitask, {fraction:.0%} of train", summary), flush=True)
    if "sgd_restarts" in args.runs:
        summary = train(args.config, args.overrides, args.out / "sgd-restarts", budget, "classifier.optimizer=sgd",
                        "classifier.lr_schedule=cosine_restarts", f"classifier.learning_rate={args.sgd_lr}")
        print(row("SGD + warm restarts", summary), flush=True)
    if "box_crops" in args.runs:
        print(row("multitask, box crops", train(args.config, args.overrides, args.out / "box-crops", budget, "classifier.input=box_crops")), flush=True)
    if "inference" in args.runs:
        inference(args)


def inference(args: argparse.Namespace) -> None:
    run_dir = args.out / "multitask"
    checkpoint = run_dir / STEP6.name / BEST_FILE
    config = load_config(args.config, [*args.overrides, f"run.output_dir={run_dir}"])
    pixels = test_pixels(config, run_dir, config.classifier.image_size)
    export = export_onnx(checkpoint, args.out / "classifier.onnx")
    torch_speed = images_per_second(TorchPredictor(checkpoint), pixels)
    onnx_speed = images_per_second(OnnxPredictor(args.out / "classifier.onnx"), pixels)

    print(f"inference on {len(pixels)} test images, batch {BATCH}:")
    print(f"  torch        {torch_speed:8.1f} images/s")
    print(f"  onnxruntime  {onnx_speed:8.1f} images/s  (max abs difference to torch {max(export['max_abs_difference'].values()):.1e})")


if __name__ == "__main__":
    main()
