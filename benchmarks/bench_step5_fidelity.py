"""Step 5's Inception KID + FID against torch-fidelity's own `fidelity` command: same two folders, same weights.

    python benchmarks/bench_step5_fidelity.py prepare /tmp/fid --data ../shared/neu-det --per-class 25
    python benchmarks/bench_step5_fidelity.py run /tmp/fid/real /tmp/fid/synthetic --weights /tmp/fid/inception.pth --kid-subset-size 75
    fidelity -c --kid --fid --samples-find-deep --no-cache --json --input1 /tmp/fid/real --input2 /tmp/fid/synthetic \
        --feature-extractor-weights-path /tmp/fid/inception.pth --kid-subset-size 75

`prepare` copies N real images per class (class subfolders), writes a blurred + noised copy of each as the
"synthetic" folder, and Inception-v3 weights with random, properly initialised values (offline: the real ones
download from GitHub; same compute, numbers not comparable with published ones). `run` is the part of Step 5 that
`fidelity --kid --fid` does: decode both folders, Inception features, KID and FID; it prints JSON like `fidelity`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def prepare(out: Path, data: Path, per_class: int) -> None:
    from bench_step5_metrics import perturbed_copy

    from neu_det_pipeline.evaluation.images import read_image_folder
    from neu_det_pipeline.testing.random_inception import random_inception_weights

    folder = read_image_folder(data)
    chosen = folder.subset([i for name in folder.classes for i in folder.indices_of(name)[:per_class]])
    for image in chosen.images:
        (out / "real" / image.image_class).mkdir(parents=True, exist_ok=True)
        shutil.copy(image.path, out / "real" / image.image_class / image.path.name)
    n = perturbed_copy(out / "real", out / "synthetic")
    calibration = chosen.load().pixels[::max(1, len(chosen) // 60)]  # batch-norm statistics
    random_inception_weights(out / "inception.pth", calibration)
    print(f"{out}: {n} real and {n} synthetic images, random Inception weights in inception.pth")


def run(real_dir: Path, synth_dir: Path, weights: Path, kid_subsets: int, kid_subset_size: int) -> None:
    from neu_det_pipeline.config import load_config
    from neu_det_pipeline.evaluation.features import load_extractor
    from neu_det_pipeline.evaluation.fidelity import frechet_distance, kernel_distance
    from neu_det_pipeline.evaluation.images import read_image_folder

    config = load_config(None, [f"evaluation.inception_weights={weights}", "evaluation.features=[inception]", "run.device=cpu"])
    extractor = load_extractor("inception", config)
    real, synth = (extractor(read_image_folder(folder).load().pixels) for folder in (real_dir, synth_dir))
    kid_mean, kid_std = kernel_distance(real, synth, kid_subsets, kid_subset_size, config.run.seed)
    print(json.dumps({"frechet_inception_distance": frechet_distance(real, synth), "kernel_inception_distance_mean": kid_mean,
                      "kernel_inception_distance_std": kid_std}, indent=4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare")
    prep.add_argument("out", type=Path)
    prep.add_argument("--data", type=Path, default=REPO.parent / "shared" / "neu-det")
    prep.add_argument("--per-class", type=int, default=25)
    ours = commands.add_parser("run")
    ours.add_argument("real", type=Path)
    ours.add_argument("synthetic", type=Path)
    ours.add_argument("--weights", type=Path, required=True)
    ours.add_argument("--kid-subsets", type=int, default=100)
    ours.add_argument("--kid-subset-size", type=int, default=1000)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out, args.data, args.per_class)
    else:
        run(args.real, args.synthetic, args.weights, args.kid_subsets, args.kid_subset_size)


if __name__ == "__main__":
    main()
