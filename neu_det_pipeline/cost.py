"""What a step cost: wall time, processes, GPU-hours, peak accelerator memory and peak resident memory.

:func:`neu_det_pipeline.recipe.run_step` measures every step with a :class:`CostMeter`; the result is the summary's
`cost` entry:

    wall_time_s          the step's wall time on the main process (after the up-to-date check, to the summary)
    processes            processes that ran the step (`accelerate launch --num_processes N`: N; plain python: 1)
    accelerator          the GPU's name when the step ran on one, else null (CPU)
    gpu_hours            wall time x the processes that used a GPU, in hours: the GPU time the step held
                         (0 on CPU; a process counts once it initialised CUDA)
    peak_gpu_allocated_mb / peak_gpu_reserved_mb
                         the largest over processes of torch.cuda.max_memory_allocated / _reserved on the process's
                         device, reset at the step's start (null on CPU). Reserved is what the caching allocator held:
                         the figure to compare with a GPU's memory
    peak_rss_mb          the largest over processes of the process's own peak resident memory during the step
                         (Linux: VmHWM after resetting it at the step's start; elsewhere the process-lifetime peak
                         `ru_maxrss`, marked by `rss_scope: "process lifetime"`). It is the whole process's memory, so
                         under `neu-det run-all` it includes what earlier steps of the same process still hold
    peak_rss_with_children_mb
                         the largest over processes of the resident memory of the process together with the processes it
                         started (data loader workers, process pools), sampled every SAMPLE_INTERVAL_S: it can miss a
                         peak shorter than that
    per_process          the same figures for each rank
    parts_s              where a step times its parts (`StepContext.part`), seconds per part (Step 5: loading,
                         metrics, curation, utility, report)

Step 4's summary adds `images_per_s` and `seconds_per_image` beside it. :func:`step_costs` and :func:`run_cost` total a
run folder's steps for `neu-det compare`.

Under `accelerate launch` each extra rank writes its figures to `cost.parts/rank-<N>.json` in the step folder when its
share of the step ends, and the main process collects them (no collective call: the main process often works on
alone after the last one, longer than a process-group timeout allows).
"""

from __future__ import annotations

import os
import re
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from neu_det_pipeline.io import read_json, write_json

