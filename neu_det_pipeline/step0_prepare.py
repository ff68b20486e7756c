"""Step 0: parse and validate NEU-DET, split it, and derive masks, training copies and a YOLO export.

    python -m neu_det_pipeline.step0_prepare --config configs/base.yaml data.root=/data/NEU-DET

Low-data protocol: with `data.train_fraction` < 1, a seeded stratified fraction of the training split stays
`train` (what Steps 1-4 see); the rest becomes `train_heldout`, kept only for Step 5's real-data oracle.

Outputs in `<run.output_dir>/step0_prepare/`:
    manifest.jsonl          one validated image per line (class, split, boxes, derived files)
    splits/{train,val,test}.txt  (+ train_heldout.txt with data.train_fraction < 1)
    masks/<id>.png          binary box mask at image size
    images/<id>.png         training copy at `prepare.resolution`, 3 identical channels
    yolo/                   images/, labels/ per split and data.yaml (ultralytics)
    contact_sheet.png       a row of samples per class with boxes drawn
    summary.json            counts, class statistics, every problem found and what was done
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image
from rich.table import Table

from neu_det_pipeline.artifacts import MANIFEST_FILE
from neu_det_pipeline.cli import step_main
from neu_det_pipeline.config import PipelineConfig, config_hash
from neu_det_pipeline.data.export import (
    box_mask,
    training_copy,
    write_yolo_data_yaml,
    yolo_label_lines,
)
from neu_det_pipeline.data.neu_det import Problem, Sample, discover, load_sample
from neu_det_pipeline.data.split import (
    HELD_OUT_SPLIT,
    SPLITS,
    hold_out_training,
    stratified_split,
)
from neu_det_pipeline.data.visualize import class_stats, contact_sheet, stats_table
from neu_det_pipeline.errors import DataError
from neu_det_pipeline.io import (
    FAST_PNG,
    atomic_write_bytes,
    atomic_write_text,
    save_image,
    write_jsonl,
)
from neu_det_pipeline.recipe import Step, StepContext, console

T = TypeVar("T")
R = TypeVar("R")

# Below this many images, starting worker processes costs more than it saves.
MIN_IMAGES_FOR_WORKERS = 64
PROBLEM_ROWS_SHOWN = 20


def dataset_listing(config: PipelineConfig) -> str:
    """Fingerprint of every file under data.root (path, size, mtime): cheap change detection."""
    root = Path(config.data.root)
    entries = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(folder, name))
            entries.append((os.path.relpath(os.path.join(folder, name), root), stat.st_size, stat.st_mtime_ns))
    return config_hash([str(root.resolve()), entries])


def _parallel_map(ctx: StepContext, fn: Callable[[T], R], items: list[T], description: str) -> Iterator[R]:
    workers = ctx.config.prepare.workers or len(os.sched_getaffinity(0))
    if workers == 1 or len(items) < MIN_IMAGES_FOR_WORKERS:
        yield from ctx.track(map(fn, items), len(items), description)
        return
    with ProcessPoolExecutor(workers) as pool:
        chunk = max(1, len(items) // (workers * 8))
        yield from ctx.track(pool.map(fn, items, chunksize=chunk), len(items), description)


def _derived_paths(out_dir: Path, sample: Sample, split: str) -> dict[str, Path]:
    return {
        "mask": out_dir / "masks" / f"{sample.id}.png",
        "image": out_dir / "images" / f"{sample.id}.png",
        "yolo_image": out_dir / "yolo" / "images" / split / f"{sample.id}{sample.image_path.suffix.lower()}",
        "yolo_label": out_dir / "yolo" / "labels" / split / f"{sample.id}.txt",
    }


def _write_derived(job: tuple[Sample, str], out_dir: Path, resolution: int, classes: list[str], yolo: bool) -> bool:
    """Write one image's derived files; False when an earlier (interrupted) run already wrote them all."""
    sample, split = job
    paths = _derived_paths(out_dir, sample, split)
    if not yolo:
        del paths["yolo_image"], paths["yolo_label"]
    if all(p.exists() for p in paths.values()):
        return False
    with Image.open(sample.image_path) as image:
        copy = training_copy(image, resolution)
    save_image(box_mask(sample.boxes, sample.width, sample.height), paths["mask"])
    save_image(copy, paths["image"], **FAST_PNG)
    if yolo:
        atomic_write_bytes(paths["yolo_image"], sample.image_path.read_bytes())
        atomic_write_text(paths["yolo_label"], yolo_label_lines(sample.boxes, sample.width, sample.height, classes))
    return True


def _problems_table(problems: list[Problem]) -> Table:
    table = Table(title=f"{len(problems)} input problems", title_justify="left")
    for column in ("file", "problem", "action"):
        table.add_column(column)
    for problem in problems[:PROBLEM_ROWS_SHOWN]:
        table.add_row(problem.file, problem.problem, problem.action)
    if len(problems) > PROBLEM_ROWS_SHOWN:
        table.add_row("...", f"{len(problems) - PROBLEM_ROWS_SHOWN} more in summary.json", "")
    return table


