"""One Step 5 YOLO utility run (real training split only) on CPU: wall time and test mAP50, to size a run.

    python benchmarks/bench_step5_yolo.py --data ../shared/neu-det --epochs 10 --imgsz 224

Step 0 prepares the folder (its YOLO export), then the same YoloRunner Step 5 uses trains and tests.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from neu_det_pipeline.artifacts import MANIFEST_FILE
from neu_det_pipeline.config import UtilityConfig, load_config
from neu_det_pipeline.evaluation.utility import Dataset, TrainImage, YoloRunner, build_dataset
from neu_det_pipeline.io import read_jsonl
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step0_prepare import STEP as STEP0

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "neu-det")
    parser.add_argument("--model", default="yolov8n.yaml", help="yolov8n.yaml trains from scratch (offline)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--imgsz", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(REPO / "configs" / "base.yaml", [f"data.root={args.data}", f"run.output_dir={tmp}", "prepare.resolution=64"])
        run_step(STEP0, config)
        step0 = Path(tmp) / "step0_prepare"
        rows = read_jsonl(step0 / MANIFEST_FILE)

        def items(split: str) -> list[TrainImage]:
            yolo = step0 / "yolo"
            return [TrainImage(r["id"], yolo / "images" / split / f"{r['id']}.jpg", yolo / "labels" / split / f"{r['id']}.txt")
                    for r in rows if r["split"] == split]

        utility = UtilityConfig(epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, workers=2)
        runner = YoloRunner(args.model, utility, Path(tmp) / "utility", "cpu")
        train = items("train")
        data_yaml = build_dataset(Path(tmp) / "utility" / "datasets", Dataset("real", train, len(train), 0), items("val"), items("test"), config.data.classes)
        started = time.perf_counter()
        result = runner.run(data_yaml, "real-seed0", 0)
        wall = time.perf_counter() - started
    print(f"model {args.model}, {len(train)} training images, {args.epochs} epochs at imgsz {args.imgsz}, batch {args.batch}")
    print(f"wall time: {wall:.1f} s ({wall / args.epochs:.1f} s/epoch incl. validation and the test pass)")
    print(f"test mAP50: {result['map50']:.4f}  mAP50-95: {result['map50_95']:.4f}")


if __name__ == "__main__":
    main()
