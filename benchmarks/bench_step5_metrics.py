"""Step 5's full metric pass (no YOLO) over a NEU-DET folder against a perturbed copy of itself: images/s per metric.

    python benchmarks/bench_step5_metrics.py --data ../shared/neu-det evaluation.features=[inception]
    python benchmarks/bench_step5_metrics.py --data ../shared/neu-det --random-inception   # offline, same compute

The perturbed copy (Gaussian blur + noise, seeded) is written once as class subfolders; the pass is
`neu-det metrics` in-process with the given key=value overrides (default config otherwise).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from neu_det_pipeline.evaluation.commands import metrics_command
from neu_det_pipeline.evaluation.images import read_image_folder
from neu_det_pipeline.testing.random_inception import random_inception_weights

REPO = Path(__file__).resolve().parents[1]


def perturbed_copy(data: Path, out: Path, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    folder = read_image_folder(data)
    for image in folder.images:
        with Image.open(image.path) as source:
            blurred = np.asarray(source.convert("L").filter(ImageFilter.GaussianBlur(1.5)), np.float32)
        noisy = np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8)
        (out / image.image_class).mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(out / image.image_class / f"{image.name}.png")
    return len(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "neu-det")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument(
        "--random-inception", action="store_true",
        help="the FID Inception architecture with random weights (offline; same compute, numbers not comparable)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        n = perturbed_copy(args.data, Path(tmp) / "perturbed")
        overrides = list(args.overrides)
        if args.random_inception:
            real = read_image_folder(args.data)
            calibration = real.subset(list(range(0, len(real), 25))).load().pixels  # batch-norm statistics
            weights = random_inception_weights(Path(tmp) / "inception.pth", calibration)
            overrides += ["evaluation.features=[inception]", f"evaluation.inception_weights={weights}"]
        started = time.perf_counter()
        metrics = metrics_command(args.data, Path(tmp) / "perturbed", Path(tmp) / "out", args.config, overrides)
        total = time.perf_counter() - started
    print(f"images: {n} real + {n} perturbed")
    for name, t in metrics["throughput"].items():
        print(f"{name:28s} {t['seconds']:8.2f} s  {t['images_per_s'] or 0:8.1f} images/s")
    print(f"total (loading, model loads, report included): {total:.2f} s ({2 * n / total:.1f} images/s)")


if __name__ == "__main__":
    main()
