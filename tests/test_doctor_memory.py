"""`neu-det doctor`'s GPU memory estimates follow the configured precision, batch sizes and resolutions."""

from __future__ import annotations

from conftest import REPO

from neu_det_pipeline.config import load_config
from neu_det_pipeline.doctor import Report, gpu_memory, memory_estimates

BASE = REPO / "configs" / "base.yaml"
DIFFUSION_STEPS = ("step1_textual_inversion", "step3_lora", "step4_generate")
# SDXL has no default soft-edge ControlNet: the union ControlNet serves every control.
SDXL = ("models.pipeline=sdxl", "generation.union_controlnet=true")


def estimates(*overrides: str) -> dict[str, float]:
    return memory_estimates(load_config(BASE, list(overrides)))


def resolution(side: int) -> list[str]:
    return [f"textual_inversion.resolution={side}", f"lora.resolution={side}", f"generation.resolution={side}"]


def test_doubling_the_resolution_raises_the_diffusion_steps_only() -> None:
    low, high = estimates(*resolution(512)), estimates(*resolution(1024))
    for step in DIFFUSION_STEPS:
        # Activations grow with the pixel count, the weights do not: more, but less than four times more.
        assert low[step] < high[step] < 4 * low[step], step
    assert all(low[step] == high[step] for step in low if step not in DIFFUSION_STEPS)


def test_sdxl_at_1024_needs_more_than_at_512_and_more_than_sd15() -> None:
    sdxl_512, sdxl_1024 = estimates(*SDXL, *resolution(512)), estimates(*SDXL, *resolution(1024))
    sd15_512 = estimates(*resolution(512))
    for step in DIFFUSION_STEPS:
        assert sd15_512[step] < sdxl_512[step] < sdxl_1024[step], step


def test_batch_precision_and_checkpointing_move_the_figures() -> None:
    base = estimates()
    assert estimates("lora.train_batch_size=8")["step3_lora"] > base["step3_lora"]
    assert estimates("lora.gradient_checkpointing=true")["step3_lora"] < base["step3_lora"]
    assert estimates("run.mixed_precision=\"no\"")["step4_generate"] > base["step4_generate"]
    assert estimates("generation.cpu_offload=true")["step4_generate"] < base["step4_generate"]
    assert estimates("captions.prompt_style=blip2")["step2_captions"] > base["step2_captions"] + 6  # 3.9 B parameters in fp16


def test_too_large_for_the_gpu_is_a_problem_with_its_fix() -> None:
    config = load_config(BASE, [*SDXL, *resolution(1024)])
    report = Report()
    gpu_memory(config, [8.0], report)
    rows = dict((step, (needs, fits)) for step, needs, fits in report.memory)
    assert rows["step3_lora"][1] == "too large" and "(estimate)" in rows["step3_lora"][0]
    assert rows["step6_classifier"][1] == "fits"
    lora = [line for line in report.problems if line.startswith("step3_lora needs about")]
    assert len(lora) == 1 and "(estimate), the smallest GPU has 8 GiB" in lora[0] and "lora.gradient_checkpointing=true" in lora[0]

    roomy = Report()
    gpu_memory(config, [141.0], roomy)
    assert roomy.problems == []


def test_a_timm_backbone_is_counted_without_weights() -> None:
    # resnet50: 25.6 M parameters against DINOv3 ViT-S's 22 M, built on the meta device (nothing allocated or downloaded).
    assert estimates("classifier.backbone=timm:resnet50")["step6_classifier"] > estimates()["step6_classifier"]
