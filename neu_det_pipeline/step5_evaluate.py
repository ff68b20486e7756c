"""Step 5: does the synthetic data help? Image metrics, curation, YOLO utility with a real-data oracle, report.

    python -m neu_det_pipeline.step5_evaluate --config configs/base.yaml

Synthetic images (Step 4) are compared with the real training split (Step 0) per class and overall: KID, FID and
k-NN precision/recall in each `evaluation.features` space (the real test split against the training split gives
each metric's noise floor), LPIPS diversity and distances (to the source, to the nearest real image), edge-SSIM
to the source, an LBP texture class matrix and the CLIP score of each prompt. Curation rejects degenerate,
memorised and (with a good enough real-data detector) off-class or label-inconsistent images. Then YOLO is
trained on real data alone, with curated synthetic images at each `evaluation.utility.synthetic_ratios`, and,
under the low-data protocol (`data.train_fraction` < 1), on the kept plus held-back real images (the oracle),
every run tested on the same real test split. Finished YOLO runs are reused when the step resumes.

Outputs in `<run.output_dir>/step5_evaluate/`:
    metrics.json            every number below, with sample sizes
    per_image.jsonl         one row per synthetic image: distances, scores, detector check, curation verdict
    curated/                manifest.jsonl (kept Step 4 rows), yolo/ (data.yaml, images, labels), rejections.jsonl
    report.md, report.html  tables, charts, LBP heatmaps, contact sheets, rejected examples (report/ holds the figures)
    utility/                YOLO datasets (links) and runs
    summary.json
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from neu_det_pipeline.cli import step_main
from neu_det_pipeline.data.split import HELD_OUT_SPLIT
from neu_det_pipeline.evaluation import curation
from neu_det_pipeline.evaluation.features import extractor_dtype
from neu_det_pipeline.evaluation.inputs import StepInputs, read_step_inputs
from neu_det_pipeline.evaluation.perceptual import edge_ssim
from neu_det_pipeline.evaluation.step_report import write_step_report
from neu_det_pipeline.evaluation.suite import MetricSuite, per_class_means
from neu_det_pipeline.evaluation.utility import (
    Dataset,
    YoloRunner,
    build_dataset,
    consistency_by_class,
    gain_recovered,
    image_consistency,
    summarise_runs,
    synthetic_subset,
)
from neu_det_pipeline.io import write_json, write_jsonl
from neu_det_pipeline.models import DTYPE_NAMES, inference_dtype, resolve_device
from neu_det_pipeline.recipe import Step, StepContext, console

CURATED_DIR = "curated"
UTILITY_DIR = "utility"
METRICS_FILE = "metrics.json"
PER_IMAGE_FILE = "per_image.jsonl"


def _paired_metrics(ctx: StepContext, suite: MetricSuite, inputs: StepInputs) -> dict[str, list[float]]:
    """Each synthetic image against its own source: LPIPS and edge-SSIM."""
    train = inputs.real["train"]
    index = {image.name: i for i, image in enumerate(train.images)}
    sources = train.pixels[[index[row["source"]] for row in inputs.synth_rows]]
    synth = inputs.synth.pixels
    lpips = suite.lpips(synth, sources)
    ssim = [edge_ssim(a, b) for a, b in ctx.track(zip(synth, sources), len(synth), "edge-SSIM to source")]
    return {"lpips_to_source": [round(float(v), 5) for v in lpips], "edge_ssim_to_source": [round(v, 5) for v in ssim]}


def _clip_scores(ctx: StepContext, inputs: StepInputs) -> list[float]:
    """CLIPScore (Hessel et al. 2021, torchmetrics' scale): max(100 * cos(image, prompt), 0)."""
    from neu_det_pipeline.captions.scorers import CLIPScorer
    from neu_det_pipeline.evaluation.images import gray_to_rgb

    cfg = ctx.config
    device = resolve_device(cfg.run.device)
    scorer = CLIPScorer.from_pretrained(cfg.models.clip, device, inference_dtype(device, cfg.run.mixed_precision))
    size = cfg.evaluation.batch_size
    scores: list[float] = []
    for start in ctx.track(range(0, len(inputs.synth_rows), size), -(-len(inputs.synth_rows) // size), "CLIP score"):
        rows = inputs.synth_rows[start : start + size]
        images = scorer.encode_images(gray_to_rgb(inputs.synth.pixels[start : start + size])).float()
        texts = scorer.encode_texts([row.get("prompt") or "" for row in rows]).float()
        cosine = (images / images.norm(dim=1, keepdim=True) * (texts / texts.norm(dim=1, keepdim=True))).sum(dim=1)
        scores += [round(float(max(100 * c, 0.0)), 4) for c in cosine]
    return scores


def _utility_and_curation(ctx: StepContext, inputs: StepInputs) -> dict[str, Any]:
    """Real-only YOLO runs, label consistency and curation with their detector, then the synthetic and oracle runs."""
    cfg = ctx.config
    ucfg, ccfg, classes = cfg.evaluation.utility, cfg.evaluation.curation, cfg.data.classes
    out = {"label_rule": None, "consistency": None, "checks": None, "runs": [], "datasets": {}}
    if not ucfg.enabled:
        out["label_rule"] = "skipped: evaluation.utility.enabled is false (no detector)"
        return {**out, **_curate(ctx, inputs, None)}

    root = ctx.out_dir / UTILITY_DIR
    runner = YoloRunner(cfg.models.yolo, ucfg, root, "cpu" if resolve_device(cfg.run.device).type == "cpu" else "0")
    val, test = inputs.yolo_items("val"), inputs.yolo_items("test")
    real_train = inputs.yolo_items("train")

    def train(dataset: Dataset) -> list[dict[str, Any]]:
        data_yaml = build_dataset(root / "datasets", dataset, val, test, classes)
        results = [runner.run(data_yaml, f"{dataset.name}-seed{seed}", seed) for seed in ctx.track(ucfg.seeds, len(ucfg.seeds), f"YOLO {dataset.name}")]
        out["datasets"][dataset.name] = {"n_real": dataset.n_real, "n_synthetic": dataset.n_synthetic, **summarise_runs(results)}
        out["runs"] += [{**r, "dataset": dataset.name} for r in results]
        return results

    real_runs = train(Dataset("real", real_train, len(real_train), 0))

    # Label consistency under the first real-only detector; the curation rule trusts it only if it is good enough.
    weights = root / real_runs[0]["weights"]
    detections = runner.predict(weights, [inputs.step4_dir / row["yolo_image"] for row in inputs.synth_rows])
    checks = {row["name"]: image_consistency(row["class"], row["boxes"], found, classes) for row, found in zip(inputs.synth_rows, detections)}
    out["checks"] = checks
    out["consistency"] = consistency_by_class(inputs.synth_rows, checks, classes)
    detector_map50 = out["datasets"]["real"]["map50"]["mean"]
    use_rule = ccfg.label_consistency and detector_map50 >= ccfg.min_detector_map50
    if not ccfg.label_consistency:
        out["label_rule"] = "skipped: evaluation.curation.label_consistency is false"
    elif not use_rule:
        out["label_rule"] = f"skipped: real-only detector mAP50 {detector_map50:.3f} < evaluation.curation.min_detector_map50 {ccfg.min_detector_map50}"
    else:
        out["label_rule"] = f"applied (real-only detector mAP50 {detector_map50:.3f})"
    out.update(_curate(ctx, inputs, checks if use_rule else None))

    kept_names = [row["name"] for row in out["kept"]]
    by_name = {row["name"]: row for row in out["kept"]}
    synthetic = []
    for ratio in ucfg.synthetic_ratios:
        if ratio == 0:
            continue
        chosen = synthetic_subset(kept_names, len(real_train), ratio, cfg.run.seed)
        name = f"real+synthetic-{ratio:g}"
        train(Dataset(name, real_train + inputs.synthetic_items([by_name[n] for n in chosen]), len(real_train), len(chosen)))
        synthetic.append(name)
    heldout = inputs.yolo_items(HELD_OUT_SPLIT)
    if ucfg.oracle and heldout:
        train(Dataset("oracle", real_train + heldout, len(real_train) + len(heldout), 0))
        real_map, oracle_map = out["datasets"]["real"]["map50"]["mean"], out["datasets"]["oracle"]["map50"]["mean"]
        out["gain_recovered"] = {name: gain_recovered(real_map, out["datasets"][name]["map50"]["mean"], oracle_map) for name in synthetic}
    return out


def _curate(ctx: StepContext, inputs: StepInputs, checks: dict[str, Any] | None) -> dict[str, Any]:
    train = inputs.real["train"]
    kept, rejected, copy_similarity = curation.curate(inputs.synth_rows, inputs.synth.pixels, train.pixels,
                                                      [image.name for image in train.images], ctx.config.evaluation.curation, checks)
    curation.write_curated(ctx.out_dir / CURATED_DIR, inputs.step4_dir, kept, rejected, ctx.config.data.classes)
    return {"kept": kept, "rejected": rejected, "copy_similarity": copy_similarity}


def run(ctx: StepContext) -> dict[str, Any]:
    cfg, out_dir = ctx.config, ctx.out_dir
    classes = cfg.data.classes
    inputs = read_step_inputs(ctx.upstream_dir("step0_prepare"), ctx.upstream_dir("step4_generate"), Path(cfg.data.root), classes)
    for split, folder in inputs.real.items():
        folder.load(ctx.track, f"loading real {split}")
    inputs.synth.load(ctx.track, "loading synthetic")

    # 1. Image metrics: unpaired (against the real training split), then paired with each image's source.
    suite = MetricSuite(cfg, ctx.track)
    reference = {"real_test": inputs.real["test"]} if "test" in inputs.real else {}
    metrics = suite.compare(inputs.real["train"], inputs.synth, reference)
    per_image = metrics.pop("per_image")
    per_image.update(_paired_metrics(ctx, suite, inputs))
    labels = inputs.synth.labels
    metrics["lpips"]["to_source"] = per_class_means(per_image["lpips_to_source"], labels, classes)
    metrics["edge_ssim_to_source"] = per_class_means(per_image["edge_ssim_to_source"], labels, classes)
    if cfg.evaluation.clip_score:
        per_image["clip_score"] = _clip_scores(ctx, inputs)
        metrics["clip_score"] = per_class_means(per_image["clip_score"], labels, classes)

    # 2. Detector-based checks, curation and the utility runs.
    result = _utility_and_curation(ctx, inputs)
    rejected = {r.name: r for r in result["rejected"]}
    metrics["curation"] = {
        "kept": len(result["kept"]), "rejected": len(rejected), "label_rule": result["label_rule"],
        "rejections": curation.rejection_table(result["rejected"], classes),
        "kept_per_class": dict(Counter(row["class"] for row in result["kept"])),
    }
    metrics["label_consistency"] = result["consistency"]
    metrics["utility"] = {"datasets": result["datasets"], "runs": result["runs"], "gain_recovered": result.get("gain_recovered"),
                          "train_fraction": cfg.data.train_fraction, "test_images": len(inputs.real_rows.get("test", []))}
    metrics["throughput"] = suite.throughput()

    rows = []
    for i, row in enumerate(inputs.synth_rows):
        verdict = rejected.get(row["name"])
        check = (result["checks"] or {}).get(row["name"])
        rows.append({"name": row["name"], "class": row["class"], "source": row["source"],
                     **{key: values[i] for key, values in per_image.items()},
                     "copy_similarity": result["copy_similarity"][i], "detector": check,
                     "kept": verdict is None, "reason": verdict.reason if verdict else None, "detail": verdict.detail if verdict else None})
    write_jsonl(out_dir / PER_IMAGE_FILE, rows)
    write_json(out_dir / METRICS_FILE, metrics)
    write_step_report(out_dir, metrics, inputs, rows, cfg)
    console.print(f"report: {out_dir / 'report.html'}", highlight=False, soft_wrap=True)
    headline = {name: d["map50"]["mean"] for name, d in result["datasets"].items()}
    first = cfg.evaluation.features[0]
    overall = metrics["fidelity"][first]["synthetic"]["all"]
    return {
        "synthetic_images": len(inputs.synth_rows),
        "curated_images": len(result["kept"]),
        "rejected_by_reason": dict(Counter(r.reason for r in result["rejected"])),
        "label_rule": result["label_rule"],
        f"kid_{first}": overall["kid_mean"],
        f"precision_{first}": overall["precision"],
        f"recall_{first}": overall["recall"],
        "map50": headline,
        "gain_recovered": result.get("gain_recovered"),
        # Per feature space (Inception fp32, DINOv3 never fp16).
        "dtype": {name: DTYPE_NAMES[extractor_dtype(name, cfg)] for name in cfg.evaluation.features},
        "outputs": {"metrics": METRICS_FILE, "report": "report.html", "curated": f"{CURATED_DIR}/manifest.jsonl"},
    }


def headline(summary: dict[str, Any]) -> str:
    """YOLO mAP50 of real-only vs the best real+synthetic mix (the question Step 5 answers), then the KID."""
    parts = []
    map50 = summary.get("map50") or {}
    if "real" in map50:
        mixes = {name: value for name, value in map50.items() if name.startswith("real+synthetic")}
        best = max(mixes, key=mixes.get) if mixes else None
        parts.append(f"mAP50 real {map50['real']:.3f}" + (f" vs {best} {mixes[best]:.3f}" if best else ""))
    kid = next(((key, value) for key, value in summary.items() if key.startswith("kid_")), None)
    if kid:
        parts.append(f"{kid[0].replace('_', ' ').upper()} {kid[1]:.4f}")
    return ", ".join(parts)


STEP = Step(
    name="step5_evaluate",
    title="fidelity, diversity, curation, YOLO utility, report",
    run=run,
    config_keys=("evaluation", "models.clip", "models.dinov3", "models.yolo", "data.classes", "data.train_fraction",
                 "run.seed", "run.device", "run.mixed_precision"),
    requires=("step0_prepare", "step4_generate"),
    key_figure=headline,
)



def main(argv: list[str] | None = None) -> None:
    step_main(STEP.name, argv)


if __name__ == "__main__":
    main()
