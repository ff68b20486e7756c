"""`neu-det metrics REAL_DIR SYNTH_DIR` (image metrics of any two folders) and `neu-det compare RUN_DIR ...`
(experiments side by side)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from rich.table import Table as RichTable

from neu_det_pipeline.config import load_config
from neu_det_pipeline.errors import DataError, PipelineError
from neu_det_pipeline.evaluation.fidelity import MIN_IMAGES
from neu_det_pipeline.evaluation.images import check_same_classes, read_image_folder
from neu_det_pipeline.evaluation.report import FIGURES_DIR, Section, Table, fidelity_sections, fmt, write_reports
from neu_det_pipeline.io import read_json, write_json
from neu_det_pipeline.recipe import CONFIG_FILE, console, new_progress

METRICS_FILE = "metrics.json"
STEP5 = "step5_evaluate"


def metrics_command(real_dir: Path, synth_dir: Path, out: Path, config_path: Path | None, overrides: list[str]) -> dict[str, Any]:
    """Score SYNTH_DIR against REAL_DIR; writes metrics.json, report.md and report.html into `out`."""
    from neu_det_pipeline.evaluation.suite import MetricSuite

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
        suite = MetricSuite(config, track)
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
    console.print(table)
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
    row["LPIPS diversity synthetic / real"] = f"{fmt(metrics['lpips']['diversity']['synthetic']['all'])} / {fmt(metrics['lpips']['diversity']['real']['all'])}"
    row["edge-SSIM to source"] = fmt(metrics["edge_ssim_to_source"]["all"])
    row["curated / rejected"] = f"{metrics['curation']['kept']} / {metrics['curation']['rejected']}"
    for name, dataset in metrics["utility"]["datasets"].items():
        row[f"mAP50 {name}"] = f"{fmt(dataset['map50']['mean'])} ± {fmt(dataset['map50']['std'])}"
    for name, gain in (metrics["utility"].get("gain_recovered") or {}).items():
        row[f"gain recovered {name}"] = fmt(gain, 3)
    return row


def compare_command(run_dirs: list[Path], out: Path) -> None:
    """One table of every run's Step 5 headline numbers, and each run's config differences from the first."""
    runs = []
    for run_dir in run_dirs:
        step5 = run_dir / STEP5
        if not (step5 / METRICS_FILE).is_file():
            raise PipelineError(f"{step5 / METRICS_FILE} is missing; run `python -m neu_det_pipeline.step5_evaluate` for {run_dir} "
                                f"first (RUN_DIR is a run.output_dir)")
        config = yaml.safe_load((step5 / CONFIG_FILE).read_text(encoding="utf-8"))
        runs.append((run_dir, _headline(read_json(step5 / METRICS_FILE)), _flatten(config)))
    labels = [f"{'baseline' if i == 0 else chr(ord('A') + i - 1)}: {run_dir}" for i, (run_dir, _, _) in enumerate(runs)]
    keys = list(dict.fromkeys(key for _, headline, _ in runs for key in headline))
    table = Table(["metric", *labels], [[key, *(headline.get(key, "—") for _, headline, _ in runs)] for key in keys])
    base = runs[0][2]
    ignored = {"run.output_dir"}
    diff_rows = []
    for label, (_, _, config) in zip(labels[1:], runs[1:]):
        changed = sorted(k for k in set(base) | set(config) if k not in ignored and base.get(k) != config.get(k))
        diff_rows += [[label, key, str(base.get(key)), str(config.get(key))] for key in changed] or [[label, "(no difference)", "", ""]]
    sections = [Section("Headline numbers", tables=[table]),
                Section("Config differences from the baseline", tables=[Table(["run", "key", "baseline", "this run"], diff_rows)])]
    out.mkdir(parents=True, exist_ok=True)
    write_reports(out, "neu-det compare", sections, stem="compare")
    rich_table = RichTable(title="neu-det compare", title_justify="left")
    for column in table.header:
        rich_table.add_column(column)
    for row in table.rows:
        rich_table.add_row(*row)
    console.print(rich_table)
    console.print(f"compare: {out / 'compare.html'}", highlight=False, soft_wrap=True)
