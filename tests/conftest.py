"""Shared fixtures: offline environment, tiny models, smoke configs, Step 0 outputs."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

# Before any Hugging Face / ultralytics import: nothing in the tests may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["YOLO_OFFLINE"] = "1"

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from neu_det_pipeline.config import PipelineConfig, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"
SAMPLE_ROOT = REPO / "data" / "neu-det-sample"
SHARED_NEU_DET = REPO.parent / "shared" / "neu-det"


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core CPU: one thread is several times faster than two contending ones.

    Module scope, named first through `pytestmark = pytest.mark.usefixtures("one_torch_thread")`: module-scoped
    fixtures that train run under it too.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every tiny model, built once per test session in hub layout."""
    from neu_det_pipeline.testing.tiny_models import build_tiny_models

    root = tmp_path_factory.mktemp("tiny-models")
    build_tiny_models(root)
    return root


def smoke_overrides(tiny_models_dir: Path, output_dir: Path) -> list[str]:
    """Overrides that point configs/smoke.yaml at the session's tiny models and a private output folder."""
    return [
        f"run.output_dir={output_dir}",
        f"run.tiny_models_dir={tiny_models_dir}",
        f"models.sd15={tiny_models_dir / 'sd15'}",
        f"models.sdxl={tiny_models_dir / 'sdxl'}",
        f"models.controlnet_sd15.softedge={tiny_models_dir / 'controlnet-sd15-softedge'}",
        f"models.controlnet_sd15.depth={tiny_models_dir / 'controlnet-sd15-depth'}",
        f"models.controlnet_sd15.normal={tiny_models_dir / 'controlnet-sd15-normal'}",
        f"models.controlnet_sdxl.softedge={tiny_models_dir / 'controlnet-sdxl-softedge'}",
        f"models.controlnet_sdxl.depth={tiny_models_dir / 'controlnet-sdxl-depth'}",
        f"models.controlnet_union_sdxl={tiny_models_dir / 'controlnet-sdxl-union'}",
        f"models.annotators={tiny_models_dir / 'annotators'}",
        f"models.clip={tiny_models_dir / 'clip'}",
        f"models.open_clip=local-dir:{tiny_models_dir / 'open_clip'}",
        f"models.blip2={tiny_models_dir / 'blip2'}",
        f"models.dinov3={tiny_models_dir / 'dinov3-timm'}",
        f"models.depth={tiny_models_dir / 'depth'}",
        f"data.root={SAMPLE_ROOT}",
    ]


@pytest.fixture
def make_config(tiny_models_dir: Path, tmp_path: Path):
    """`make_config("lora.rank=4", ...)`: configs/smoke.yaml on tiny models, writing under tmp_path/out."""

    def make(*overrides: str, output_dir: Path | None = None) -> PipelineConfig:
        out = output_dir or tmp_path / "out"
        return load_config(SMOKE_CONFIG, [*smoke_overrides(tiny_models_dir, out), *overrides])

    return make


@pytest.fixture(scope="session")
def step0_sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run output folder holding Step 0 on the bundled sample (smoke resolution), shared by a session.

    Tests that need later steps copy it (`shutil.copytree`) into their own output folder.
    """
    from neu_det_pipeline.recipe import run_step
    from neu_det_pipeline.step0_prepare import STEP

    out = tmp_path_factory.mktemp("step0-sample")
    run_step(STEP, load_config(SMOKE_CONFIG, [f"run.output_dir={out}", f"data.root={SAMPLE_ROOT}", "run.tiny_models_dir=null"]))
    return out


# Runs a training step's real module under `accelerate launch`; each rank also dumps its trained tensors.
RANK_DUMP_SCRIPT = """
import importlib
import sys
from pathlib import Path

from safetensors.torch import save_file

step_module, training_class_path, dump_dir, *argv = sys.argv[1:]
module_name, class_name = training_class_path.rsplit(".", 1)
training_class = getattr(importlib.import_module(module_name), class_name)
train_and_save = training_class.run


def run_and_dump(self, *args, **kwargs):
    result = train_and_save(self, *args, **kwargs)
    state = {name: tensor.cpu().contiguous() for name, tensor in self.trained_state().items()}
    save_file(state, Path(dump_dir) / f"rank{self.accelerator.process_index}.safetensors")
    return result


training_class.run = run_and_dump
importlib.import_module(step_module).main(argv)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_cpu_ranks(step_module: str, training_class: str, config_args: list[str], tmp_path: Path) -> list[dict]:
    """Run a step with 2 gloo CPU ranks (`--multi_gpu` + ACCELERATE_USE_CPU: `--cpu` would start only one);
    returns each rank's trained tensors after training."""
    from safetensors.torch import load_file

    script, dumps = tmp_path / "rank_dump.py", tmp_path / "ranks"
    script.write_text(RANK_DUMP_SCRIPT)
    dumps.mkdir()
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [*launch, str(script), step_module, training_class, str(dumps), *config_args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [load_file(dumps / f"rank{rank}.safetensors") for rank in range(2)]


@contextlib.contextmanager
def crash_after_checkpoint(step: int) -> Iterator[None]:
    """Training inside the block dies right after writing checkpoint `step`, like a killed job."""
    from neu_det_pipeline.training.loop import Checkpoints

    save = Checkpoints.save

    def save_then_crash(self, at_step: int, *args):
        path = save(self, at_step, *args)
        if at_step == step:
            raise RuntimeError("simulated crash")
        return path

    Checkpoints.save = save_then_crash
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            yield
    finally:
        Checkpoints.save = save


def skip_optimizer_step(monkeypatch: pytest.MonkeyPatch, skipped_call: int) -> list[int]:
    """accelerate's optimizer skips its `skipped_call`-th step as under fp16 when the grad scaler finds inf/NaN
    gradients, and says so (`step_was_skipped`); CPU runs have no grad scaler to do it for real. Returns the
    list that counts the calls."""
    from accelerate.optimizer import AcceleratedOptimizer

    calls: list[int] = []
    step = AcceleratedOptimizer.step

    def step_or_skip(self, closure=None):
        calls.append(len(calls) + 1)
        self._is_overflow = len(calls) == skipped_call  # what AcceleratedOptimizer.step records after GradScaler.step
        return None if self._is_overflow else step(self, closure)

    monkeypatch.setattr(AcceleratedOptimizer, "step", step_or_skip)
    return calls
