"""Step 6: the DINOv3 attention-guided multitask classifier, trained on real (+ synthetic) images, tested on real.

    python -m neu_det_pipeline.step6_classifier --config configs/smoke.yaml
    python -m neu_det_pipeline.step6_classifier --config configs/classifier_cpu.yaml data.root=/data/NEU-DET
    accelerate launch -m neu_det_pipeline.step6_classifier --config configs/base.yaml data.root=/data/NEU-DET

Reads Step 0's splits and box masks (or `classifier.own_data`, checked first like `neu-det data check`), and
Step 4's images, Step 5's curated set or one of Step 5's control-arm datasets (`classical`, `copy_paste`) only
when `classifier.synthetic` mixes them in. Without masks, `classifier.mask_source` makes pseudo-masks (backbone
attention or Grad-CAM) or trains classification alone. An interrupted run continues with the same command
plus `classifier.resume=latest`. Then:

    neu-det predict --checkpoint <out>/step6_classifier/best.pt IMAGE_OR_DIR --out DIR
    neu-det export-onnx --checkpoint <out>/step6_classifier/best.pt --out model.onnx

Outputs in `<run.output_dir>/step6_classifier/`:
    best.pt, last.pt          best validation macro-F1 / newest epoch (last.pt also resumes training)
    metrics.csv, curves.png   per-epoch losses, loss weights, learning rates, validation scores
    test_metrics.json         test (real) accuracy, macro-F1, per-class report, mask IoU / Dice (against the data's
                              masks, whatever mask_source trained on), confusion matrix
    confusion_matrix.png      on the test split
    summary.json              data counts, backbone, parameters per component, mask source, input, dtype
                              (autocast), best epoch, test scores, wall time
    pseudo_masks/             mask_source attention / cam: the training images' pseudo-masks (white = defect)
    cam_stage/                mask_source cam: the plain classifier whose Grad-CAM made them (best.pt, last.pt)

With `classifier.input=box_crops` every sample is one VOC object (its box cropped with a margin, labelled with
the object's class): test scores are per object (`objects` in test_metrics.json, `objects` beside `images` in
summary.json), and `neu-det predict --boxes LABEL_DIR` classifies a detector's boxes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neu_det_pipeline.classifier.backbones import component_parameters
from neu_det_pipeline.classifier.checkpoints import BEST_FILE, load_classifier
from neu_det_pipeline.classifier.data import load_data
from neu_det_pipeline.classifier.data_tools import require_valid
from neu_det_pipeline.classifier.evaluation import (
    plot_confusion_matrix,
    plot_curves,
    report_table,
    score_line,
    write_history_csv,
)
from neu_det_pipeline.classifier.training import ClassifierTraining
from neu_det_pipeline.classifier.weak_masks import MASK_SOURCE_TEXT, PSEUDO_MASK_DIR, apply_mask_source
from neu_det_pipeline.cli import step_main
from neu_det_pipeline.config import ClassifierConfig, PipelineConfig
from neu_det_pipeline.evaluation.control_arms import ARM_FOLDERS, arm_dataset_dir
from neu_det_pipeline.generation.plan import generation_seeds
from neu_det_pipeline.io import write_json
from neu_det_pipeline.models import DTYPE_NAMES
from neu_det_pipeline.recipe import Step, StepContext, console
from neu_det_pipeline.step0_prepare import dataset_listing
from neu_det_pipeline.training.loop import weight_dtype

SYNTHETIC_STEPS = {"step4": "step4_generate", "step5": "step5_evaluate", "classical": "step5_evaluate", "copy_paste": "step5_evaluate"}
TEST_METRICS_FILE = "test_metrics.json"


def training_data(section: ClassifierConfig) -> str:
    if section.synthetic == "none":
        return "real"
    return f"{section.synthetic} synthetic only" if section.synthetic_only else f"real + {section.synthetic} synthetic"


def synthetic_folder(ctx: StepContext) -> Path:
    """The upstream step's folder, or for a control arm its dataset inside Step 5's."""
    cfg = ctx.config
    folder = ctx.upstream_dir(SYNTHETIC_STEPS[cfg.classifier.synthetic])
    if cfg.classifier.synthetic in ARM_FOLDERS.values():
        return arm_dataset_dir(folder, cfg.classifier.synthetic, generation_seeds(cfg)[0])
    return folder


def run(ctx: StepContext) -> dict[str, Any]:
    cfg, section = ctx.config, ctx.config.classifier
    synthetic_dir = synthetic_folder(ctx) if section.synthetic != "none" else None
    if section.own_data is not None:
        require_valid(section.own_data, require_masks=section.mask_source == "boxes")
    data = load_data(cfg, ctx.upstream_dir("step0_prepare"), synthetic_dir)
    for note in data.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    data, pseudo_masks = apply_mask_source(cfg, data, ctx.out_dir)
    console.print(f"masks: {MASK_SOURCE_TEXT[section.mask_source]}" + (f", {pseudo_masks} in {ctx.out_dir / PSEUDO_MASK_DIR}" if pseudo_masks else ""), highlight=False)

    training = ClassifierTraining(cfg, data, ctx.out_dir)
    parameters = component_parameters(training.model)
    console.print(
        f"parameters: backbone {parameters['backbone']:,}, decoder {parameters['decoder']:,}, "
        f"enhancer + head {parameters['enhancer_head']:,}, total {parameters['total']:,}", highlight=False,
    )
    with ctx.loss_progress("classifier", section.epochs * training.steps_per_epoch) as on_step:
        result = training.run(on_step)
    if not training.accelerator.is_main_process:
        return {}

    best, _ = load_classifier(ctx.out_dir / BEST_FILE)
    test = training.evaluate(training.dataset("test"), best.to(training.accelerator.device))
    write_json(ctx.out_dir / TEST_METRICS_FILE, {"training_data": training_data(section), "input": section.input, "mask_source": section.mask_source, "classes": data.classes, "best_epoch": result.best_epoch, **test})
    write_history_csv(result.history, ctx.out_dir / "metrics.csv")
    plot_curves(result.history, ctx.out_dir / "curves.png")
    plot_confusion_matrix(test["confusion_matrix"], data.classes, ctx.out_dir / "confusion_matrix.png", "test split (real)")
    console.print(report_table(test, f"test split (real), best epoch {result.best_epoch}"))
    console.print(f"test: {score_line(test)}", highlight=False)
    return {
        "backbone": section.backbone,
        "pretrained": section.pretrained,
        "multitask": section.multitask,
        "input": section.input,
        "training_data": training_data(section),
        "images": data.counts(distinct_images=True),
        **({"objects": data.counts()} if section.input == "box_crops" else {}),
        "classes": data.classes,
        "parameters": parameters["total"],
        "parameters_by_component": parameters,
        "mask_source": section.mask_source,
        "pseudo_masks": pseudo_masks,
        "processes": training.accelerator.num_processes,
        "dtype": DTYPE_NAMES[weight_dtype(training.accelerator)],  # autocast; the weights train in fp32
        "epochs_trained": len(result.history),
        "stopped_by_time_budget": result.stopped_by_time_budget,
        "training_seconds": result.history[-1]["seconds"],
        "resumed_from_epoch": result.resumed_from_epoch,
        "best_epoch": result.best_epoch,
        "best_val_macro_f1": round(result.best_macro_f1, 4),
        "test_accuracy": round(test["accuracy"], 4),
        "test_macro_f1": round(test["macro_f1"], 4),
        "test_mask_iou": None if test["mask_iou"] is None else round(test["mask_iou"], 4),
        "test_mask_dice": None if test["mask_dice"] is None else round(test["mask_dice"], 4),
        "checkpoint": str(ctx.out_dir / BEST_FILE),
    }


def required_steps(config: PipelineConfig) -> tuple[str, ...]:
    """Step 0 unless `classifier.own_data` replaces it; Step 4 or 5 only when synthetic images are mixed in."""
    section = config.classifier
    needed = () if section.own_data is not None else ("step0_prepare",)
    return needed + ((SYNTHETIC_STEPS[section.synthetic],) if section.synthetic != "none" else ())


def user_folders(config: PipelineConfig) -> dict[str, str]:
    """Listings (paths, sizes, times) of `own_data` and `normal_dir`: a changed file re-does the step."""
    section = config.classifier
    return {
        key: dataset_listing(config.model_copy(update={"data": config.data.model_copy(update={"root": folder})}))
        for key, folder in (("own_data", section.own_data), ("normal_dir", section.normal_dir))
        if folder is not None
    }


STEP = Step(
    name="step6_classifier",
    title="DINOv3 attention-guided multitask classifier: train, evaluate on real test images",
    run=run,
    config_keys=(
        "data.classes", "run.seed", "run.mixed_precision", "models.dinov3",
        *(f"classifier.{key}" for key in ClassifierConfig.outcome_keys()),
    ),
    requires=required_steps,
    input_fingerprint=user_folders,
    key_figure=lambda summary: f"test accuracy {summary['test_accuracy']:.3f}, macro-F1 {summary['test_macro_f1']:.3f}"
    + (f", mask IoU {summary['test_mask_iou']:.3f}" if summary.get("test_mask_iou") is not None else ""),
)


def main(argv: list[str] | None = None) -> None:
    step_main(STEP.name, argv)


if __name__ == "__main__":
    main()
