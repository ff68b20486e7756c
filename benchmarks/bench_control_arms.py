"""The control arms under the low-data protocol on real NEU-DET: the bar the diffusion arm must beat.

    OMP_NUM_THREADS=2 python benchmarks/bench_control_arms.py --data ../shared/neu-det --fractions 0.1,0.3 --seeds 0,1

For each kept fraction of the training split (`data.train_fraction`, Step 0's seeded hold-out, split of
`run.seed=0`) and each seed, four training sets, all tested on the same real test split:
  real              the kept real images
  real+classical    plus one albumentations copy of each kept image (Step 5's classical control arm)
  real+copy_paste   plus one copy-paste image per kept image (Step 5's copy-paste control arm)
  oracle            the whole training split (kept + held back; the same for every fraction)
Each is trained twice: the Step 6 classifier with the CPU preset (`configs/classifier_cpu.yaml`; test accuracy)
and YOLO from scratch (`yolov8n.yaml`; test mAP50), both under an iteration budget: every arm trains the same
number of batches whatever its size (whole epochs closest to it, as Step 5's `budget: iterations`). The seed is
the training seed and the control arms' generation seed. Gain recovered = (arm - real) / (oracle - real).

Results go to `<out>/results.jsonl` as each run ends; a re-run skips finished runs and prints the table, so a
run cut short still tabulates every finished seed (`--table-only` just prints it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from neu_det_pipeline.artifacts import MANIFEST_FILE, train_rows
from neu_det_pipeline.classifier.checkpoints import BEST_FILE, load_classifier
from neu_det_pipeline.classifier.data import (
    ClassifierDataset,
    load_data,
    steps_per_epoch,
    synthetic_examples,
)
from neu_det_pipeline.classifier.training import ClassifierTraining
from neu_det_pipeline.config import PipelineConfig, UtilityConfig, load_config
from neu_det_pipeline.evaluation.control_arms import (
    ARM_FOLDERS,
    CLASSICAL,
    COPY_PASTE,
    RealImage,
    round_robin_targets,
    write_arm_dataset,
)
from neu_det_pipeline.evaluation.utility import (
    Dataset,
    TrainImage,
    YoloRunner,
    build_dataset,
    epochs_for_budget,
)
from neu_det_pipeline.io import read_jsonl
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step0_prepare import STEP as STEP0

REPO = Path(__file__).resolve().parents[1]
ARMS = ("real", CLASSICAL, COPY_PASTE)
ORACLE = "oracle"
SPLIT_SEED = 0


def prepare(args: argparse.Namespace, fraction: float) -> tuple[PipelineConfig, Path]:
    """Step 0 of one kept fraction (with its YOLO export); returns its config and folder."""
    out = args.out / f"fraction-{fraction:g}"
    config = load_config(args.config, [f"data.root={args.data}", f"run.output_dir={out}", f"run.seed={SPLIT_SEED}",
                                       f"data.train_fraction={fraction}", "prepare.yolo_export=true"])
    if not (out / STEP0.name / "summary.json").is_file():  # prepared once: parallel --models processes only read it
        run_step(STEP0, config)
    return config, out / STEP0.name


def arm_dir(args: argparse.Namespace, fraction: float, arm: str, seed: int) -> Path:
    return args.out / f"fraction-{fraction:g}" / f"{ARM_FOLDERS[arm]}-g{seed}"


def make_arm(config: PipelineConfig, step0: Path, folder: Path, arm: str, seed: int) -> tuple[list[dict[str, Any]], float]:
    """One added image per kept real image (ratio 1), generated with `seed`; returns the rows and seconds."""
    if (folder / MANIFEST_FILE).is_file():  # made in the preparation pass
        return read_jsonl(folder / MANIFEST_FILE), 0.0
    images = [RealImage.from_step0(row, Path(config.data.root)) for row in train_rows(step0)]
    counts = {name: sum(image.image_class == name for image in images) for name in config.data.classes}
    started = time.perf_counter()
    rows = write_arm_dataset(folder, arm, round_robin_targets(images, counts, seed), images, seed, config.data.classes)
    return rows, time.perf_counter() - started


def train_classifier(args: argparse.Namespace, config: PipelineConfig, step0: Path, added: Path | None, seed: int, out: Path) -> dict[str, Any]:
    """Step 6's data and training code on Step 0's real splits plus an arm's images; test accuracy."""
    data = load_data(config, step0, None)
    if added is not None:
        data.splits["train"] += synthetic_examples(added, "step4", data.classes)
    section = config.classifier
    epochs = max(1, round(args.classifier_iterations / steps_per_epoch(len(data.splits["train"]), section.batch_size, section.gradient_accumulation_steps, 1)))
    ratio = epochs / section.epochs  # the preset's schedule (switch epoch, warm-up) scaled to the run's length
    trained = config.model_copy(update={
        "run": config.run.model_copy(update={"seed": seed, "output_dir": out}),
        "classifier": section.model_copy(update={"epochs": epochs, "switch_epoch": max(1, round(section.switch_epoch * ratio)),
                                                 "warmup_epochs": section.warmup_epochs * ratio}),
    })
    started = time.perf_counter()
    training = ClassifierTraining(trained, data, out)
    result = training.run()
    best, _ = load_classifier(out / BEST_FILE)
    test = training.evaluate(ClassifierDataset(data.splits["test"], section.image_size, seed), best.to(training.accelerator.device))
    return {"metric": round(test["accuracy"], 5), "macro_f1": round(test["macro_f1"], 5), "epochs": epochs,
            "batches": epochs * training.steps_per_epoch, "train_images": len(data.splits["train"]),
            "best_epoch": result.best_epoch, "seconds": round(time.perf_counter() - started, 1)}


