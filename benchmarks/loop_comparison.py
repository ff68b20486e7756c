"""Side-by-side throughput of a step's training loop and a bare reference loop, in one process.

Each loop is `loop(config, run_dir, steps) -> [end time of every optimizer step]`. Repeats alternate the
loops with the same seeds, the first `--warmup` steps of each run are excluded, medians are compared.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from neu_det_pipeline.config import PipelineConfig, load_config
from neu_det_pipeline.recipe import Step, console, new_progress, run_step
from neu_det_pipeline.testing.tiny_models import build_tiny_models

Loop = Callable[[PipelineConfig, Path, int], list[float]]


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=Path("configs/smoke.yaml"))
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per timed run")
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from each timing")
    parser.add_argument("--repeats", type=int, default=5)
    return parse_with_threads(parser)


def parse_with_threads(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Every benchmark's last arguments: torch threads (applied here) and config `key=value` overrides."""
    # On a shared 2-core CPU, two OpenMP threads made single runs swing tenfold; one thread is steady.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


@contextmanager
def prepared_run(args: argparse.Namespace, overrides: list[str], upstream: tuple[Step, ...]) -> Iterator[tuple[PipelineConfig, Path]]:
    """A temporary run folder with the upstream steps done quietly; yields (config, run folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(args.config, [*args.overrides, f"run.output_dir={tmp}", *overrides])
        if config.run.tiny_models_dir is not None:
            build_tiny_models(config.run.tiny_models_dir)
        console.quiet = True  # the upstream steps' tables are not what is measured
        with new_progress(disable=True) as quiet:
            for step in upstream:
                run_step(step, config, quiet)
        console.quiet = False
        yield config, Path(tmp)


def steps_per_second(stamps: list[float], warmup: int) -> float:
    """Throughput from the time each optimizer step ended, the first `warmup` steps excluded."""
    timed = stamps[warmup:]
    return (len(timed) - 1) / (timed[-1] - timed[0])


def compare(loops: dict[str, Loop], config: PipelineConfig, run_dir: Path, args: argparse.Namespace) -> float:
    """Time every loop `args.repeats` times, alternating; print medians; return ratio first loop / second."""
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for repeat in range(args.repeats):
        for name, loop in loops.items():
            torch.manual_seed(repeat)
            random.seed(repeat)
            rates[name].append(steps_per_second(loop(config, run_dir, args.steps), args.warmup))
    print(f"{args.steps} steps ({args.warmup} warm-up) x {args.repeats} repeats, torch threads {torch.get_num_threads()}")
    for name, values in rates.items():
        print(f"{name:15s} median {statistics.median(values):7.2f} steps/s   runs {[round(v, 2) for v in values]}")
    ours, bare = (statistics.median(values) for values in rates.values())
    print(f"ratio {' / '.join(rates)} = {ours / bare:.3f} (target >= 0.95)")
    return ours / bare
