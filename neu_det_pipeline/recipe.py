"""The shape every step shares: setup, run, save.

A step is a :class:`Step`: a name, the config keys its outputs depend on, the steps whose outputs
it reads, and a ``run(ctx)`` function. :func:`run_step` does the rest the same way for every step:
it checks prerequisites, decides whether the outputs are up to date (a fingerprint of the config
keys, the upstream fingerprints and the step's input files), clears stale outputs, saves the resolved
config, shows progress, measures what the step cost (``summary.json``'s ``cost``: wall time, processes, GPU-hours,
peak GPU and host memory; see :mod:`neu_det_pipeline.cost`) and writes ``summary.json`` last, so a step without one
never finished.

One run per step folder: while a step runs, its process holds ``<run.output_dir>/.locks/<step>.lock``
(``fcntl.flock``, outside the step folder, which may be cleared). A second process starting the same step on the
same folder stops with one line naming the holder (pid, host, since when, its command); the extra ranks of one
``accelerate launch`` take no lock. The kernel releases the lock of a process that dies, so a lock file still
naming a dead holder is taken over, with a notice.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from neu_det_pipeline.config import PipelineConfig, config_hash, dump_config
from neu_det_pipeline.cost import (
    CostMeter,
    clear_rank_parts,
    collect,
    cost_line,
    world_size,
    write_rank_part,
)
from neu_det_pipeline.errors import MissingStepOutputError, PipelineError
from neu_det_pipeline.io import atomic_write_text, read_json, write_json

T = TypeVar("T")

SUMMARY_FILE = "summary.json"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
LOCKS_DIR = ".locks"

console = Console(stderr=True)
if not console.is_terminal:
    console.width = 120  # logs and CI: rich's 80-column fallback truncates the tables


def new_progress(disable: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
    )


@dataclass
class StepContext:
    """What a step's `run` receives: its config, its output folder and shared helpers."""

    step: Step
    config: PipelineConfig
    out_dir: Path
    fingerprint: str
    progress: Progress
    skipped: list[dict[str, Any]] = field(default_factory=list)
    meter: CostMeter = field(default_factory=CostMeter)

    def upstream_dir(self, step_name: str) -> Path:
        return step_output_dir(self.config, step_name)

    def track(self, items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
        """Iterate with a progress bar in the shared display."""
        task = self.progress.add_task(description or self.step.name, total=total)
        for item in items:
            yield item
            self.progress.advance(task)
        self.progress.update(task, visible=False)

    @contextlib.contextmanager
    def loss_progress(self, label: str, total: int) -> Iterator[Callable[[int, float], None]]:
        """A progress bar showing the latest loss; yields the `on_step(step, loss)` callback training calls."""
        task = self.progress.add_task(label, total=total)

        def on_step(step: int, loss: float) -> None:
            self.progress.update(task, completed=step, description=f"{label} (loss {loss:.4f})")

        try:
            yield on_step
        finally:
            self.progress.update(task, visible=False)

    def part(self, name: str) -> None:
        """Time from here to the next `part` (or the step's end) counts toward `name` in the summary's `cost.parts_s`."""
        self.meter.part(name)

    def skip(self, item: str, reason: str) -> None:
        """Record work that was skipped and why; it lands in summary.json."""
        self.skipped.append({"item": item, "reason": reason})


@dataclass(frozen=True)
class Step:
    name: str
    """Module name, also the output folder name (e.g. `step0_prepare`)."""
    title: str
    """One line shown to users."""
    run: Callable[[StepContext], dict[str, Any]]
    """Does the work, writes outputs under `ctx.out_dir`, returns the summary fields."""
    config_keys: tuple[str, ...]
    """Dotted config keys the outputs depend on; a change re-does the step."""
    requires: tuple[str, ...] | Callable[[PipelineConfig], tuple[str, ...]] = ()
    """Steps whose outputs this step reads; a function of the config where that depends on it (e.g. Step 4
    reads the Step 3 LoRA only when `generation.use_lora` is on)."""
    input_fingerprint: Callable[[PipelineConfig], Any] | None = None
    """Cheap fingerprint of input files outside the run folder (e.g. the dataset listing)."""
    key_figure: Callable[[dict[str, Any]], str] | None = None
    """The one number of its summary that `neu-det run-all` shows in its table."""

    def required_steps(self, config: PipelineConfig) -> tuple[str, ...]:
        return self.requires(config) if callable(self.requires) else self.requires


def step_output_dir(config: PipelineConfig, step_name: str) -> Path:
    return Path(config.run.output_dir) / step_name


def read_summary(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / SUMMARY_FILE
    return read_json(path) if path.is_file() else None


def step_fingerprint(step: Step, config: PipelineConfig) -> str:
    upstream = {}
    for name in step.required_steps(config):
        summary = read_summary(step_output_dir(config, name))
        if summary is None or summary.get("status") != "complete":
            raise MissingStepOutputError(
                f"{step.name} needs the outputs of {name} in {step_output_dir(config, name)}; run "
                f"`python -m neu_det_pipeline.{name} --config <same config>` (or `neu-det run-all`) first"
            )
        upstream[name] = summary["fingerprint"]
    payload = {
        "step": step.name,
        "config": {key: _jsonable(config.section(key)) for key in step.config_keys},
        "upstream": upstream,
        "inputs": step.input_fingerprint(config) if step.input_fingerprint else None,
    }
    return config_hash(payload)


def _jsonable(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def _prepare_out_dir(out_dir: Path, fingerprint: str) -> bool:
    """Make `out_dir` ready for this fingerprint; True when an interrupted run is being continued."""
    state_path = out_dir / STATE_FILE
    previous = read_json(state_path).get("fingerprint") if state_path.is_file() else None
    if previous == fingerprint:
        return True
    if out_dir.exists():
        # Outputs from another config (or of unknown origin) must not mix with the new ones.
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    return False


def is_main_process() -> bool:
    """False on the extra ranks of `accelerate launch` / `torchrun`, which must not touch shared files."""
    return os.environ.get("RANK", "0") == "0"


class StepBusyError(PipelineError):
    """Another process is running this step on the same output folder."""


def lock_path(config: PipelineConfig, step_name: str) -> Path:
    return Path(config.run.output_dir) / LOCKS_DIR / f"{step_name}.lock"


def _lock_holder(fd: int) -> dict[str, Any]:
    raw = os.pread(fd, 4096, 0)
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}


@contextlib.contextmanager
def step_lock(config: PipelineConfig, step_name: str) -> Iterator[None]:
    """Hold the step's lock for the block; `StepBusyError` when another process holds it."""
    path = lock_path(config, step_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            pid, host = holder.get("pid", "?"), holder.get("host", "?")
            raise StepBusyError(
                f"{step_name}: {step_output_dir(config, step_name)} is in use by pid {pid} on {host} since "
                f"{holder.get('since', '?')} (`{holder.get('command', '?')}`); wait for it to end (check: "
                f"`ps -p {pid} -o pid,etime,args` on {host}) or give this run another run.output_dir"
            ) from None
        # A clean end empties the file, so a holder still named here ended without releasing it (killed, crashed).
        if left := _lock_holder(fd):
            console.print(
                f"[yellow]note:[/] {step_name}: taking over the lock of pid {left.get('pid')} on {left.get('host')} "
                f"(since {left.get('since')}), which ended without releasing it", highlight=False,
            )
        holder = {
            "pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def run_step(
    step: Step, config: PipelineConfig, progress: Progress | None = None, locks: contextlib.ExitStack | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run `step` unless its outputs are up to date (`force`: from scratch whatever they are); returns its summary.

    The step's lock is held until the step ends, or, given `locks`, until that stack closes (`neu-det run-all` holds
    every step's lock to its end, so a second run cannot slip in between two steps). `force` forgets the outputs only
    once the lock is held: never those of a step another process is running."""
    out_dir = step_output_dir(config, step.name)
    fingerprint = step_fingerprint(step, config)
    if not is_main_process():
        return _run_locked(step, config, progress, out_dir, fingerprint)
    with contextlib.ExitStack() as own:
        (locks or own).enter_context(step_lock(config, step.name))
        if force:
            forget(config, step.name)
        return _run_locked(step, config, progress, out_dir, fingerprint)


def forget(config: PipelineConfig, name: str) -> None:
    """Make `name` re-run from scratch: without its state and summary, the recipe clears its folder."""
    out_dir = step_output_dir(config, name)
    for file in (SUMMARY_FILE, STATE_FILE):
        (out_dir / file).unlink(missing_ok=True)


def _run_locked(step: Step, config: PipelineConfig, progress: Progress | None, out_dir: Path, fingerprint: str) -> dict[str, Any]:
    summary = read_summary(out_dir)
    if summary and summary.get("status") == "complete" and summary.get("fingerprint") == fingerprint:
        console.print(f"[green]✓[/] {step.name}: up to date in {out_dir} (nothing to do)")
        return {**summary, "up_to_date": True}
    if not is_main_process():
        # Rank 0 prepares the folder before the process group forms; the others only compute.
        quiet = new_progress(disable=True)
        with CostMeter() as meter:
            result = step.run(StepContext(step=step, config=config, out_dir=out_dir, fingerprint=fingerprint, progress=quiet, meter=meter))
        write_rank_part(out_dir, meter.figures)
        return result

    resumed = _prepare_out_dir(out_dir, fingerprint)
    clear_rank_parts(out_dir)
    (out_dir / SUMMARY_FILE).unlink(missing_ok=True)
    resolved = dump_config(config)
    atomic_write_text(out_dir / CONFIG_FILE, resolved)
    full_hash = config_hash(config.to_dict())
    write_json(out_dir / STATE_FILE, {"fingerprint": fingerprint, "config_hash": full_hash})

    console.rule(f"[bold]{step.name}[/]: {step.title}" + (" (continuing an interrupted run)" if resumed else ""))
    with CostMeter() as meter, contextlib.ExitStack() as stack:
        if progress is None:
            progress = stack.enter_context(new_progress())
        ctx = StepContext(step=step, config=config, out_dir=out_dir, fingerprint=fingerprint, progress=progress, meter=meter)
        result = step.run(ctx)
    cost = collect(out_dir, meter.figures, world_size(), meter.parts)
    summary = {
        "step": step.name,
        "status": "complete",
        "fingerprint": fingerprint,
        "config_hash": full_hash,
        "seed": config.run.seed,
        "resumed": resumed,
        "wall_time_s": cost["wall_time_s"],
        "skipped": ctx.skipped,
        "dtype": None,  # steps that run a model say which dtype it ran in
        **result,
        "cost": cost,
    }
    write_json(out_dir / SUMMARY_FILE, summary)
    print_summary(summary, out_dir)
    return summary


def print_summary(summary: dict[str, Any], out_dir: Path) -> None:
    table = Table(title=f"{summary['step']} summary", show_header=False, title_justify="left")
    for key, value in summary.items():
        if key in ("step", "skipped") or isinstance(value, (dict, list)):
            continue
        table.add_row(key, str(value))
    table.add_row("skipped", str(len(summary.get("skipped", []))))
    if cost := summary.get("cost"):
        table.add_row("cost", cost_line(cost))
        if parts := cost.get("parts_s"):
            table.add_row("time per part", ", ".join(f"{name} {seconds:.1f} s" for name, seconds in parts.items()))
    table.add_row("outputs", str(out_dir))
    console.print(table)
