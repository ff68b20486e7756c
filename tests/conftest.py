"""Shared fixtures: offline environment, tiny models, smoke configs, Step 0 outputs."""

from __future__ import annotations

import os

# Before any Hugging Face / ultralytics import: nothing in the tests may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["YOLO_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from neu_det_pipeline.config import PipelineConfig, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"
SAMPLE_ROOT = REPO / "data" / "neu-det-sample"
SHARED_NEU_DET = REPO.parent / "shared" / "neu-det"


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
        f"models.clip={tiny_models_dir / 'clip'}",
        f"models.open_clip=local-dir:{tiny_models_dir / 'open_clip'}",
        f"models.blip2={tiny_models_dir / 'blip2'}",
        f"models.dinov3={tiny_models_dir / 'dinov3'}",
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