PARTS_DIR = "cost.parts"
SAMPLE_INTERVAL_S = 0.2
RANK_WAIT_S = 120.0
"""How long the main process waits for the other ranks' figures after its own share ended."""
MB = 1024 * 1024


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset: bool) -> int:
    if reset:
        with open("/proc/self/status") as file:
            match = re.search(r"^VmHWM:\s+(\d+) kB", file.read(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _cuda() -> Any | None:
    """torch.cuda when this process has initialised CUDA; never imports torch or starts CUDA itself."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


class _TreeSampler(threading.Thread):
    """Samples the resident memory of this process and its descendants; keeps the peak."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="cost-rss-sampler")
        self.process = psutil.Process()
        self.peak = 0
        self.stopped = threading.Event()

    def sample(self) -> None:
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # ended between the listing and the read
                pass
        self.peak = max(self.peak, total)

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_INTERVAL_S):
            self.sample()

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        self.sample()
        return self.peak


class CostMeter:
    """Measures one process's share of a step between `start()` and `stop()`; as a context manager, over its block
    (`figures` after it, whatever happened inside)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.rss_reset = False
        self.sampler: _TreeSampler | None = None
        self.parts: dict[str, float] = {}
        self._part: tuple[str, float] | None = None
        self.figures: dict[str, Any] = {}

    def __enter__(self) -> CostMeter:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.figures = self.stop()  # ends the memory sampler whatever happens

    def start(self) -> CostMeter:
        if cuda := _cuda():
            cuda.reset_peak_memory_stats()
        self.rss_reset = _reset_peak_rss()
        self.sampler = _TreeSampler()
        self.sampler.sample()
        self.sampler.start()
        self.started = time.perf_counter()
        return self

    def part(self, name: str) -> None:
        """Time from now to the next `part` (or `stop`) counts toward `name`."""
        now = time.perf_counter()
        self._end_part(now)
        self._part = (name, now)

    def _end_part(self, now: float) -> None:
        if self._part:
            name, since = self._part
            self.parts[name] = self.parts.get(name, 0.0) + now - since
            self._part = None

    def stop(self) -> dict[str, Any]:
        """This process's figures (see the module docstring)."""
        now = time.perf_counter()
        self._end_part(now)
        tree = self.sampler.stop() if self.sampler else 0
        own = _peak_rss_bytes(self.rss_reset)
        figures: dict[str, Any] = {
            "rank": rank(),
            "wall_time_s": round(now - self.started, 3),
            "accelerator": None,
            "peak_gpu_allocated_mb": None,
            "peak_gpu_reserved_mb": None,
            "peak_rss_mb": round(own / MB, 1),
            "peak_rss_with_children_mb": round(max(tree, own) / MB, 1),
            "rss_scope": "step" if self.rss_reset else "process lifetime",
        }
        if cuda := _cuda():
            figures.update(accelerator=cuda.get_device_name(), peak_gpu_allocated_mb=round(cuda.max_memory_allocated() / MB, 1),
                           peak_gpu_reserved_mb=round(cuda.max_memory_reserved() / MB, 1))
        return figures


def clear_rank_parts(out_dir: Path) -> None:
    """Drop figures an interrupted run left behind (the main process, before the step starts)."""
    folder = out_dir / PARTS_DIR
    if folder.is_dir():
        for path in folder.glob("rank-*.json"):
            path.unlink()
        folder.rmdir()


def write_rank_part(out_dir: Path, figures: dict[str, Any]) -> None:
    """An extra rank's figures, for the main process to collect."""
    write_json(out_dir / PARTS_DIR / f"rank-{figures['rank']}.json", figures)


def _largest(rows: list[dict[str, Any]], key: str) -> float | None:
    """The largest `key` of the rows that have one (None: none has)."""
    values = [row[key] for row in rows if row.get(key) is not None]
    return max(values) if values else None


def collect(out_dir: Path, main: dict[str, Any], processes: int, parts_s: dict[str, float], wait_s: float = RANK_WAIT_S) -> dict[str, Any]:
    """The step's `cost` from the main process's figures and the other ranks' parts (waiting up to `wait_s` for them)."""
    folder = out_dir / PARTS_DIR
    wanted = [folder / f"rank-{r}.json" for r in range(1, processes)]
    deadline = time.monotonic() + wait_s
    while not all(path.is_file() for path in wanted) and time.monotonic() < deadline:
        time.sleep(0.1)
    missing = [rank for rank, path in enumerate(wanted, start=1) if not path.is_file()]
    per_process = [main] + [read_json(path) for path in wanted if path.is_file()]
    clear_rank_parts(out_dir)
    on_gpu = sum(1 for figures in per_process if figures["accelerator"])
    cost = {
        "wall_time_s": main["wall_time_s"],
        "processes": processes,
        "accelerator": main["accelerator"],
        "gpu_hours": round(main["wall_time_s"] * on_gpu / 3600, 5),
        "peak_gpu_allocated_mb": _largest(per_process, "peak_gpu_allocated_mb"),
        "peak_gpu_reserved_mb": _largest(per_process, "peak_gpu_reserved_mb"),
        "peak_rss_mb": _largest(per_process, "peak_rss_mb"),
        "peak_rss_with_children_mb": _largest(per_process, "peak_rss_with_children_mb"),
        "rss_scope": main["rss_scope"],
        "per_process": per_process,
    }
    if missing:  # read before the parts were cleared
        cost["missing_ranks"] = missing
    if parts_s:
        cost["parts_s"] = {name: round(seconds, 3) for name, seconds in parts_s.items()}
    return cost


def cost_line(cost: dict[str, Any]) -> str:
    """One line for a console summary (memory: the largest process's)."""
    parts = [f"{cost['wall_time_s']:.1f} s", f"{cost['processes']} process{'es' if cost['processes'] != 1 else ''}"]
    if cost.get("accelerator"):
        parts += [f"{cost['gpu_hours']:.4f} GPU-h on {cost['accelerator']}",
                  f"peak GPU memory {memory(cost['peak_gpu_allocated_mb'])} allocated / {memory(cost['peak_gpu_reserved_mb'])} reserved"]
    else:
        parts.append("CPU (0 GPU-h)")
    ram = f"peak RAM {memory(cost['peak_rss_mb'])}"
    if (cost["peak_rss_with_children_mb"] or 0) > (cost["peak_rss_mb"] or 0):
        ram += f" ({memory(cost['peak_rss_with_children_mb'])} with child processes)"
    parts.append(ram)
    if cost.get("missing_ranks"):
        parts.append(f"no figures from ranks {cost['missing_ranks']}")
    return ", ".join(parts)


def memory(mb: float | None) -> str:
    """MiB or GiB, for people."""
    if mb is None:
        return "—"
    return f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


# ------------------------------------------------------------------------------------- a run's cost


def step_costs(run_dir: Path) -> list[dict[str, Any]]:
    """Each finished step's `cost` in a run folder, with its name, where it was reused from and Step 4's speed."""
    rows = []
    for path in sorted(run_dir.glob("step*/summary.json")):
        summary = read_json(path)
        if summary.get("status") != "complete" or not summary.get("cost"):
            continue
        rows.append({"step": summary["step"], "reused_from": summary.get("reused_from"), "images_per_s": summary.get("images_per_s"),
                     "seconds_per_image": summary.get("seconds_per_image"), **summary["cost"]})
    return rows


def run_cost(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """An experiment's cost from its steps' (`step_costs`): wall time and GPU-hours summed (reused steps included: what
    the experiment costs on its own), peak memory the largest of any step, Step 4's speed."""
    generation = next((step for step in steps if step["step"] == "step4_generate"), {})
    return {
        "steps": len(steps),
        "wall_time_s": round(sum(step["wall_time_s"] for step in steps), 3),
        "gpu_hours": round(sum(step["gpu_hours"] for step in steps), 5),
        "peak_gpu_reserved_mb": _largest(steps, "peak_gpu_reserved_mb"),
        "peak_rss_with_children_mb": _largest(steps, "peak_rss_with_children_mb"),
        "seconds_per_image": generation.get("seconds_per_image"),
        "images_per_s": generation.get("images_per_s"),
    }


def run_cost_line(total: dict[str, Any]) -> str:
    """One line for the end of `neu-det run-all`: a `run_cost` total, for people."""
    line = f"{duration(total['wall_time_s'])} over {total['steps']} step{'s' if total['steps'] != 1 else ''}, {total['gpu_hours']:.4f} GPU-h"
    if total["peak_gpu_reserved_mb"] is not None:
        line += f", peak GPU memory {memory(total['peak_gpu_reserved_mb'])} reserved"
    line += f", peak RAM {memory(total['peak_rss_with_children_mb'])}"
    if total["seconds_per_image"] is not None:
        line += f", Step 4 {total['seconds_per_image']:.3g} s/image"
    return line


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"
