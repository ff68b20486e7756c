"""Running the pipeline: the steps in order, which of them to run, a log per step, and reuse across runs.

`neu-det run-all` runs the selected steps in one process and one progress display. Every step writes its
console output to `<run.output_dir>/logs/<step>.log`; a failing step stops the run with its name, the error
line and that log's path. Steps are resumable, so an interrupted run-all continues where it stopped.

`neu-det reuse` links finished step folders of other runs into this run where this config would produce
exactly the same outputs (same fingerprint: the step's config keys, its inputs and its upstream steps), so
A/B experiments share what does not differ.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from neu_det_pipeline.config import PipelineConfig, dump_config
from neu_det_pipeline.cost import run_cost, run_cost_line, step_costs
from neu_det_pipeline.errors import MissingStepOutputError, PipelineError
from neu_det_pipeline.io import atomic_write_text, write_json
from neu_det_pipeline.recipe import (
    CONFIG_FILE,
    SUMMARY_FILE,
    Step,
    StepBusyError,
    console,
    new_progress,
    read_summary,
    run_step,
    step_fingerprint,
    step_lock,
    step_output_dir,
)

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
LOGS_DIR = "logs"
REPORT_FILE = "step5_evaluate/report.html"


def load_step(name: str) -> Step:
    return importlib.import_module(f"neu_det_pipeline.{name}").STEP


def step_names(text: str, option: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STEP_MODULES]
    if unknown or not names:
        raise PipelineError(f"{option} {text!r}: unknown step {', '.join(unknown) or '(none)'}; steps: {', '.join(STEP_MODULES)}")
    return names


def select_steps(from_step: str | None = None, only: str | None = None) -> list[str]:
    """Steps to run, in order: all of them, those from `from_step` on, or the comma-separated `only` list."""
    if from_step and only:
        raise PipelineError("--from and --only exclude each other: use one")
    if only:
        chosen = set(step_names(only, "--only"))
        return [name for name in STEP_MODULES if name in chosen]
    if from_step:
        return list(STEP_MODULES[STEP_MODULES.index(step_names(from_step, "--from")[0]) :])
    return list(STEP_MODULES)


def inapplicable_steps(config: PipelineConfig) -> dict[str, str]:
    """Steps this config has nothing to do in, with why. `models.pipeline: sd3` (experimental) is Step 4 only:
    Steps 1 and 3 train SD 1.5 / SDXL UNet models, and Step 4 then prompts with the class-name template."""
    if config.models.pipeline == "sd3":
        why = "models.pipeline=sd3 is Step 4 only (Steps 1 and 3 train SD 1.5 / SDXL)"
        return {"step1_textual_inversion": why, "step3_lora": why}
    return {}


def drop_inapplicable(config: PipelineConfig, steps: list[str]) -> list[str]:
    """`steps` without those this config has nothing to do in, saying which and why in one console line."""
    skipped = inapplicable_steps(config)
    if dropped := [name for name in steps if name in skipped]:
        reasons = sorted({skipped[name] for name in dropped})
        console.print(f"skipping {', '.join(dropped)}: {'; '.join(reasons)}", soft_wrap=True, highlight=False)
    return [name for name in steps if name not in skipped]


@dataclass
class StepFailed(Exception):
    step: str
    error: str
    log: Path

    def __str__(self) -> str:
        return f"{self.step} failed: {self.error} (log: {self.log})"


def _run_logged(step: Step, config: PipelineConfig, progress: Any, log: Path, locks: contextlib.ExitStack, force: bool) -> dict[str, Any]:
    """Run one step, its console output recorded into `log`; a failure becomes `StepFailed`."""
    console.record = True
    console.export_text(clear=True)  # drop anything recorded before this step
    failure, own_log = "", True
    try:
        return run_step(step, config, progress, locks, force)
    except StepBusyError:
        own_log = False  # the log belongs to the run holding the step
        raise
    except Exception as exc:
        error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, PipelineError):
            error = f"{type(exc).__name__}: {error}"
        failure = traceback.format_exc()  # for the log only: the screen gets one line
        raise StepFailed(step.name, error, log) from None
    finally:
        recorded = console.export_text(clear=True) + failure
        if own_log:
            atomic_write_text(log, recorded)
        console.record = False


def free_step_models() -> None:
    """Free the models of the step that just ended: accelerate's wrapped `forward` (a method bound to the model,
    stored on the model) is a reference cycle, so reference counting alone keeps them, with their optimizer state,
    until some later collection; on a GPU the next step would start with them in memory. (accelerate's process-wide
    state holds no model; `make_accelerator` renews it when a step needs another precision.)"""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_all(config: PipelineConfig, steps: Iterable[str] = STEP_MODULES, force: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Run `steps` in order in one progress display (`force`d ones from scratch), then one summary table."""
    steps, started = list(steps), time.perf_counter()
    logs = Path(config.run.output_dir) / LOGS_DIR
    summaries = []
    # Each step's lock is kept to the end: a second run on this folder cannot start between two of this run's steps.
    with new_progress() as progress, contextlib.ExitStack() as locks:
        overall = progress.add_task("pipeline", total=len(steps))
        for name in steps:
            progress.update(overall, description=f"pipeline: {name}")
            summaries.append(_run_logged(load_step(name), config, progress, logs / f"{name}.log", locks, name in force))
            free_step_models()
            progress.advance(overall)
    console.print(summary_table(summaries))
    console.print(f"cost of the run (every finished step, see `neu-det compare`): {run_cost_line(run_cost(step_costs(Path(config.run.output_dir))))}",
                  soft_wrap=True, highlight=False)
    report = Path(config.run.output_dir) / REPORT_FILE
    if report.is_file():
        console.print(f"report: {report}", soft_wrap=True, highlight=False)
    console.print(f"logs: {logs}/<step>.log; summaries: {config.run.output_dir}/<step>/summary.json", soft_wrap=True, highlight=False)
    console.print(f"all outputs in {config.run.output_dir} ({time.perf_counter() - started:.1f} s)", soft_wrap=True, highlight=False)
    return summaries


