"""Step 5: does the synthetic data help? Image metrics, curation, YOLO utility with a real-data oracle, report.

    python -m neu_det_pipeline.step5_evaluate --config configs/base.yaml

Synthetic images (Step 4) are compared with the real training split (Step 0) per class and overall: KID, FID and
k-NN precision/recall in each `evaluation.features` space (the real test split against the training split gives
each metric's noise floor), LPIPS diversity and distances (to the source, to the nearest real image), edge-SSIM
to the source, an LBP texture class matrix and the CLIP score of each prompt. Curation rejects degenerate,
memorised and (with a good enough real-data detector) off-class or label-inconsistent images, and with
`evaluation.curation.keep: top_k | top_p` the images farthest from their real class in feature space (every image's
distribution score is reported either way). IC-LPIPS and, on box crops, KID and LPIPS are reported beside the
whole-image metrics; metrics.json records library versions, feature extractors with their weights, input sizes and
dtypes, and the LPIPS network's and the CLIP score model's (`provenance`).
Features are cached per image, LPIPS diversities per class (`evaluation.feature_cache_dir`). A feature space,
LPIPS or CLIP that cannot load (offline, no weights) leaves its metrics out and the others run: metrics.json
(`not_computed`), the report and the console name each one, why, and the fix. Then YOLO is trained on each arm of
`evaluation.utility.arms`: real data alone, curated synthetic images at each `evaluation.utility.synthetic_ratios`,
the two control arms with as many images made from the same real images (classical albumentations augmentation;
copy-paste of real defect boxes), and, under the low-data protocol
(`data.train_fraction` < 1), the kept plus held-back real images (the oracle); added images join the real ones or
replace as many (`mode`), every arm trains the same epochs or the same number of batches (`budget`), per training
seed and per generation seed (`generation.seeds`). Every run is tested on the same real test split; each arm's
mAP50 minus real's (and the synthetic arm's minus each control arm's) gets a 95 % paired bootstrap interval over
the test images (see `evaluation/utility.py`). A configured arm with nothing to train on (the oracle without
held-back images) is named with why in metrics.json (`utility.arms_not_run`), the summary and the report.
Finished YOLO runs are reused when the step resumes.

Outputs in `<run.output_dir>/step5_evaluate/`:
    metrics.json            every number below, with sample sizes
    per_image.jsonl         one row per synthetic image: distances, scores, distribution score, detector check, verdict
    curated/                manifest.jsonl (kept Step 4 rows), yolo/ (data.yaml, images, labels), rejections.jsonl
    report.md, report.html  tables, charts, LBP heatmaps, score distributions, contact sheets, rejected examples
                            (report/ holds the figures)
    feature_cache/          per-image features, per-class LPIPS diversities (unless `evaluation.feature_cache_dir` points elsewhere)
    utility/                YOLO datasets (links) and runs (runs/<run>/result.json, test_predictions.json)
    control_arms/<classical|copy_paste>-g<generation seed>/
                            the control arms' images in Step 4's layout: images/<class>/, labels/ (VOC),
                            masks/, yolo/ (data.yaml, images, labels), manifest.jsonl (source, boxes, transforms
                            or pasted donor boxes); `classifier.synthetic: classical | copy_paste` trains Step 6 on them
    summary.json            with `cost.parts_s`: seconds spent loading images, on metrics, curation, utility (YOLO) and report
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from neu_det_pipeline.cli import step_main
from neu_det_pipeline.data.split import HELD_OUT_SPLIT
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.evaluation import curation
from neu_det_pipeline.evaluation.control_arms import (
    ARM_FOLDERS,
    RealImage,
    arm_dataset_dir,
    write_arm_dataset,
)
from neu_det_pipeline.evaluation.features import extractor_dtype
from neu_det_pipeline.evaluation.inputs import StepInputs, read_step_inputs
from neu_det_pipeline.evaluation.perceptual import edge_ssim
from neu_det_pipeline.evaluation.step_report import write_step_report
from neu_det_pipeline.evaluation.suite import FEATURE_CACHE_DIR, MetricSuite, per_class_means
from neu_det_pipeline.evaluation.utility import (
    Dataset,
    TrainImage,
    YoloRunner,
    arms_not_run,
    build_dataset,
    compare_arms,
    consistency_by_class,
    epochs_for_budget,
    gain_recovered,
    image_consistency,
    replace_subset,
    summarise_runs,
    synthetic_subset,
)
from neu_det_pipeline.generation.plan import generation_seeds
from neu_det_pipeline.io import write_json, write_jsonl
from neu_det_pipeline.models import DTYPE_NAMES, resolve_device
from neu_det_pipeline.recipe import Step, StepContext, console

CURATED_DIR = "curated"
UTILITY_DIR = "utility"
METRICS_FILE = "metrics.json"
PER_IMAGE_FILE = "per_image.jsonl"


def _paired_metrics(ctx: StepContext, suite: MetricSuite, inputs: StepInputs) -> dict[str, list[float | None]]:
    """Each synthetic image against its own source: LPIPS (None when LPIPS cannot load) and edge-SSIM."""
    train = inputs.real["train"]
    index = {image.name: i for i, image in enumerate(train.images)}
    sources = train.pixels[[index[row["source"]] for row in inputs.synth_rows]]
    synth = inputs.synth.pixels
    lpips = suite.lpips_or_skip("LPIPS to source")
    ssim = [edge_ssim(a, b) for a, b in ctx.track(zip(synth, sources), len(synth), "edge-SSIM to source")]
    return {"lpips_to_source": [round(float(v), 5) for v in lpips(synth, sources)] if lpips else [None] * len(synth),
            "edge_ssim_to_source": [round(v, 5) for v in ssim]}


def _clip_scores(ctx: StepContext, inputs: StepInputs) -> list[float]:
    """CLIPScore (Hessel et al. 2021, torchmetrics' scale): max(100 * cos(image, prompt), 0)."""
    from neu_det_pipeline.captions.scorers import CLIPScorer
    from neu_det_pipeline.evaluation.images import gray_to_rgb

    cfg = ctx.config
    scorer = CLIPScorer.from_pretrained(cfg.models.clip, resolve_device(cfg.run.device), extractor_dtype("clip", cfg))
    size = cfg.evaluation.batch_size
    scores: list[float] = []
    for start in ctx.track(range(0, len(inputs.synth_rows), size), -(-len(inputs.synth_rows) // size), "CLIP score"):
        rows = inputs.synth_rows[start : start + size]
        images = scorer.encode_images(gray_to_rgb(inputs.synth.pixels[start : start + size])).float()
        texts = scorer.encode_texts([row.get("prompt") or "" for row in rows]).float()
        cosine = (images / images.norm(dim=1, keepdim=True) * (texts / texts.norm(dim=1, keepdim=True))).sum(dim=1)
        scores += [round(float(max(100 * c, 0.0)), 4) for c in cosine]
    return scores


def _utility_and_curation(ctx: StepContext, inputs: StepInputs, scores: np.ndarray | None) -> dict[str, Any]:
    """Real-only YOLO runs, label consistency and curation with their detector, then every other arm's runs."""
    cfg = ctx.config
    ucfg, ccfg, classes = cfg.evaluation.utility, cfg.evaluation.curation, cfg.data.classes
    out = {"label_rule": None, "consistency": None, "checks": None, "runs": [], "datasets": {}}
    if not ucfg.enabled:
        out["label_rule"] = "skipped: evaluation.utility.enabled is false (no detector)"
        return {**out, **_curate(ctx, inputs, None, scores)}

    root = ctx.out_dir / UTILITY_DIR
    runner = YoloRunner(cfg.models.yolo, ucfg, root, "cpu" if resolve_device(cfg.run.device).type == "cpu" else "0")
    val, test = inputs.yolo_items("val"), inputs.yolo_items("test")
    real_train = inputs.yolo_items("train")
    arm_runs: dict[str, list[dict[str, Any]]] = {}
    data_yamls: dict[str, Any] = {}

    def train(dataset: Dataset, arm: str, generation_seed: int | None = None) -> list[dict[str, Any]]:
        """All training seeds of one dataset, filed under its arm (`arm` pools generation seeds)."""
        data_yaml = build_dataset(root / "datasets", dataset, val, test, classes)
        epochs = epochs_for_budget(len(dataset.train), ucfg, len(real_train))
        results = [{**runner.run(data_yaml, f"{dataset.name}-seed{seed}", seed, epochs), "dataset": arm, "generation_seed": generation_seed}
                   for seed in ctx.track(ucfg.seeds, len(ucfg.seeds), f"YOLO {dataset.name}")]
        data_yamls.setdefault("test", data_yaml)
        arm_runs.setdefault(arm, []).extend(results)
        out["datasets"][arm] = {"n_real": dataset.n_real, "n_synthetic": dataset.n_synthetic, **summarise_runs(arm_runs[arm])}
        out["runs"] += results
        return results

    real_runs = train(Dataset("real", real_train, len(real_train), 0), "real")

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
    out.update(_curate(ctx, inputs, checks if use_rule else None, scores))

    seeds = generation_seeds(cfg)
    for generation_seed in seeds:
        for arm, dataset in _added_datasets(ctx, inputs, out["kept"], real_train, generation_seed, len(seeds) > 1):
            train(dataset, arm, generation_seed)
    heldout = inputs.yolo_items(HELD_OUT_SPLIT)
    if "oracle" in ucfg.arms and heldout:
        train(Dataset("oracle", real_train + heldout, len(real_train) + len(heldout), 0), "oracle")
    out["arms_not_run"] = arms_not_run(ucfg, len(heldout))
    out["comparisons"] = compare_arms(arm_runs, root, data_yamls["test"], ucfg.bootstrap_resamples, cfg.run.seed, classes)
    if "oracle" in out["datasets"]:
        real_map, oracle_map = out["datasets"]["real"]["map50"]["mean"], out["datasets"]["oracle"]["map50"]["mean"]
        out["gain_recovered"] = {name: gain_recovered(real_map, d["map50"]["mean"], oracle_map)
                                 for name, d in out["datasets"].items() if name not in ("real", "oracle")}
    return out


def _added_datasets(ctx: StepContext, inputs: StepInputs, kept: list[dict[str, Any]], real_train: list[TrainImage],
                    generation_seed: int, several_seeds: bool) -> list[tuple[str, Dataset]]:
    """(arm, dataset) of every ratio: curated images of this generation seed, and the control arms made from the
    same real images (as many, per class alike), each added to or replacing real training images (`mode`)."""
    cfg = ctx.config
    ucfg = cfg.evaluation.utility
    seeds = generation_seeds(cfg)
    mine = [row for row in kept if row.get("generation_seed", seeds[0]) == generation_seed]
    by_name = {row["name"]: row for row in mine}
    ratios = [ratio for ratio in ucfg.synthetic_ratios if ratio > 0]
    if not ratios:
        return []
    chosen = {ratio: synthetic_subset(list(by_name), len(real_train), ratio, generation_seed) for ratio in ratios}
    added = {"real+synthetic": list(enumerate(inputs.synthetic_items([by_name[name] for name in chosen[max(ratios)]])))}
    real_images = {row["id"]: RealImage.from_step0(row, Path(cfg.data.root)) for row in inputs.real_rows["train"]}
    targets = [real_images[by_name[name]["source"]] for name in chosen[max(ratios)]]  # a smaller ratio's are a prefix
    for arm, folder in ARM_FOLDERS.items():
        if arm in ucfg.arms:
            arm_dir = arm_dataset_dir(ctx.out_dir, folder, generation_seed)
            rows = write_arm_dataset(arm_dir, arm, targets, list(real_images.values()), generation_seed, cfg.data.classes)
            if len(rows) < len(targets):
                missing = Counter(t.image_class for t in targets) - Counter(row["class"] for row in rows)
                console.print(f"[yellow]note:[/] {arm} made {len(rows)} of {len(targets)} images: no free room for a pasted box "
                              f"in the training images of {', '.join(sorted(missing))}", highlight=False)
            added[arm] = [(row["slot"], TrainImage(row["name"], arm_dir / row["yolo_image"], arm_dir / row["yolo_label"])) for row in rows]
    datasets = []
    for ratio in ratios:
        for arm, slots in added.items():
            if arm not in ucfg.arms:
                continue
            extra = [item for slot, item in slots if slot < len(chosen[ratio])]
            train = replace_subset(real_train, extra, generation_seed) if ucfg.mode == "replace" else real_train + extra
            name = f"{arm}-{ratio:g}"
            datasets.append((name, Dataset(f"{name}-g{generation_seed}" if several_seeds else name, train, len(train) - len(extra), len(extra))))
    return datasets


def _curate(ctx: StepContext, inputs: StepInputs, checks: dict[str, Any] | None, scores: np.ndarray | None) -> dict[str, Any]:
    ctx.part("curation")
    train = inputs.real["train"]
    kept, rejected, copy_similarity = curation.curate(inputs.synth_rows, inputs.synth.pixels, train.pixels,
                                                      [image.name for image in train.images], ctx.config.evaluation.curation, checks, scores)
    curation.write_curated(ctx.out_dir / CURATED_DIR, inputs.step4_dir, kept, rejected, ctx.config.data.classes)
    ctx.part("utility")
    return {"kept": kept, "rejected": rejected, "copy_similarity": copy_similarity}


def _distribution_scores(suite: MetricSuite, inputs: StepInputs) -> np.ndarray | None:
    """Each synthetic image's distance to its real class (`evaluation.curation.score`), from the features the
    metrics extracted; None (and why) when that feature space did not load."""
    ccfg = suite.cfg.curation
    space = ccfg.score_features or suite.cfg.features[0]
    features = suite.computed_features.get(space)
    if features is None:
        suite.skip("distribution score (curation keep)", f"the {space} feature space did not load (see its line); every image the "
                                                          f"rules keep is kept")
        return None
    return curation.distribution_scores(features["synthetic"], inputs.synth.labels, features["real"], inputs.real["train"].labels,
                                        ccfg.score, ccfg.score_neighbours)


def _score_summary(ecfg: Any, scores: np.ndarray | None, rows: list[dict[str, Any]], rejected: dict[str, Any]) -> dict[str, Any] | None:
    """The score's settings and, for each `keep` threshold, which images it drops among those the rules keep."""
    if scores is None:
        return None
    ccfg = ecfg.curation
    labels = [row["class"] for row in rows]
    candidates = np.array([rejected.get(row["name"]) is None or rejected[row["name"]].reason == "off-distribution" for row in rows])
    drops = {}
    for policy in curation.POLICIES:
        keep = curation.policy_keeps(scores, labels, candidates, policy, ccfg.top_k, ccfg.top_p)
        drops[policy] = {name: [rows[i]["name"] for i in np.flatnonzero(candidates & ~keep) if labels[i] == name] for name in sorted(set(labels))}
    return {"score": ccfg.score, "features": ccfg.score_features or ecfg.features[0], "neighbours": ccfg.score_neighbours,
            "keep": ccfg.keep, "top_k": ccfg.top_k, "top_p": ccfg.top_p, "drops": drops}


def run(ctx: StepContext) -> dict[str, Any]:
    cfg, out_dir = ctx.config, ctx.out_dir
    classes = cfg.data.classes
    ctx.part("loading")
    inputs = read_step_inputs(ctx.upstream_dir("step0_prepare"), ctx.upstream_dir("step4_generate"), Path(cfg.data.root), classes)
    for split, folder in inputs.real.items():
        folder.load(ctx.track, f"loading real {split}")
    inputs.synth.load(ctx.track, "loading synthetic")

    # 1. Image metrics: unpaired (against the real training split), then paired with each image's source.
    ctx.part("metrics")
    suite = MetricSuite(cfg, ctx.track, cfg.evaluation.feature_cache_dir or out_dir / FEATURE_CACHE_DIR)
    reference = {"real_test": inputs.real["test"]} if "test" in inputs.real else {}
    metrics = suite.compare(inputs.real["train"], inputs.synth, reference)
    per_image = metrics.pop("per_image")
    per_image.update(_paired_metrics(ctx, suite, inputs))
    labels = inputs.synth.labels
    metrics["lpips"]["to_source"] = per_class_means(per_image["lpips_to_source"], labels, classes)
    metrics["edge_ssim_to_source"] = per_class_means(per_image["edge_ssim_to_source"], labels, classes)
    if cfg.evaluation.clip_score:
        try:
            per_image["clip_score"] = _clip_scores(ctx, inputs)
            metrics["clip_score"] = per_class_means(per_image["clip_score"], labels, classes)
            metrics["provenance"]["clip_score"] = {"model": cfg.models.clip, "dtype": DTYPE_NAMES[extractor_dtype("clip", cfg)]}
        except PipelineError as exc:
            suite.skip("CLIP score", str(exc))
    scores = _distribution_scores(suite, inputs)
    if scores is not None:
        per_image["distribution_score"] = [None if np.isnan(v) else round(float(v), 4) for v in scores]

    # 2. Detector-based checks, curation and the utility runs.
    ctx.part("utility")
    result = _utility_and_curation(ctx, inputs, scores)
    rejected = {r.name: r for r in result["rejected"]}
    metrics["curation"] = {
        "kept": len(result["kept"]), "rejected": len(rejected), "label_rule": result["label_rule"],
        "rejections": curation.rejection_table(result["rejected"], classes),
        "kept_per_class": dict(Counter(row["class"] for row in result["kept"])),
        "distribution": _score_summary(cfg.evaluation, scores, inputs.synth_rows, rejected),
    }
    metrics["not_computed"] = suite.not_computed
    for entry in suite.not_computed:
        console.print(f"not computed: {entry['metric']}: {entry['why']}", highlight=False, soft_wrap=True)
    metrics["label_consistency"] = result["consistency"]
    ucfg = cfg.evaluation.utility
    metrics["utility"] = {"datasets": result["datasets"], "runs": result["runs"], "gain_recovered": result.get("gain_recovered"),
                          "comparisons": result.get("comparisons"), "arms": ucfg.arms, "arms_not_run": result.get("arms_not_run", {}), "mode": ucfg.mode, "budget": ucfg.budget,
                          "training_seeds": ucfg.seeds, "generation_seeds": generation_seeds(cfg),
                          "train_fraction": cfg.data.train_fraction, "test_images": len(inputs.real_rows.get("test", []))}
    metrics["throughput"] = suite.throughput()

    ctx.part("report")
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
    mixes = {name: value for name, value in headline.items() if name.startswith("real+synthetic")}
    best = max(mixes, key=mixes.get) if mixes else None
    # The best synthetic arm against real and against each control arm of its ratio (paired bootstrap).
    synthetic_gain = {key.split(" vs ")[1]: value for key, value in (result.get("comparisons") or {}).items() if key.startswith(f"{best} vs ")}
    first = next(iter(metrics["fidelity"]), cfg.evaluation.features[0])  # the first feature space that loaded
    overall = metrics["fidelity"].get(first, {}).get("synthetic", {}).get("all", {})
    return {
        "synthetic_images": len(inputs.synth_rows),
        "curated_images": len(result["kept"]),
        "rejected_by_reason": dict(Counter(r.reason for r in result["rejected"])),
        "label_rule": result["label_rule"],
        f"kid_{first}": overall.get("kid_mean"),
        f"precision_{first}": overall.get("precision"),
        f"recall_{first}": overall.get("recall"),
        "not_computed": [entry["metric"] for entry in suite.not_computed],
        "map50": headline,
        "gain_recovered": result.get("gain_recovered"),
        "arms_not_run": result.get("arms_not_run", {}),
        "best_synthetic": best,
        "synthetic_gain": synthetic_gain,
        # Per feature space (Inception fp32, DINOv3 never fp16).
        "dtype": {name: DTYPE_NAMES[extractor_dtype(name, cfg)] for name in cfg.evaluation.features},
        "outputs": {"metrics": METRICS_FILE, "report": "report.html", "curated": f"{CURATED_DIR}/manifest.jsonl"},
    }


def headline(summary: dict[str, Any]) -> str:
    """YOLO mAP50 of real-only vs the best real+synthetic mix (the question Step 5 answers), synthetic's gain over
    real and over each control arm with its 95 % paired-bootstrap interval, then the KID."""
    parts = []
    map50 = summary.get("map50") or {}
    best = summary.get("best_synthetic")
    if "real" in map50:
        parts.append(f"mAP50 real {map50['real']:.3f}" + (f" vs {best} {map50[best]:.3f}" if best else ""))
    gains = summary.get("synthetic_gain") or {}
    if gains:
        parts.append("synthetic gain " + ", ".join(f"vs {other} {g['difference']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]"
                                                   for other, g in gains.items()))
    kid = next(((key, value) for key, value in summary.items() if key.startswith("kid_")), None)
    if kid and kid[1] is not None:
        parts.append(f"{kid[0].replace('_', ' ').upper()} {kid[1]:.4f}")
    return ", ".join(parts)


STEP = Step(
    name="step5_evaluate",
    title="fidelity, diversity, curation, YOLO utility, report",
    run=run,
    config_keys=("evaluation", "models.clip", "models.dinov3", "models.yolo", "data.classes", "data.train_fraction",
                 "generation.seeds", "run.seed", "run.device", "run.mixed_precision"),
    requires=("step0_prepare", "step4_generate"),
    key_figure=headline,
)



def main(argv: list[str] | None = None) -> None:
    step_main(STEP.name, argv)


if __name__ == "__main__":
    main()
