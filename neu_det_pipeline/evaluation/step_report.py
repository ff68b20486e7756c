"""Step 5's report: the utility headline first, then fidelity, pairing, label consistency, curation, pictures."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.evaluation.curation import REASONS
from neu_det_pipeline.evaluation.report import (
    FIGURES_DIR,
    KEPT_COLOUR,
    REJECTED_COLOUR,
    Section,
    Table,
    bar_chart,
    fidelity_sections,
    fmt,
    Tile,
    image_grid,
    labelled_sheet,
    score_strips,
    write_reports,
)
from neu_det_pipeline.io import save_image

REJECTED_EXAMPLES_PER_REASON = 6
SHEET_COLUMNS = ["real source", "synthetic: kept", "synthetic: rejected"]
SHEET_TILE = 112  # two class sheets side by side in the report's 1100 px


def _mean_std(stats: dict[str, float]) -> str:
    return f"{fmt(stats['mean'])} ± {fmt(stats['std'])}"


def _interval(comparison: dict[str, Any] | None) -> str:
    if not comparison:
        return "—"
    low, high = comparison["ci95"]
    return f"{comparison['difference']:+.3f} [{low:+.3f}, {high:+.3f}]"


def _utility_section(utility: dict[str, Any], classes: list[str], figures: Path) -> Section:
    datasets = utility["datasets"]
    title = "Downstream utility (YOLO on the real test split)"
    if not datasets:
        return Section(title, ["Not run: evaluation.utility.enabled is false."])
    comparisons = utility.get("comparisons") or {}
    recovered = utility.get("gain_recovered") or {}
    rows = [[name, str(d["n_real"]), str(d["n_synthetic"]), str(d.get("batches", "")), _mean_std(d["map50"]), _mean_std(d["map50_95"]),
             str(d.get("runs", len(d["seeds"]))), "" if name == "real" else _interval(comparisons.get(f"{name} vs real")),
             fmt(recovered.get(name), 3) if name in recovered else "",
             *(fmt(d["ap50_per_class"].get(c), 3) if c in d.get("ap50_per_class", {}) else "—" for c in classes)]
            for name, d in datasets.items()]
    path = figures / "utility_map50.png"
    bar_chart(list(datasets), [d["map50"]["mean"] for d in datasets.values()], [d["map50"]["std"] for d in datasets.values()],
              "test mAP50", "YOLO trained on each dataset, tested on real test images", path)
    budget = ("the same number of training batches (whole epochs closest to it)" if utility.get("budget") == "iterations"
              else "the same number of epochs")
    text = [f"Arms: {', '.join(utility.get('arms', []))}. Every run: {budget}, the same image size; tested on the same "
            f"{utility['test_images']} real test images. Added images {'replace as many real ones' if utility.get('mode') == 'replace' else 'join the real ones'} "
            f"(mode {utility.get('mode', 'add')}); the control arms add as many images as the synthetic arm, made from the same real images. "
            f"Training seeds {utility.get('training_seeds')}, generation seeds {utility.get('generation_seeds')}: ± is the spread over "
            f"all runs of an arm. data.train_fraction = {utility['train_fraction']}.",
            "Δ vs real: mean-over-runs mAP50 minus real's on the test split, with its 95 % paired bootstrap interval "
            "(test images resampled with replacement, every run of both arms scored on the same resample; the matches of "
            "each detection in its own image are fixed, so this is the test-set sampling error, not the seed spread)."]
    text += [f"Not run: {arm}: {why}." for arm, why in (utility.get("arms_not_run") or {}).items()]
    if recovered:
        text.append("Gain recovered = (mAP arm - mAP real) / (mAP oracle - mAP real) (— where the oracle does not beat real-only).")
    header = ["dataset", "real images", "added images", "batches", "mAP50", "mAP50-95", "runs", "Δ mAP50 vs real [95 % CI]",
              "gain recovered", *(f"AP50 {c}" for c in classes)]
    tables = [Table(header, rows)]
    versus = [[key.split(" vs ")[0], key.split(" vs ")[1], _interval(value)] for key, value in comparisons.items()
              if key.startswith("real+synthetic") and not key.endswith(" vs real")]
    if versus:
        tables.append(Table(["synthetic arm", "control arm", "Δ mAP50 [95 % CI]"], versus, "Synthetic against each control arm (paired bootstrap)"))
    return Section(title, text, tables, [(path.relative_to(figures.parent).as_posix(), "test mAP50 per training set (mean ± spread over runs)")])


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


def _distribution_section(metrics: dict[str, Any], rows: list[dict[str, Any]], classes: list[str], figures: Path) -> Section | None:
    """The distribution score per class, and which images each `keep` threshold drops."""
    summary = metrics["curation"].get("distribution")
    if not summary:
        return None
    scored = [row for row in rows if row.get("distribution_score") is not None]
    present = [c for c in classes if any(row["class"] == c for row in scored)]
    dropped_names = {policy: {n for names in by_class.values() for n in names} for policy, by_class in summary["drops"].items()}
    scores = {c: [row["distribution_score"] for row in scored if row["class"] == c] for c in present}
    dropped = {policy: {c: [row["name"] in names for row in scored if row["class"] == c] for c in present} for policy, names in dropped_names.items()}
    path = figures / "distribution_scores.png"
    score_strips(scores, dropped, f"{summary['score']} distance to the real class ({summary['features']} features)", path)
    table_rows = []
    for c in present:
        values = np.asarray(scores[c])
        table_rows.append([c, str(len(values)), fmt(float(np.median(values)), 3), fmt(float(values.max()), 3),
                           *(", ".join(summary["drops"][policy].get(c, [])) or "—" for policy in ("top_k", "top_p"))])
    text = [f"Score: {summary['score']} distance of each synthetic image to the real training images of its class in "
            f"{summary['features']} space (lower: more typical). Policy in use: keep = {summary['keep']}. The table shows what "
            f"each threshold drops among the images the rules kept: top_k = {summary['top_k']} per class, "
            f"top_p = {summary['top_p']} of each class."]
    return Section("Distribution-based curation", text,
                   [Table(["class", "images", "median score", "max score", f"dropped by top_k={summary['top_k']}",
                           f"dropped by top_p={summary['top_p']}"], table_rows)],
                   [(path.relative_to(figures.parent).as_posix(), "distribution score per class; crosses: images a threshold drops")])


def _pictures(out_dir: Path, inputs: Any, rows: list[dict[str, Any]], config: PipelineConfig) -> Section:
    figures = out_dir / FIGURES_DIR
    rng = random.Random(config.run.seed)
    n = config.evaluation.report_samples
    images = []
    train, synth = inputs.real["train"], inputs.synth
    by_name = {row["name"]: row for row in rows}
    real_index = {image.name: i for i, image in enumerate(train.images)}
    for name in config.data.classes:
        synth_idx = synth.indices_of(name)
        if not synth_idx:
            continue
        sheet_rows = []
        for i in sorted(rng.sample(synth_idx, min(n, len(synth_idx)))):
            row = by_name[synth.images[i].name]
            source = Tile(train.pixels[real_index[row["source"]]])
            made = Tile(synth.pixels[i], "kept" if row["kept"] else row["reason"], KEPT_COLOUR if row["kept"] else REJECTED_COLOUR)
            sheet_rows.append((row["name"], [source, made, None] if row["kept"] else [source, None, made]))
        sheet = labelled_sheet(sheet_rows, SHEET_COLUMNS, f"{name}: each row a synthetic image beside the real image it was made from, "
                                                          "in the kept or the rejected column (the reason under it)", SHEET_TILE)
        path = figures / f"contact_{name}.png"
        save_image(sheet, path)
        images.append((path.relative_to(out_dir).as_posix(), f"{name}: synthetic images beside their real source, kept or rejected by curation"))
    index = {image.name: i for i, image in enumerate(synth.images)}
    rejected_rows = []
    for reason in REASONS:
        chosen = [row for row in rows if row["reason"] == reason][:REJECTED_EXAMPLES_PER_REASON]
        if chosen:
            rejected_rows.append((reason, [synth.pixels[index[row["name"]]] for row in chosen], [row["name"] for row in chosen]))
    if rejected_rows:
        path = figures / "rejected_examples.png"
        save_image(image_grid(rejected_rows, title="rejected synthetic images, one row per reason"), path)
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
        _distribution_section(metrics, rows, classes, figures),
        _pictures(out_dir, inputs, rows, config),
    ]
    sections = [section for section in sections if section is not None]
    write_reports(out_dir, f"Step 5 evaluation: {config.run.output_dir}", sections)
