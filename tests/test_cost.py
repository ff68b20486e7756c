"""What a step cost (neu_det_pipeline.cost): every summary carries it, the RAM peak is the step's own (not the
process lifetime's), child processes count, other ranks' figures are collected, parts are timed, runs are totalled."""

from __future__ import annotations

import mmap
import subprocess
import sys
import time
from pathlib import Path

import psutil

from neu_det_pipeline import cost
from neu_det_pipeline.io import read_json, write_json

MB = 1024 * 1024


def test_step_summary_records_its_cost(step0_sample_dir: Path) -> None:
    summary = read_json(step0_sample_dir / "step0_prepare" / "summary.json")
    figures = summary["cost"]
    assert figures["wall_time_s"] == summary["wall_time_s"] > 0
    assert figures["processes"] == 1 and len(figures["per_process"]) == 1
    # Step 0 never touches CUDA: no accelerator, no GPU time, no GPU memory.
    assert figures["accelerator"] is None and figures["gpu_hours"] == 0.0 and figures["peak_gpu_reserved_mb"] is None
    assert 0 < figures["peak_rss_mb"] <= figures["peak_rss_with_children_mb"]
    assert figures["rss_scope"] == "step"
    assert "CPU (0 GPU-h)" in cost.cost_line(figures)


def _resident(size: int) -> mmap.mmap:
    """Fresh anonymous pages, every one touched: resident whatever the allocator holds back for reuse
    (a numpy array could land in heap memory an earlier test freed but glibc kept, and never raise RSS)."""
    block = mmap.mmap(-1, size)
    page = b"\x01" * mmap.PAGESIZE
    for _ in range(size // mmap.PAGESIZE):
        block.write(page)
    return block


def test_peak_ram_is_the_steps_own_and_counts_children() -> None:
    _resident(120 * MB).close()  # a peak before the step, unmapped before it starts
    meter = cost.CostMeter().start()
    at_start = psutil.Process().memory_info().rss
    inside = _resident(40 * MB)
    child = "import time; held = b'1' * (80 * 2**20); time.sleep(1)"
    subprocess.run([sys.executable, "-S", "-c", child], check=True)
    inside.close()
    figures = meter.stop()
    assert figures["rss_scope"] == "step"
    peak = figures["peak_rss_mb"] * MB
    assert peak >= at_start + 35 * MB  # the step's own allocation
    assert peak < at_start + 100 * MB  # not the 120 MB peak from before the step (ru_maxrss would report it)
    assert figures["peak_rss_with_children_mb"] * MB >= peak + 60 * MB  # the child held 80 MB while sampled


def test_other_ranks_figures_are_collected(tmp_path: Path) -> None:
    def figures(rank: int, gpu_mb: float, rss_mb: float) -> dict:
        return {"rank": rank, "wall_time_s": 1800.0, "accelerator": "GPU", "peak_gpu_allocated_mb": gpu_mb / 2,
                "peak_gpu_reserved_mb": gpu_mb, "peak_rss_mb": rss_mb, "peak_rss_with_children_mb": rss_mb, "rss_scope": "step"}

    cost.write_rank_part(tmp_path, figures(1, 9000.0, 100.0))
    cost.write_rank_part(tmp_path, figures(2, 7000.0, 300.0))
    collected = cost.collect(tmp_path, figures(0, 8000.0, 200.0), 3, {"metrics": 1.23456})
    assert [f["rank"] for f in collected["per_process"]] == [0, 1, 2]
    assert collected["gpu_hours"] == 1.5  # half an hour on three GPUs
    assert collected["peak_gpu_reserved_mb"] == 9000.0 and collected["peak_rss_mb"] == 300.0
    assert collected["parts_s"] == {"metrics": 1.235} and "missing_ranks" not in collected
    assert not (tmp_path / cost.PARTS_DIR).exists()
    lonely = cost.collect(tmp_path, figures(0, 8000.0, 200.0), 2, {}, wait_s=0)
    assert lonely["missing_ranks"] == [1] and "no figures from ranks [1]" in cost.cost_line(lonely)
    cost.write_rank_part(tmp_path, figures(1, 9000.0, 100.0))  # rank 2 of 3 never reports
    partial = cost.collect(tmp_path, figures(0, 8000.0, 200.0), 3, {}, wait_s=0)
    assert partial["missing_ranks"] == [2] and [f["rank"] for f in partial["per_process"]] == [0, 1]


def test_parts_are_timed_between_marks() -> None:
    meter = cost.CostMeter().start()
    meter.part("metrics")
    time.sleep(0.2)
    meter.part("utility")
    time.sleep(0.1)
    meter.part("metrics")
    time.sleep(0.1)
    figures = meter.stop()
    assert meter.parts["metrics"] >= 0.3 and meter.parts["utility"] >= 0.1
    assert meter.parts["metrics"] + meter.parts["utility"] <= figures["wall_time_s"] + 0.001  # wall time kept to ms


def test_run_cost_totals_steps(tmp_path: Path) -> None:
    def step(name: str, wall: float, gpu_h: float, reserved: float | None, **extra) -> None:
        write_json(tmp_path / name / "summary.json", {"step": name, "status": "complete", **extra, "cost": {
            "wall_time_s": wall, "processes": 1, "gpu_hours": gpu_h, "peak_gpu_allocated_mb": reserved, "peak_gpu_reserved_mb": reserved,
            "peak_rss_mb": 500.0, "peak_rss_with_children_mb": 800.0}})

    step("step0_prepare", 10.0, 0.0, None)
    step("step3_lora", 3600.0, 2.0, 20000.0, reused_from="/runs/baseline")
    step("step4_generate", 1800.0, 0.5, 12000.0, images_per_s=2.0, seconds_per_image=0.5)
    (tmp_path / "step5_evaluate").mkdir()  # no summary: unfinished, not counted
    steps = cost.step_costs(tmp_path)
    assert [s["step"] for s in steps] == ["step0_prepare", "step3_lora", "step4_generate"]
    assert steps[1]["reused_from"] == "/runs/baseline"
    total = cost.run_cost(steps)
    assert total == {"steps": 3, "wall_time_s": 5410.0, "gpu_hours": 2.5, "peak_gpu_reserved_mb": 20000.0,
                     "peak_rss_with_children_mb": 800.0, "seconds_per_image": 0.5, "images_per_s": 2.0}
    assert cost.run_cost_line(total) == "1.50 h over 3 steps, 2.5000 GPU-h, peak GPU memory 19.53 GiB reserved, peak RAM 800 MiB, Step 4 0.5 s/image"
    on_cpu = cost.run_cost(steps[:1])
    assert cost.run_cost_line(on_cpu) == "10.0 s over 1 step, 0.0000 GPU-h, peak RAM 800 MiB"
