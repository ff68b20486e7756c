"""Command-line entry points.

    python -m neu_det_pipeline.<step> --config PATH [key=value ...]
    neu-det run-all --config PATH [key=value ...]
    neu-det tiny-models DIR
    neu-det list-steps
    neu-det predict --checkpoint FILE IMAGE_OR_DIR --out DIR
    neu-det export-onnx --checkpoint FILE --out FILE.onnx
    neu-det metrics REAL_DIR SYNTH_DIR [--out DIR] [--config PATH] [key=value ...]
    neu-det compare RUN_DIR RUN_DIR [...] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from rich.table import Table

from neu_det_pipeline.config import PipelineConfig, load_config
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.recipe import (
    Step,
    console,
    new_progress,
    run_step,
    step_output_dir,
)

# bitsandbytes warns on every CPU import that an optional 4-bit kernel package is missing; it is not used here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

STEP_LAUNCHERS = {
    "step0_prepare": "python",
    "step1_textual_inversion": "accelerate",
    "step2_captions": "python",
    "step3_lora": "accelerate",
    "step4_generate": "accelerate",
    "step5_evaluate": "python",
    "step6_classifier": "accelerate",
}
"""Pipeline steps in run order (each module defines `STEP`) and how a GPU node starts them: training steps
and sharded generation under `accelerate launch`. Kept here, not on `Step`, so listing the steps imports no model code."""
STEP_MODULES = tuple(STEP_LAUNCHERS)


def load_step(name: str) -> Step:
    return importlib.import_module(f"neu_det_pipeline.{name}").STEP


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected failures into one line and an exit code instead of a traceback."""
    try:
        yield
    except PipelineError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/] re-run the same command to continue where it stopped")
        sys.exit(130)


def _add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, type=Path, help="YAML config (configs/base.yaml, configs/smoke.yaml, ...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. run.seed=1")
    return parser


def setup(args: argparse.Namespace) -> PipelineConfig:
    config = load_config(args.config, args.overrides)
    if config.run.tiny_models_dir is not None:
        from neu_det_pipeline.testing.tiny_models import build_tiny_models

        build_tiny_models(config.run.tiny_models_dir)
    return config


def step_main(step_name: str, argv: list[str] | None = None) -> None:
    """`python -m neu_det_pipeline.<step>`: run one step."""
    step = load_step(step_name)
    parser = argparse.ArgumentParser(prog=f"python -m neu_det_pipeline.{step.name}", description=step.title)
    args = _add_config_arguments(parser).parse_args(argv)
    with user_errors():
        run_step(step, setup(args))


def run_all(config: PipelineConfig) -> list[dict]:
    """Run every step in order in one progress display, then print one summary table."""
    summaries = []
    started = time.perf_counter()
    with new_progress() as progress:
        overall = progress.add_task("pipeline", total=len(STEP_MODULES))
        for name in STEP_MODULES:
            progress.update(overall, description=f"pipeline: {name}")
            summaries.append(run_step(load_step(name), config, progress))
            progress.advance(overall)
    table = Table(title="neu-det run-all", title_justify="left")
    for column in ("step", "status", "wall time (s)"):
        table.add_column(column)
    for summary in summaries:
        status = "up to date" if summary.get("up_to_date") else summary["status"]
        table.add_row(summary["step"], status, f"{summary['wall_time_s']:.1f}")
    console.print(table)
    for summary in summaries:
        console.print(f"summary: {step_output_dir(config, summary['step'])}/summary.json", soft_wrap=True, highlight=False)
    console.print(f"all outputs in {config.run.output_dir} ({time.perf_counter() - started:.1f} s)", soft_wrap=True, highlight=False)
    return summaries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="neu-det", description="NEU-DET diffusion augmentation pipeline")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_config_arguments(commands.add_parser("run-all", help="run every step in order"))
    commands.add_parser("list-steps", help="print each step and its launcher (python or accelerate), in run order")
    tiny = commands.add_parser("tiny-models", help="build tiny random models in hub layout (offline tests)")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    predict = commands.add_parser("predict", help="classify images with a Step 6 checkpoint (.pt) or ONNX export: overlays + predictions.csv")
    predict.add_argument("--checkpoint", required=True, type=Path, help="best.pt / last.pt from step6_classifier, or a .onnx export")
    predict.add_argument("input", type=Path, metavar="IMAGE_OR_DIR")
    predict.add_argument("--out", required=True, type=Path, help="folder for overlays/ and predictions.csv")
    export = commands.add_parser("export-onnx", help="export a Step 6 checkpoint to ONNX (dynamic batch), checked against onnxruntime")
    export.add_argument("--checkpoint", required=True, type=Path)
    export.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    metrics = commands.add_parser("metrics", help="image metrics (KID, FID, precision/recall, LPIPS, LBP) of SYNTH_DIR against REAL_DIR")
    metrics.add_argument("real_dir", type=Path, help="NEU-DET folder, YOLO dataset, class subfolders or Step 4 folder")
    metrics.add_argument("synth_dir", type=Path, help="the same layouts")
    metrics.add_argument("--out", type=Path, default=Path("metrics"), help="folder for metrics.json and report.html")
    metrics.add_argument("--config", type=Path, default=None, help="YAML config for the `evaluation` and `models` keys (default: built-in defaults)")
    metrics.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. evaluation.features=[clip]")
    compare = commands.add_parser("compare", help="Step 5 results of several runs side by side, with their config differences")
    compare.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run.output_dir of each run; the first is the baseline")
    compare.add_argument("--out", type=Path, default=Path("compare"), help="folder for compare.md and compare.html")
    # `metrics` takes key=value overrides after its options too (argparse would stop at the first option).
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "metrics":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra

    with user_errors():
        if args.command == "list-steps":
            for name, launcher in STEP_LAUNCHERS.items():
                print(name, launcher)
        elif args.command == "tiny-models":
            from neu_det_pipeline.testing.tiny_models import build_tiny_models

            for name, path in build_tiny_models(args.dir, seed=args.seed).items():
                console.print(f"{name:28s} {path}")
        elif args.command == "predict":
            from neu_det_pipeline.classifier.cli import predict_command

            predict_command(args)
        elif args.command == "export-onnx":
            from neu_det_pipeline.classifier.cli import export_command

            export_command(args)
        elif args.command == "metrics":
            from neu_det_pipeline.evaluation.commands import metrics_command

            metrics_command(args.real_dir, args.synth_dir, args.out, args.config, args.overrides)
        elif args.command == "compare":
            from neu_det_pipeline.evaluation.commands import compare_command

            compare_command(args.run_dirs, args.out)
        else:
            run_all(setup(args))


if __name__ == "__main__":
    main()
