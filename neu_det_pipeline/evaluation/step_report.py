"""Step 5's report: the utility headline first, then fidelity, pairing, label consistency, curation, pictures."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.evaluation.curation import REASONS
from neu_det_pipeline.evaluation.report import (
    FIGURES_DIR,
    Section,
    Table,
    bar_chart,
    fidelity_sections,
    fmt,
    image_grid,
    write_reports,
)
from neu_det_pipeline.io import save_image

REJECTED_EXAMPLES_PER_REASON = 6


def _mean_std(stats: dict[str, float]) -> str:
    return f"{fmt(stats['mean'])} ± {fmt(stats['std'])}"


def _utility_section(utility: dict[str, Any], classes: list[str], figures: Path) -> Section:
    datasets = utility["datasets"]
    if not datasets:
        return Section("Downstream utility (YOLO on the real test split)", ["Not run: evaluation.utility.enabled is false."])
    per_class: dict[str, dict[str, list[float]]] = {}
    for run in utility["runs"]:
        for name in classes:
            per_class.setdefault(run["dataset"], {}).setdefault(name, []).append(run["ap50_per_class"].get(name, 0.0))
    rows = [[name, str(d["n_real"]), str(d["n_synthetic"]), _mean_std(d["map50"]), _mean_std(d["map50_95"]), str(len(d["seeds"])),
             *(fmt(sum(v) / len(v), 3) for v in per_class[name].values())] for name, d in datasets.items()]
    path = figures / "utility_map50.png"
    bar_chart(list(datasets), [d["map50"]["mean"] for d in datasets.values()], [d["map50"]["std"] for d in datasets.values()],
              "test mAP50", "YOLO trained on each dataset, tested on real test images", path)
    text = [f"Every run: same epochs, image size and seeds; tested on the same {utility['test_images']} real test images. "
            f"± is the spread over seeds. data.train_fraction = {utility['train_fraction']}."]
    if utility.get("gain_recovered"):
        text.append("Gain recovered = (mAP real+synthetic - mAP real) / (mAP oracle - mAP real): " +
                    ", ".join(f"{name}: {fmt(value, 3)}" for name, value in utility["gain_recovered"].items()) +
                    " (— where the oracle does not beat real-only).")
    header = ["dataset", "real images", "synthetic images", "mAP50", "mAP50-95", "seeds", *(f"AP50 {c}" for c in classes)]
    return Section("Downstream utility (YOLO on the real test split)", text, [Table(header, rows)],
                   [(path.relative_to(figures.parent).as_posix(), "test mAP50 per training set (mean ± spread over seeds)")])


def _paired_section(metrics: dict[str, Any], classes: list[str]) -> Section:
    clip = metrics.get("clip_score") or {}
    rows = [[c, fmt(metrics["lpips"]["to_source"].get(c)), fmt(metrics["edge_ssim_to_source"].get(c)), fmt(clip.get(c), 2)] for c in [*classes, "all"]]
    return Section("Each synthetic image against its source", [
        "LPIPS to source: how far generation moved from the real image it started from; edge-SSIM: SSIM of Sobel "
        "edge maps (1 = same structure, so the carried boxes still fit); CLIP score: max(100 cos(image, prompt), 0)."],
        [Table(["class", "LPIPS to source", "edge-SSIM to source", "CLIP score"], rows)])


def _consistency_section(metrics: dict[str, Any], classes: list[str]) -> Section:
    consistency = metrics["label_consistency"]
    curation = metrics["curation"]
    tables = []
    if consistency:
        tables.append(Table(["class", "images", "box recall @ IoU 0.5", "top detection agrees"],
                            [[c, str(v["images"]), fmt(v["box_recall"], 3), fmt(v["class_agreement"], 3)] for c, v in consistency.items()],
                            "Label consistency (real-only YOLO on the synthetic images)"))
    by_reason = curation["rejections"]
    tables.append(Table(["reason", *classes, "total"], [[r, *(str(by_reason[r][c]) for c in classes), str(sum(by_reason[r].values()))] for r in REASONS],
                        "Rejections by reason and class"))
    return Section("Label consistency and curation", [
        f"Kept {curation['kept']} synthetic images, rejected {curation['rejected']}. Label rule: {curation['label_rule']}."], tables)


def _pictures(out_dir: Path, inputs: Any, rows: list[dict[str, Any]], config: PipelineConfig) -> Section:
    figures = out_dir / FIGURES_DIR
    rng = random.Random(config.run.seed)
    n = config.evaluation.report_samples
    images = []
    train, synth = inputs.real["train"], inputs.synth
    verdicts = {row["name"]: ("kept" if row["kept"] else row["reason"]) for row in rows}
    for name in config.data.classes:
        real_idx, synth_idx = train.indices_of(name), synth.indices_of(name)
        if not synth_idx:
            continue
        real_pick = sorted(rng.sample(real_idx, min(n, len(real_idx))))
        synth_pick = sorted(rng.sample(synth_idx, min(n, len(synth_idx))))
        sheet = image_grid([
            (f"real {name}", [train.pixels[i] for i in real_pick], [train.images[i].name for i in real_pick]),
            (f"synthetic {name}", [synth.pixels[i] for i in synth_pick], [verdicts[synth.images[i].name] for i in synth_pick]),
        ])
        path = figures / f"contact_{name}.png"
        save_image(sheet, path)
        images.append((path.relative_to(out_dir).as_posix(), f"{name}: real training images (top), synthetic with their curation verdict (bottom)"))
    index = {image.name: i for i, image in enumerate(synth.images)}
    rejected_rows = []
    for reason in REASONS:
        chosen = [row for row in rows if row["reason"] == reason][:REJECTED_EXAMPLES_PER_REASON]
        if chosen:
            rejected_rows.append((reason, [synth.pixels[index[row["name"]]] for row in chosen], [row["name"] for row in chosen]))
    if rejected_rows:
        path = figures / "rejected_examples.png"
        save_image(image_grid(rejected_rows), path)
        images.append((path.relative_to(out_dir).as_posix(), "rejected synthetic images, one row per reason (details in per_image.jsonl)"))
    return Section("Real vs synthetic, and rejected examples", images=images)


def write_step_report(out_dir: Path, metrics: dict[str, Any], inputs: Any, rows: list[dict[str, Any]], config: PipelineConfig) -> None:
    classes = config.data.classes
    figures = out_dir / FIGURES_DIR
    sections = [
        _utility_section(metrics["utility"], classes, figures),
        *fidelity_sections(metrics, figures, ""),
        _paired_section(metrics, classes),
        _consistency_section(metrics, classes),
        _pictures(out_dir, inputs, rows, config),
    ]
    write_reports(out_dir, f"Step 5 evaluation: {config.run.output_dir}", sections)