def _contact_sheet_samples(samples: Iterable[Sample], per_class: int, seed: int) -> dict[str, list[Sample]]:
    by_class: dict[str, list[Sample]] = {}
    for sample in sorted(samples, key=lambda s: s.id):
        by_class.setdefault(sample.image_class, []).append(sample)
    return {name: random.Random(seed).sample(group, min(per_class, len(group))) for name, group in by_class.items()}


def run(ctx: StepContext) -> dict[str, Any]:
    cfg, out_dir = ctx.config, ctx.out_dir
    root, classes = Path(cfg.data.root), cfg.data.classes

    # 1. Find and validate every image/annotation pair.
    layout, pairs = discover(root, cfg.data.layout, classes)
    if not pairs:
        raise DataError(f"{root} holds no images or annotations; set data.root=DIR to a NEU-DET folder")
    samples: list[Sample] = []
    problems: list[Problem] = []
    for sample, found in _parallel_map(ctx, partial(load_sample, classes=classes, root=root), pairs, "validating"):
        if found and cfg.data.strict:
            raise DataError(f"{root / found[0].file}: {found[0].problem}; fix or remove the file, or set data.strict=false to skip and report it")
        problems += found
        if sample is not None:
            samples.append(sample)
    for problem in problems:
        if problem.fatal_to_image:
            ctx.skip(problem.file, problem.problem)
    if not samples:
        raise DataError(f"no valid image in {root}: every pair had a problem (see above); fix the files or set data.root=DIR")

    # 2. Split by image class; the low-data protocol holds part of the training split back.
    split_cfg = cfg.data.split
    labels = {s.id: s.image_class for s in samples}
    splits = stratified_split(labels, (split_cfg.train, split_cfg.val, split_cfg.test), cfg.run.seed)
    if cfg.data.train_fraction < 1:
        splits["train"], splits[HELD_OUT_SPLIT] = hold_out_training(splits["train"], labels, cfg.data.train_fraction, cfg.run.seed)
    split_of = {sample_id: name for name, ids in splits.items() for sample_id in ids}

    # 3. Derived files per image (skipped where an interrupted run already wrote them).
    write = partial(_write_derived, out_dir=out_dir, resolution=cfg.prepare.resolution, classes=classes, yolo=cfg.prepare.yolo_export)
    jobs = [(s, split_of[s.id]) for s in samples]
    written = sum(_parallel_map(ctx, write, jobs, "masks, copies, YOLO"))
    if cfg.prepare.yolo_export:
        write_yolo_data_yaml(out_dir / "yolo", classes, [name for name in SPLITS if splits[name]])

    # 4. Manifest, split lists, statistics, contact sheet.
    records = []
    for sample in samples:
        paths = _derived_paths(out_dir, sample, split_of[sample.id])
        records.append({**sample.to_record(root), "split": split_of[sample.id],
                        "mask": paths["mask"].relative_to(out_dir).as_posix(),
                        "image": paths["image"].relative_to(out_dir).as_posix()})
    write_jsonl(out_dir / MANIFEST_FILE, records)
    for name, ids in splits.items():
        atomic_write_text(out_dir / "splits" / f"{name}.txt", "".join(f"{i}\n" for i in ids))
    stats = class_stats(samples, classes)
    split_counts = {name: Counter(s.image_class for s in samples if split_of[s.id] == name) for name in splits}
    sheet_samples = _contact_sheet_samples(samples, cfg.prepare.contact_sheet_samples, cfg.run.seed)
    save_image(contact_sheet(sheet_samples, classes), out_dir / "contact_sheet.png")

    if problems:
        console.print(_problems_table(problems))
    console.print(stats_table(stats, split_counts))
    actions = Counter(p.action for p in problems)
    return {
        "layout": layout,
        "data_root": str(root),
        "pairs_found": len(pairs),
        "images_valid": len(samples),
        "images_skipped": actions["skipped image"],
        "images_written": written,
        "boxes": sum(len(s.boxes) for s in samples),
        "boxes_clipped": actions["clipped box"],
        "boxes_dropped": actions["dropped box"],
        "split_sizes": {name: len(ids) for name, ids in splits.items()},
        "class_stats": stats,
        "problems": [vars(p) for p in problems],
    }


STEP = Step(
    name="step0_prepare",
    title="parse, validate, split, masks, YOLO export",
    run=run,
    # prepare.workers changes speed, not outputs.
    config_keys=("data", "prepare.resolution", "prepare.yolo_export", "prepare.contact_sheet_samples", "run.seed"),
    input_fingerprint=dataset_listing,
    key_figure=lambda summary: f"{summary['images_valid']} images, {summary['boxes']} boxes, {summary['images_skipped']} skipped",
)


def main(argv: list[str] | None = None) -> None:
    step_main(STEP.name, argv)


if __name__ == "__main__":
    main()
