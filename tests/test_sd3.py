"""`models.pipeline: sd3` (SD3 Medium, experimental): what the config refuses and why, the SD3 generator on tiny
SD3 models, one tiny Step 4 run with the unchanged output contract, doctor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SMOKE_CONFIG, smoke_overrides
from test_step4_generate import SOURCES, arrays, control_maps, with_step0

from neu_det_pipeline.config import PipelineConfig, load_config
from neu_det_pipeline.errors import ConfigError
from neu_det_pipeline.io import read_json, read_jsonl
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step4_generate import STEP

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models on a shared CPU

BASE = REPO / "configs" / "base.yaml"
SD3 = (
    "models.pipeline=sd3", "generation.scheduler=flow_match_euler", "generation.controls=[canny, depth]",
    "generation.use_textual_inversion=false", "generation.use_lora=false", "generation.prompt_source=template",
)  # fmt: skip
TOLERANCE = 2
"""Grey levels (of 255) by which a batched and a single call may differ: batched matrix products round differently."""


def sd3_config(tiny_models_dir: Path, out: Path, *overrides: str) -> PipelineConfig:
    return load_config(SMOKE_CONFIG, [
        *smoke_overrides(tiny_models_dir, out), *SD3, f"models.sd3={tiny_models_dir / 'sd3'}",
        f"models.controlnet_sd3.canny={tiny_models_dir / 'controlnet-sd3-canny'}",
        f"models.controlnet_sd3.depth={tiny_models_dir / 'controlnet-sd3-depth'}", *overrides,
    ])  # fmt: skip


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["generation.scheduler=unipc"], r"generation\.scheduler='unipc' does not apply to models\.pipeline=sd3: .*flow-matching .*set generation\.scheduler=flow_match_euler"),
        (["generation.scheduler=dpmsolver++"], r"generation\.scheduler='dpmsolver\+\+' does not apply to models\.pipeline=sd3"),
        (["generation.guidance_rescale=0.7"], r"generation\.guidance_rescale=0\.7 does not apply to models\.pipeline=sd3: CFG rescale .* set generation\.guidance_rescale=0"),
        (["generation.use_textual_inversion=true", "generation.prompt_source=captions"], r"use_textual_inversion=true does not apply to models\.pipeline=sd3: .*three text encoders"),
        (["generation.use_lora=true"], r"use_lora=true does not apply to models\.pipeline=sd3: diffusers loads SD3 transformer LoRAs, but Step 3 trains SD 1\.5 / SDXL UNet adapters only"),
        (["generation.mode=img2img"], r"generation\.mode=img2img does not apply to models\.pipeline=sd3"),
        (["generation.controls=[softedge, depth]"], r"generation\.controls has 'softedge' but no public SD3 Medium ControlNet is trained on softedge maps .*use generation\.controls from \['depth', 'canny'\] \(InstantX/SD3-Controlnet-Canny, -Depth\).* or models\.pipeline=sd15 / sdxl"),
        (["models.pipeline=sd15"], r"generation\.scheduler=flow_match_euler is the flow-matching sampler of models\.pipeline=sd3"),
    ],
)
def test_what_sd3_cannot_honour_is_refused_with_the_reason(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as error:
        load_config(BASE, [*SD3, *overrides])
    assert "\n" not in str(error.value)


def test_the_experiment_and_the_defaults() -> None:
    experiment = load_config(REPO / "configs" / "experiments" / "exp_e_sd3.yaml")
    assert experiment.models.sd3 == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert experiment.controlnet_ids() == {
        "canny": ("models.controlnet_sd3.canny", "InstantX/SD3-Controlnet-Canny"),
        "depth": ("models.controlnet_sd3.depth", "InstantX/SD3-Controlnet-Depth"),
    }
    assert experiment.generation.scheduler == "flow_match_euler" and experiment.generation.resolution == 1024
    assert load_config(BASE).models.pipeline == "sd15"


def test_steps_1_and_3_refuse_sd3_with_one_line() -> None:
    from neu_det_pipeline.training.diffusion import base_model

    with pytest.raises(ConfigError, match=r"models\.pipeline=sd3 is for Step 4 only: Steps 1 .* and 3 .* train SD 1\.5 / SDXL"):
        base_model(load_config(BASE, list(SD3)))


def test_doctor_says_sd3_is_gated_and_needed_by_step4_only() -> None:
    from neu_det_pipeline.doctor import diagnose, memory_estimates, model_needs

    config = load_config(REPO / "configs" / "experiments" / "exp_e_sd3.yaml")
    needs = {need.key: need.steps for need in model_needs(config)}
    assert needs["models.sd3"] == ["step4_generate"] and needs["models.controlnet_sd3.canny"] == ["step4_generate"]
    report = diagnose(config)
    if any(need.key == "models.sd3" and need.where == "to download" for need in report.models):
        assert any(problem.startswith("models.sd3='stabilityai/stable-diffusion-3-medium-diffusers' is a gated model") for problem in report.problems)
    assert "step4_generate" not in memory_estimates(config) and "step6_classifier" in memory_estimates(config)


# ---------------------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def generator(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from neu_det_pipeline.generation.sd3 import SD3ControlNetGenerator

    return SD3ControlNetGenerator(sd3_config(tiny_models_dir, tmp_path_factory.mktemp("sd3")), torch.device("cpu"), torch.float32)


def test_an_sd3_image_depends_on_its_seed_and_maps_only(generator) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3MultiControlNetModel

    assert isinstance(generator.pipe.scheduler, FlowMatchEulerDiscreteScheduler) and generator.pipe.scheduler.config.shift == 3.0
    assert isinstance(generator.pipe.controlnet, SD3MultiControlNetModel)
    prompt, maps = ["a grayscale photo of scratches"], _maps(SOURCES[:2])
    first = {c: m[:1] for c, m in maps.items()}
    once, again = (arrays(generator.generate(prompt, [4], 5.0, first)) for _ in range(2))
    # diffusers samples the control latents from the global random generator: without the posterior mean, a second
    # call (or another batch) gives another image.
    np.testing.assert_array_equal(once, again)
    other_maps = arrays(generator.generate(prompt, [4], 5.0, {c: m[1:] for c, m in maps.items()}))
    assert (other_maps != once).mean() > 0.01  # the maps steer the image


def _maps(names: list[str]) -> dict[str, list]:
    """Real images as stand-in maps, different per control."""
    return {"canny": control_maps(["softedge"], names)["softedge"], "depth": control_maps(["depth"], names)["depth"]}


def test_step4_on_sd3_keeps_the_output_contract(
    generator, tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import neu_det_pipeline.step4_generate as step4

    made_with: list[PipelineConfig] = []
    # The module's generator was built from the same models and generation settings: loading them again costs seconds.
    monkeypatch.setattr(step4, "SD3ControlNetGenerator", lambda config, *args: made_with.append(config) or generator)
    out = with_step0(step0_sample_dir, tmp_path / "out")
    summary = run_step(STEP, sd3_config(tiny_models_dir, out))
    rows = read_jsonl(out / STEP.name / "manifest.jsonl")
    assert len(made_with) == 1 and made_with[0].generation == generator.section
    assert summary["images"] == len(rows) == 2 and summary["models"]["base"] == str(tiny_models_dir / "sd3")
    assert set(summary["models"]["controlnets"]) == {"canny", "depth"} and summary["dtype"] == "fp32"
    for row in rows:
        assert row["scheduler"] == "flow_match_euler" and row["models"]["base"] == str(tiny_models_dir / "sd3")
        assert row["prompt"] == f"a grayscale photo of {row['class'].replace('_', ' ')} on a steel strip"
        for key in ("file", "label", "mask", "yolo_image", "yolo_label"):
            assert (out / STEP.name / row[key]).is_file()
    assert (out / STEP.name / "yolo" / "data.yaml").is_file()
    assert read_json(out / STEP.name / "summary.json")["status"] == "complete"


def test_doctor_online_names_gated_access_and_a_controlnet_for_another_sd3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from huggingface_hub import constants
    from test_doctor_online import GB, StandInHub, as_json, config_repo

    from neu_det_pipeline.doctor import model_needs
    from neu_det_pipeline.hub_check import check_online

    config = load_config(REPO / "configs" / "experiments" / "exp_e_sd3.yaml")
    transformer = {"num_attention_heads": 24, "attention_head_dim": 64}  # SD3 Medium: 1536 wide
    sd3_files = {"model_index.json": as_json({"_class_name": "StableDiffusion3ControlNetPipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}),
                 "transformer/config.json": as_json(transformer), "transformer/diffusion_pytorch_model.safetensors": 4 * GB}
    hub = StandInHub()
    hub.repos = {
        config.models.sd3: {"files": sd3_files, "gated": True, "access": True},
        "InstantX/SD3-Controlnet-Canny": config_repo(transformer, "diffusion_pytorch_model.safetensors"),
        # SD3.5 Large's width: 38 heads of 64.
        "InstantX/SD3-Controlnet-Depth": config_repo({"num_attention_heads": 38, "attention_head_dim": 64}, "diffusion_pytorch_model.safetensors"),
    }
    thread = threading.Thread(target=hub.server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    sd3_needs = [need for need in model_needs(config) if need.key.startswith(("models.sd3", "models.controlnet_sd3"))]
    try:
        problems = check_online(config, sd3_needs).problems
        hub.repos[config.models.sd3]["access"] = False
        locked = check_online(config, sd3_needs).problems
    finally:
        hub.server.shutdown()
        hub.server.server_close()
    assert not any("Controlnet-Canny" in problem for problem in problems)
    assert any(problem.startswith("models.controlnet_sd3.depth='InstantX/SD3-Controlnet-Depth' is 2432 wide, the transformer of models.sd3 is 1536") for problem in problems)
    assert any(problem.startswith("models.sd3='stabilityai/stable-diffusion-3-medium-diffusers' is gated and your token has no access") for problem in locked)
