"""Step 5's full metric pass (no YOLO) over a NEU-DET folder against a perturbed copy of itself: images/s per metric.

    python benchmarks/bench_step5_metrics.py --data ../shared/neu-det evaluation.features=[inception]
    python benchmarks/bench_step5_metrics.py --data ../shared/neu-det --random-inception   # offline, same compute
    python benchmarks/bench_step5_metrics.py --data ../shared/neu-det --random-inception --per-class 50 --cache-passes 2

The perturbed copy (Gaussian blur + noise, seeded) is written once as class subfolders; the pass is
`neu-det metrics` in-process with the given key=value overrides (default config otherwise).
`--cache-passes N`: N rounds of two passes sharing one feature cache: the first with an empty cache, the second
over the same real images with new synthetic ones (another perturbation seed); prints both times and their ratio.
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
from neu_det_pipeline.evaluation.images import ImageFolder, read_image_folder
from neu_det_pipeline.testing.random_inception import random_inception_weights

REPO = Path(__file__).resolve().parents[1]


def perturbed_copy(data: Path | ImageFolder, out: Path, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    folder = read_image_folder(data) if isinstance(data, Path) else data
    for image in folder.images:
        with Image.open(image.path) as source:
            blurred = np.asarray(source.convert("L").filter(ImageFilter.GaussianBlur(1.5)), np.float32)
        noisy = np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8)
        (out / image.image_class).mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(out / image.image_class / f"{Path(image.name).name}.png")
    return len(folder)


def real_subset(data: Path, per_class: int | None, out: Path) -> Path:
    """`data` itself, or a NEU-DET copy (IMAGES + ANNOTATIONS links) of its first `per_class` images per class."""
    if per_class is None:
        return data
    folder = read_image_folder(data)
    for sub in ("IMAGES", "ANNOTATIONS"):
        (out / sub).mkdir(parents=True)
    for name in folder.classes:
        for i in folder.indices_of(name)[:per_class]:
            image = folder.images[i].path
            (out / "IMAGES" / image.name).symlink_to(image.resolve())
            annotation = image.parent.parent / "ANNOTATIONS" / f"{image.stem}.xml"
            (out / "ANNOTATIONS" / annotation.name).symlink_to(annotation.resolve())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "neu-det")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument(
        "--random-inception", action="store_true",
        help="the FID Inception architecture with random weights (offline; same compute, numbers not comparable)",
    )
    parser.add_argument("--per-class", type=int, default=None, help="only the first N real images of each class")
    parser.add_argument("--cache-passes", type=int, default=0, help="rounds of (empty-cache pass, warm-real-cache pass)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        data = real_subset(args.data, args.per_class, Path(tmp) / "real")
        n = perturbed_copy(data, Path(tmp) / "perturbed")
        overrides = list(args.overrides)
        if args.random_inception:
            real = read_image_folder(data)
            calibration = real.subset(list(range(0, len(real), max(1, len(real) // 60)))).load().pixels  # batch-norm statistics
            weights = random_inception_weights(Path(tmp) / "inception.pth", calibration)
            overrides += ["evaluation.features=[inception]", f"evaluation.inception_weights={weights}"]
        if args.cache_passes:
            cache_rounds(data, Path(tmp), n, overrides, args)
            return
        started = time.perf_counter()
        metrics = metrics_command(data, Path(tmp) / "perturbed", Path(tmp) / "out", args.config, overrides)
        total = time.perf_counter() - started
    print(f"images: {n} real + {n} perturbed")
    for name, t in metrics["throughput"].items():
        print(f"{name:28s} {t['seconds']:8.2f} s  {t['images_per_s'] or 0:8.1f} images/s")
    print(f"total (loading, model loads, report included): {total:.2f} s ({2 * n / total:.1f} images/s)")


def cache_rounds(data: Path, tmp: Path, n: int, overrides: list[str], args: argparse.Namespace) -> None:
    """First pass with an empty cache, second with the same real images and new synthetic ones; ratio per round."""
    ratios = []
    for round_ in range(args.cache_passes):
        cache = tmp / f"cache{round_}"
        times = []
        for seed in (2 * round_ + 1, 2 * round_ + 2):  # new synthetic images every pass
            synth = tmp / f"synthetic{seed}"
            perturbed_copy(read_image_folder(data), synth, seed)
            started = time.perf_counter()
            metrics = metrics_command(data, synth, tmp / f"out{seed}", args.config, [*overrides, f"evaluation.feature_cache_dir={cache}"])
            times.append(time.perf_counter() - started)
            print(f"round {round_} pass {len(times)}: {times[-1]:.2f} s, features computed {metrics['feature_cache']['computed']}, "
                  f"reused {metrics['feature_cache']['reused']}; class LPIPS diversities {metrics['feature_cache']['lpips_diversity']}", flush=True)
        ratios.append(times[1] / times[0])
        print(f"round {round_}: second / first = {ratios[-1]:.3f}", flush=True)
    print(f"images: {n} real + {n} synthetic per pass; median second / first: {float(np.median(ratios)):.3f}")


if __name__ == "__main__":
    main()
