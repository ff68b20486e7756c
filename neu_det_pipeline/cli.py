"""Command-line entry points.

    python -m neu_det_pipeline.<step> --config PATH [key=value ...]
    neu-det run-all --config PATH [--from STEP | --only STEP[,STEP]] [--force STEP[,STEP]] [key=value ...]
    neu-det list-steps [--config PATH [key=value ...]]
    neu-det doctor [--config PATH [--online]] [key=value ...]
    neu-det show-config --config PATH [--key DOTTED.KEY] [key=value ...]
    neu-det reuse --config PATH RUN_DIR [RUN_DIR ...] [key=value ...]
    neu-det tiny-models DIR
    neu-det predict --checkpoint FILE IMAGE_OR_DIR --out DIR [--boxes LABEL_DIR]
    neu-det export-onnx --checkpoint FILE --out FILE.onnx
    neu-det data organize --defect-images DIR [--defect-masks DIR] --normal-images DIR --out DIR
    neu-det data dummy --out DIR [--num-defect K --num-normal K]
    neu-det data check DIR [--no-masks]
    neu-det metrics REAL_DIR SYNTH_DIR [--out DIR] [--config PATH] [key=value ...]
    neu-det compare RUN_DIR RUN_DIR [...] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from neu_det_pipeline.config import PipelineConfig, load_config
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.recipe import console, run_step
from neu_det_pipeline.runner import STEP_LAUNCHERS, StepFailed, inapplicable_steps, load_step

# bitsandbytes warns on every CPU import that an optional 4-bit kernel package is missing; it is not used here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# With the `kernels` package (transformers >= 5.25 installs it) bitsandbytes asks the hub for CPU kernels at import;
# offline, `kernels` warns that it skips the publisher check. Nothing here uses those kernels.
logging.getLogger("kernels").setLevel(logging.ERROR)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected failures into one line and an exit code instead of a traceback."""
    try:
        yield
    except (PipelineError, StepFailed) as exc:
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
    if config.run.offline:
        go_offline()
    if config.run.tiny_models_dir is not None:
        from neu_det_pipeline.testing.tiny_models import build_tiny_models

        build_tiny_models(config.run.tiny_models_dir)
    return config