def train_yolo(args: argparse.Namespace, config: PipelineConfig, step0: Path, added: list[TrainImage], seed: int, name: str) -> dict[str, Any]:
    """Step 5's YOLO runner on Step 0's YOLO export plus an arm's images; test mAP50."""
    rows = read_jsonl(step0 / MANIFEST_FILE)

    def items(split: str) -> list[TrainImage]:
        yolo = step0 / "yolo"
        return [TrainImage(r["id"], yolo / "images" / split / f"{r['id']}{Path(r['source']).suffix.lower()}", yolo / "labels" / split / f"{r['id']}.txt")
                for r in rows if r["split"] == split]

    utility = UtilityConfig(budget="iterations", iterations=args.yolo_iterations, imgsz=args.yolo_imgsz, batch=args.yolo_batch, workers=2)
    root = args.out / "yolo"
    real = items("train")
    train = real + added
    epochs = epochs_for_budget(len(train), utility, len(real))
    data_yaml = build_dataset(root / "datasets", Dataset(name, train, len(real), len(added)), items("val"), items("test"), config.data.classes)
    started = time.perf_counter()
    result = YoloRunner("yolov8n.yaml", utility, root, "cpu").run(data_yaml, f"{name}-seed{seed}", seed, epochs)
    return {"metric": result["map50"], "map50_95": result["map50_95"], "epochs": epochs, "batches": result["batches"],
            "train_images": len(train), "seconds": round(time.perf_counter() - started, 1)}


def arm_images(folder: Path) -> list[TrainImage]:
    return [TrainImage(row["name"], folder / row["yolo_image"], folder / row["yolo_label"]) for row in read_jsonl(folder / MANIFEST_FILE)]