def summary_table(summaries: list[dict[str, Any]]) -> Table:
    table = Table(title="neu-det run-all", title_justify="left")
    for column in ("step", "status", "wall time (s)", "dtype", "key figure"):
        table.add_column(column)
    for summary in summaries:
        step = load_step(summary["step"])
        status = "up to date" if summary.get("up_to_date") else summary["status"]
        figure = step.key_figure(summary) if step.key_figure else ""
        table.add_row(summary["step"], status, f"{summary['wall_time_s']:.1f}", dtype_label(summary.get("dtype")), figure)
    return table


def dtype_label(dtype: str | dict[str, str] | None) -> str:
    """A summary's `dtype` for the table: one name, or per model where they differ (Step 5's feature spaces)."""
    if isinstance(dtype, dict):
        names = set(dtype.values())
        return names.pop() if len(names) == 1 else ", ".join(f"{key} {value}" for key, value in dtype.items())
    return dtype or "-"


# ------------------------------------------------------------------------------------------ reuse


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link every file of `source` under `target` (a copy where links are impossible): no extra disk space,
    and the recipe's atomic rewrites replace links instead of changing the other run's files."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)


def reuse_finished_steps(config: PipelineConfig, runs: list[Path], on_reuse: Callable[[str, Path], None] | None = None) -> list[str]:
    """Link, in order, each step that a run in `runs` finished with the fingerprint this config gives it; stops at the
    first step that none has (later steps depend on it). Steps already up to date here are kept. Returns the linked ones."""
    linked = []
    for name in STEP_MODULES:
        step = load_step(name)
        try:
            fingerprint = step_fingerprint(step, config)
        except MissingStepOutputError:
            break
        here = step_output_dir(config, name)
        if (summary := read_summary(here)) and summary.get("fingerprint") == fingerprint and summary.get("status") == "complete":
            continue
        source = next((Path(run) / name for run in runs if _finished_with(Path(run) / name, fingerprint)), None)
        if source is None or source.resolve() == here.resolve():
            break
        with step_lock(config, name):  # never replace the folder of a step another process is running
            shutil.rmtree(here, ignore_errors=True)
            _link_tree(source, here)
            atomic_write_text(here / CONFIG_FILE, dump_config(config))
            write_json(here / SUMMARY_FILE, {**read_summary(here), "reused_from": str(source)})
        linked.append(name)
        if on_reuse:
            on_reuse(name, source)
    return linked


def _finished_with(folder: Path, fingerprint: str) -> bool:
    summary = read_summary(folder)
    return bool(summary) and summary.get("status") == "complete" and summary.get("fingerprint") == fingerprint
