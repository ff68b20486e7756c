"""`neu-det metrics REAL_DIR SYNTH_DIR` (image metrics of any two folders) and `neu-det compare RUN_DIR ...`
(experiments side by side)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from rich.table import Table as RichTable

from neu_det_pipeline.config import load_config
from neu_det_pipeline.cost import duration, memory, run_cost, step_costs
from neu_det_pipeline.errors import DataError, PipelineError
from neu_det_pipeline.evaluation.fidelity import MIN_IMAGES
from neu_det_pipeline.evaluation.images import check_same_classes, read_image_folder
from neu_det_pipeline.evaluation.report import FIGURES_DIR, Section, Table, console_tables, fidelity_sections, fmt, write_reports
from neu_det_pipeline.io import read_json, write_json
from neu_det_pipeline.recipe import CONFIG_FILE, console, new_progress

METRICS_FILE = "metrics.json"
STEP5 = "step5_evaluate"
COST_NOTE = ("Cost: every step of the run folder (steps reused from another run included: what the experiment costs on its "
             "own); wall time and GPU-h (wall time x processes on a GPU) summed, peak GPU memory (reserved) and peak RAM "
             "(with child processes) the largest of any step and process.")
STEP_COST_NOTE = ("Peak memory per step is the largest process's; GPU-h = wall time x processes on a GPU. (reused): the step's "
                  "outputs and cost come from an earlier run (`neu-det reuse`).")


def metrics_command(real_dir: Path, synth_dir: Path, out: Path, config_path: Path | None, overrides: list[str]) -> dict[str, Any]:
    """Score SYNTH_DIR against REAL_DIR; writes metrics.json, report.md and report.html into `out`."""
    from neu_det_pipeline.evaluation.suite import FEATURE_CACHE_DIR, MetricSuite

    config = load_config(config_path, overrides)
    real = read_image_folder(real_dir, config.data.classes if (real_dir / "IMAGES").is_dir() else None)
    synth = read_image_folder(synth_dir, real.classes if synth_dir.joinpath("manifest.jsonl").is_file() else None)
    check_same_classes(real, synth)
    needed = max(MIN_IMAGES, config.evaluation.pr_neighbourhood + 1)
    for folder in (real, synth):
        if len(folder) < needed:
            raise DataError(f"{folder.root} holds {len(folder)} images; KID, FID and precision/recall (k="
                            f"{config.evaluation.pr_neighbourhood}) need at least {needed}: add images or lower evaluation.pr_neighbourhood")
    with new_progress() as progress:
        def track(items, total, description):
            task = progress.add_task(description, total=total)
            for item in items:
                yield item
                progress.advance(task)
            progress.update(task, visible=False)

        real.load(track, "loading real")
        synth.load(track, "loading synthetic")
        suite = MetricSuite(config, track, config.evaluation.feature_cache_dir or out / FEATURE_CACHE_DIR)
        metrics = suite.compare(real, synth)
    metrics.pop("per_image")
    metrics.update(real_dir=str(real_dir), synth_dir=str(synth_dir), layouts={"real": real.layout, "synthetic": synth.layout},
                   skipped={"real": real.skipped, "synthetic": synth.skipped}, throughput=suite.throughput())
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / METRICS_FILE, metrics)
    write_reports(out, f"Image metrics: {synth_dir} vs {real_dir}", fidelity_sections(metrics, out / FIGURES_DIR, ""))
    table = RichTable(title="image metrics (overall)", title_justify="left")
    for column in ("features", "n real", "n synthetic", "KID mean ± std", "FID", "precision", "recall"):
        table.add_column(column)
    for feature, comparisons in metrics["fidelity"].items():
        m = comparisons["synthetic"]["all"]
        fid = fmt(m["fid"], 2) + ("" if m["fid_reliable"] else " (n < dim: biased)")
        table.add_row(feature, str(m["n_real"]), str(m["n_synth"]), f"{fmt(m['kid_mean'])} ± {fmt(m['kid_std'])}", fid, fmt(m["precision"], 3), fmt(m["recall"], 3))
    if table.rows:
        console.print(table)
    for entry in metrics["not_computed"]:
        console.print(f"not computed: {entry['metric']}: {entry['why']}", highlight=False, soft_wrap=True)
    console.print(f"metrics: {out / METRICS_FILE}  report: {out / 'report.html'}", highlight=False, soft_wrap=True)
    return metrics


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _headline(metrics: dict[str, Any]) -> dict[str, str]:
    """The numbers one compares across experiments."""
    row = {}
    for feature, comparisons in metrics["fidelity"].items():
        m = comparisons["synthetic"]["all"]
        row[f"KID ({feature})"] = f"{fmt(m['kid_mean'])} ± {fmt(m['kid_std'])}"
        row[f"precision / recall ({feature})"] = f"{fmt(m['precision'], 3)} / {fmt(m['recall'], 3)}"
    diversity = metrics["lpips"]["diversity"] or {"synthetic": {}, "real": {}}  # None: LPIPS did not load
    row["LPIPS diversity synthetic / real"] = f"{fmt(diversity['synthetic'].get('all'))} / {fmt(diversity['real'].get('all'))}"
    row["IC-LPIPS"] = fmt(((metrics["lpips"].get("ic_lpips") or {}).get("value") or {}).get("all"))
    row["edge-SSIM to source"] = fmt(metrics["edge_ssim_to_source"]["all"])
    row["curated / rejected"] = f"{metrics['curation']['kept']} / {metrics['curation']['rejected']}"
    for name, dataset in metrics["utility"]["datasets"].items():
        row[f"mAP50 {name}"] = f"{fmt(dataset['map50']['mean'])} ± {fmt(dataset['map50']['std'])}"
    for name, gain in (metrics["utility"].get("gain_recovered") or {}).items():
        row[f"gain recovered {name}"] = fmt(gain, 3)
    return row


def compare_command(run_dirs: list[Path], out: Path) -> None:
    """One row per run: its Step 5 headline numbers beside what the run cost (every step's summary), then the cost per
    step and each run's config differences from the first. compare.md, compare.html and a console table."""
    runs = []
    for run_dir in run_dirs:
        step5 = run_dir / STEP5
        if not (step5 / METRICS_FILE).is_file():
            raise PipelineError(f"{step5 / METRICS_FILE} is missing; run `python -m neu_det_pipeline.step5_evaluate` for {run_dir} "
                                f"first (RUN_DIR is a run.output_dir)")
        config = yaml.safe_load((step5 / CONFIG_FILE).read_text(encoding="utf-8"))
        runs.append((run_dir, _headline(read_json(step5 / METRICS_FILE)), _flatten(config), step_costs(run_dir)))
    names = [run_dir.name for run_dir, *_ in runs]
    labels = names if len(set(names)) == len(names) else [str(run_dir) for run_dir, *_ in runs]
    keys = list(dict.fromkeys(key for _, headline, _, _ in runs for key in headline))
    cost_columns = ["wall time", "GPU-h", "peak GPU memory", "peak RAM", "s/image (Step 4)", "images/s (Step 4)"]
    rows = []
    for label, (_, headline, _, steps) in zip(labels, runs):
        total = run_cost(steps)
        rows.append([label, *(headline.get(key, "—") for key in keys), duration(total["wall_time_s"]), f"{total['gpu_hours']:.3f}",
                     memory(total["peak_gpu_reserved_mb"]), memory(total["peak_rss_with_children_mb"]),
                     fmt(total["seconds_per_image"], 3), fmt(total["images_per_s"], 3)])
    table = Table(["experiment", *keys, *cost_columns], rows)
    experiments = Table(["experiment", "run folder", "steps with a recorded cost"],
                        [[label, str(run_dir), str(len(steps))] for label, (run_dir, _, _, steps) in zip(labels, runs)])
    step_rows = [[label, step["step"] + (" (reused)" if step["reused_from"] else ""), duration(step["wall_time_s"]), str(step["processes"]),
                  f"{step['gpu_hours']:.4f}", memory(step["peak_gpu_allocated_mb"]), memory(step["peak_gpu_reserved_mb"]),
                  memory(step["peak_rss_mb"]), memory(step["peak_rss_with_children_mb"])]
                 for label, (_, _, _, steps) in zip(labels, runs) for step in steps]
    step_table = Table(["experiment", "step", "wall time", "processes", "GPU-h", "peak GPU allocated", "peak GPU reserved",
                        "peak RAM (process)", "peak RAM (with children)"], step_rows)
    base = runs[0][2]
    ignored = {"run.output_dir"}
    diff_rows = []
    for label, (_, _, config, _) in zip(labels[1:], runs[1:]):
        changed = sorted(k for k in set(base) | set(config) if k not in ignored and base.get(k) != config.get(k))
        diff_rows += [[label, key, str(base.get(key)), str(config.get(key))] for key in changed] or [[label, "(no difference)", "", ""]]
    sections = [
        Section("Quality, utility and cost", [COST_NOTE], tables=[table, experiments]),
        Section("Cost per step", [STEP_COST_NOTE], tables=[step_table]),
        Section(f"Config differences from {labels[0]}", tables=[Table(["experiment", "key", labels[0], "this experiment"], diff_rows)]),
    ]
    out.mkdir(parents=True, exist_ok=True)
    write_reports(out, "neu-det compare", sections, stem="compare")
    console.print("[bold]neu-det compare[/]: one row per experiment")
    quality = range(1, 1 + len(keys))
    for part in console_tables(table, console.width, {"quality and utility": quality, "cost": range(quality.stop, len(table.header))}):
        console.print(part)
    console.print(COST_NOTE, highlight=False, soft_wrap=True)
    console.print(f"compare: {out / 'compare.html'} (cost per step and config differences there)", highlight=False, soft_wrap=True)