def table(results: list[dict[str, Any]], fractions: list[float], models: list[str]) -> str:
    """Markdown: per fraction and arm, mean +- std over seeds of accuracy and mAP50, and the gain recovered."""
    def values(model: str, fraction: float, arm: str) -> list[float]:
        return [r["metric"] for r in results if r["model"] == model and r["arm"] == arm and r["fraction"] == (1.0 if arm == ORACLE else fraction)]

    def cell(numbers: list[float]) -> str:
        if not numbers:
            return "-"
        spread = f" ± {statistics.pstdev(numbers):.3f}" if len(numbers) > 1 else ""
        return f"{statistics.fmean(numbers):.3f}{spread} (n={len(numbers)})"

    def recovered(model: str, fraction: float, arm: str) -> str:
        arm_v, real_v, oracle_v = values(model, fraction, arm), values(model, fraction, "real"), values(model, fraction, ORACLE)
        if not (arm_v and real_v and oracle_v) or statistics.fmean(oracle_v) <= statistics.fmean(real_v):
            return "-"
        return f"{(statistics.fmean(arm_v) - statistics.fmean(real_v)) / (statistics.fmean(oracle_v) - statistics.fmean(real_v)):+.2f}"

    names = {"classifier": "classifier accuracy", "yolo": "YOLO mAP50"}
    lines = ["| kept fraction | arm | " + " | ".join(f"{names[m]} | gain recovered" for m in models) + " |",
             "|---|---|" + "---|---|" * len(models)]
    for fraction in fractions:
        for arm in (*ARMS, ORACLE):
            cells = [f"{cell(values(m, fraction, arm))} | {recovered(m, fraction, arm) if arm in ARM_FOLDERS else ''}" for m in models]
            lines.append(f"| {fraction:g} | {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "neu-det")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "classifier_cpu.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_control_arms")
    parser.add_argument("--fractions", type=lambda text: [float(f) for f in text.split(",")], default=[0.1, 0.3])
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1])
    parser.add_argument("--models", type=lambda text: [m for m in text.split(",") if m], default=["classifier", "yolo"],
                        help="comma-separated: classifier, yolo (empty: only prepare the data)")
    parser.add_argument("--classifier-iterations", type=int, default=200, help="training batches per classifier run")
    parser.add_argument("--yolo-iterations", type=int, default=200, help="training batches per YOLO run")
    parser.add_argument("--yolo-imgsz", type=int, default=128)
    parser.add_argument("--yolo-batch", type=int, default=16)
    parser.add_argument("--arms", type=lambda text: [a for a in text.split(",") if a], default=[*ARMS, ORACLE],
                        help="comma-separated: real, real+classical, real+copy_paste, oracle (parallel processes can split them)")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.jsonl"
    results = read_jsonl(results_file) if results_file.is_file() else []
    done = {(r["model"], r["fraction"], r["arm"], r["seed"]) for r in results}
    if args.table_only:
        print(table(results, args.fractions, args.models))
        return

    # Every Step 0 folder and arm dataset first, in this process: `--models classifier` and `--models yolo` can
    # then run side by side, each on its own share of the cores.
    prepared = {fraction: prepare(args, fraction) for fraction in [*args.fractions, 1.0]}
    for seed in args.seeds:
        for fraction in args.fractions:
            for arm in ARM_FOLDERS:
                rows, seconds = make_arm(*prepared[fraction], arm_dir(args, fraction, arm, seed), arm, seed)
                print(f"{arm} seed {seed} fraction {fraction:g}: {len(rows)} images in {seconds:.1f} s", flush=True)
    for seed in args.seeds:  # seed-major: a run cut short leaves whole seeds
        for fraction in [*args.fractions, 1.0]:
            config, step0 = prepared[fraction]
            for arm in [arm for arm in ((ORACLE,) if fraction == 1.0 else ARMS) if arm in args.arms]:
                added_dir = arm_dir(args, fraction, arm, seed) if arm in ARM_FOLDERS else None
                for model in args.models:
                    if (model, fraction, arm, seed) in done:
                        continue
                    run_name = f"f{fraction:g}-{arm}-g{seed}"
                    if model == "classifier":
                        result = train_classifier(args, config, step0, added_dir, seed, args.out / "classifier" / f"{run_name}-seed{seed}")
                    else:
                        result = train_yolo(args, config, step0, arm_images(added_dir) if added_dir else [], seed, run_name)
                    record = {"model": model, "fraction": fraction, "arm": arm, "seed": seed, **result}
                    print(json.dumps(record), flush=True)
                    with results_file.open("a", encoding="utf-8") as file:
                        file.write(json.dumps(record) + "\n")
                    results.append(record)
    print(table(results, args.fractions, args.models))


if __name__ == "__main__":
    main()