def go_offline() -> None:
    """Hub offline mode for this process. huggingface_hub reads `HF_HUB_OFFLINE` once, when it is imported: the
    steps import it later, but a caller that already has it gets its flag set too."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if (constants := sys.modules.get("huggingface_hub.constants")) is not None:
        constants.HF_HUB_OFFLINE = True


def step_main(step_name: str, argv: list[str] | None = None) -> None:
    """`python -m neu_det_pipeline.<step>`: run one step."""
    step = load_step(step_name)
    parser = argparse.ArgumentParser(prog=f"python -m neu_det_pipeline.{step.name}", description=step.title)
    args = _add_config_arguments(parser).parse_args(argv)
    with user_errors():
        run_step(step, setup(args))


# ------------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    """Returns the exit code (None: 0)."""


def _run_all_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    parser.add_argument("--from", dest="from_step", metavar="STEP", help="start at this step (earlier ones must be done)")
    parser.add_argument("--only", metavar="STEP[,STEP]", help="run only these steps")
    parser.add_argument("--force", metavar="STEP[,STEP]", default="", help="re-do these steps even if up to date")


def _run_all(args: argparse.Namespace) -> None:
    from neu_det_pipeline.runner import drop_inapplicable, run_all, select_steps, step_names

    steps = select_steps(args.from_step, args.only)  # bad names fail before any model loads
    force = step_names(args.force, "--force") if args.force else []
    config = setup(args)
    if not args.only:  # steps named in --only run as asked (and say themselves why they cannot)
        steps = drop_inapplicable(config, steps)
    run_all(config, steps, force)


def _list_steps_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="only the steps this config has something to do in")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def _list_steps(args: argparse.Namespace) -> None:
    skipped = inapplicable_steps(load_config(args.config, args.overrides)) if args.config else {}
    for name, launcher in STEP_LAUNCHERS.items():
        if name not in skipped:
            print(name, launcher)


def _doctor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="also check what this config needs")
    parser.add_argument("--online", action="store_true", help="with --config: ask the hub whether every model and file can be had")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def _doctor(args: argparse.Namespace) -> int:
    from neu_det_pipeline.doctor import diagnose, print_report

    if args.online and args.config is None:
        raise PipelineError("doctor --online checks the models of a config: add --config FILE")
    report = diagnose(load_config(args.config, args.overrides) if args.config else None, online=args.online)
    print_report(report, console)
    return 1 if report.problems else 0


def _show_config_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    parser.add_argument("--key", metavar="DOTTED.KEY", help="print only this value (e.g. run.output_dir)")


def _show_config(args: argparse.Namespace) -> None:
    from neu_det_pipeline.config import dump_config

    config = load_config(args.config, args.overrides)
    if args.key is None:
        print(dump_config(config), end="")
        return
    try:
        value = config.section(args.key)
    except AttributeError:
        raise PipelineError(f"--key {args.key}: no such config key; `neu-det show-config --config {args.config}` lists them") from None
    value = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
    print(json.dumps(value) if isinstance(value, (dict, list)) else value)


def _reuse_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run.output_dir of earlier runs")


def _reuse(args: argparse.Namespace) -> None:
    from neu_det_pipeline.runner import reuse_finished_steps

    # RUN_DIRs and key=value overrides share the positional arguments.
    overrides = [arg for arg in map(str, args.runs) if "=" in arg]
    runs = [Path(arg) for arg in map(str, args.runs) if "=" not in arg]
    linked = reuse_finished_steps(
        setup(argparse.Namespace(config=args.config, overrides=overrides)), runs,
        lambda name, source: console.print(f"reused {name} from {source}", highlight=False),
    )
    if not linked:
        console.print("nothing to reuse: no earlier run finished a step with this config's fingerprint", highlight=False)


def _tiny_models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)


def _tiny_models(args: argparse.Namespace) -> None:
    from neu_det_pipeline.testing.tiny_models import build_tiny_models

    for name, path in build_tiny_models(args.dir, seed=args.seed).items():
        console.print(f"{name:28s} {path}")


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="best.pt / last.pt from step6_classifier, or a .onnx export")
    parser.add_argument("input", type=Path, metavar="IMAGE_OR_DIR")
    parser.add_argument("--out", required=True, type=Path, help="folder for overlays/, predictions.csv and results_summary.txt")
    parser.add_argument("--boxes", type=Path, default=None, metavar="LABEL_DIR",
                        help="models trained with classifier.input=box_crops: folder of VOC XML or YOLO .txt boxes per image stem; one CSV row per box")


def _predict(args: argparse.Namespace) -> None:
    from neu_det_pipeline.classifier.cli import predict_command

    predict_command(args)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="the .onnx file to write")


def _export(args: argparse.Namespace) -> None:
    from neu_det_pipeline.classifier.cli import export_command

    export_command(args)


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    tools = parser.add_subparsers(dest="data_command", required=True)
    organize_parser = tools.add_parser("organize", help="build the own-data layout from folders of defect images, masks and defect-free images")
    organize_parser.add_argument("--defect-images", required=True, type=Path)
    organize_parser.add_argument("--defect-masks", type=Path, default=None, help="masks matched by stem (<stem>.* or <stem>_mask.*); leave out for weak supervision")
    organize_parser.add_argument("--normal-images", required=True, type=Path, help="defect-free images")
    organize_parser.add_argument("--out", required=True, type=Path)
    organize_parser.add_argument("--val-fraction", type=float, default=0.2)
    organize_parser.add_argument("--test-fraction", type=float, default=0.0, help="> 0 also writes test_labels.txt")
    organize_parser.add_argument("--seed", type=int, default=0)
    dummy_parser = tools.add_parser("dummy", help="write a small synthetic own-data set with masks, for a first run")
    dummy_parser.add_argument("--out", required=True, type=Path)
    dummy_parser.add_argument("--num-defect", type=int, default=40)
    dummy_parser.add_argument("--num-normal", type=int, default=40)
    dummy_parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    dummy_parser.add_argument("--seed", type=int, default=0)
    check_parser = tools.add_parser("check", help="list every problem of an own-data folder, one line each; exit 1 when any")
    check_parser.add_argument("dir", type=Path)
    check_parser.add_argument("--no-masks", action="store_true", help="masks are not needed (mask_source attention, cam or none)")


def _data(args: argparse.Namespace) -> int:
    from neu_det_pipeline.classifier.data_tools import data_command

    return data_command(args)


def _metrics_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("real_dir", type=Path, help="NEU-DET folder, YOLO dataset, class subfolders or Step 4 folder")
    parser.add_argument("synth_dir", type=Path, help="the same layouts")
    parser.add_argument("--out", type=Path, default=Path("metrics"), help="folder for metrics.json and report.html")
    parser.add_argument("--config", type=Path, default=None, help="YAML config for the `evaluation` and `models` keys (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. evaluation.features=[clip]")


def _metrics(args: argparse.Namespace) -> None:
    from neu_det_pipeline.evaluation.commands import metrics_command

    metrics_command(args.real_dir, args.synth_dir, args.out, args.config, args.overrides)


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run.output_dir of each run; the first is the baseline")
    parser.add_argument("--out", type=Path, default=Path("compare"), help="folder for compare.md and compare.html (with the cost of every step)")


def _compare(args: argparse.Namespace) -> None:
    from neu_det_pipeline.evaluation.commands import compare_command

    compare_command(args.run_dirs, args.out)


COMMANDS = {
    "run-all": Command("run every step in order (or --from / --only some), one log per step", _run_all_arguments, _run_all),
    "list-steps": Command("print each step and its launcher (python or accelerate), in run order", _list_steps_arguments, _list_steps),
    "doctor": Command("what this machine has for the pipeline and what a config needs; one line per problem", _doctor_arguments, _doctor),
    "show-config": Command("print the resolved config (or one key) after extends and overrides", _show_config_arguments, _show_config),
    "reuse": Command("link finished steps of earlier runs that this config would redo identically", _reuse_arguments, _reuse),
    "tiny-models": Command("build tiny random models in hub layout (offline tests)", _tiny_models_arguments, _tiny_models),
    "predict": Command("classify images with a Step 6 checkpoint (.pt) or ONNX export: overlays + predictions.csv", _predict_arguments, _predict),
    "export-onnx": Command("export a Step 6 checkpoint to ONNX (dynamic batch), checked against onnxruntime", _export_arguments, _export),
    "data": Command("own data for Step 6: organize folders into its layout, write a dummy set, check one", _data_arguments, _data),
    "metrics": Command("image metrics (KID, FID, precision/recall, LPIPS, LBP) of SYNTH_DIR against REAL_DIR", _metrics_arguments, _metrics),
    "compare": Command("one row per run: Step 5 quality and utility beside what the run cost; config differences", _compare_arguments, _compare),
}
TRAILING_OVERRIDES = {"run-all", "list-steps", "doctor", "show-config", "reuse", "metrics"}
"""Commands whose key=value overrides may also follow their options (argparse stops at the first option)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neu-det", description="NEU-DET diffusion augmentation pipeline")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.arguments(commands.add_parser(name, help=command.help, description=command.help))
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command not in TRAILING_OVERRIDES or any("=" not in arg for arg in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        if args.command == "reuse":
            args.runs += [Path(arg) for arg in extra]
        else:
            args.overrides += extra
    return args


def main(argv: list[str] | None = None) -> int:
    """The `neu-det` console script; returns the exit code (its wrapper passes it to `sys.exit`)."""
    args = parse(argv)
    with user_errors():
        return COMMANDS[args.command].run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
