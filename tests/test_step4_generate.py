"""Step 4: ControlNet generation on tiny SD 1.5 / SDXL models and real sample images.

Images are compared as uint8 arrays. Where the same image is made in two different batches or processes, the
tolerance is 2 grey levels of 255: batched matrix products may round differently from single ones; a different
seed or input changes images by tens of levels.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, SAMPLE_ROOT, SMOKE_CONFIG, smoke_overrides
from PIL import Image

from neu_det_pipeline.artifacts import LORA_WEIGHTS_FILE, MANIFEST_FILE
from neu_det_pipeline.config import GenerationConfig, PipelineConfig, load_config
from neu_det_pipeline.data.export import box_mask, boxes_from_yolo
from neu_det_pipeline.data.neu_det import Box
from neu_det_pipeline.errors import ConfigError, MissingStepOutputError, PipelineError
from neu_det_pipeline.generation.controls import (
    AUGMENTATIONS,
    annotator_detect,
    augment_box,
    augment_image,
    augmented_size,
    controlnet_aux_modules,
    depth_anything_detect,
    load_detector,
)
from neu_det_pipeline.generation.pipeline import (
    ControlNetGenerator,
    cfg_rescale,
    rescaled_conditional,
)
from neu_det_pipeline.generation.plan import build_plan, image_seed
from neu_det_pipeline.io import read_json, read_jsonl, sha256_of_files, write_jsonl
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step4_generate import STEP

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOLERANCE = 2  # grey levels of 255, see the module docstring
TEMPLATE_PROMPTS = ("generation.use_textual_inversion=false", "generation.use_lora=false", "generation.prompt_source=template")
CPU = torch.device("cpu")




def with_step0(step0_sample_dir: Path, out: Path, classes: tuple[str, ...] = ("crazing", "scratches"), per_class: int = 1) -> Path:
    """`out` holding Step 0's outputs with only the first `per_class` training images of `classes`."""
    shutil.copytree(step0_sample_dir / "step0_prepare", out / "step0_prepare")
    manifest = out / "step0_prepare" / MANIFEST_FILE
    rows = sorted(read_jsonl(manifest), key=lambda row: row["id"])
    kept = [row for row in rows if row["split"] == "train" and row["class"] in classes]
    kept = [row for name in classes for row in [r for r in kept if r["class"] == name][:per_class]]
    write_jsonl(manifest, kept + [row for row in rows if row["split"] != "train"])
    return out


def config_for(tiny_models_dir: Path, out: Path, *overrides: str) -> PipelineConfig:
    return load_config(SMOKE_CONFIG, [*smoke_overrides(tiny_models_dir, out), *overrides])


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.int16)


def real_image(name: str = "crazing_13", size: int | None = None) -> Image.Image:
    with Image.open(SAMPLE_ROOT / "IMAGES" / f"{name}.jpg") as image:
        image = image.convert("RGB")
    return image.resize((size, size)) if size else image


def arrays(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def steered(changed: np.ndarray, base: np.ndarray) -> bool:
    """A control input was used: over 1 % of the values move. Tiny random ControlNets steer weakly (0.03-0.1 grey
    levels on average) but deterministically; an input the pipeline ignores changes no value at all."""
    return (changed != base).mean() > 0.01


# ------------------------------------------------------------------------------------------ plan


def test_plan_is_fixed_by_seed_source_and_index() -> None:
    rows = [{"id": f"{name}_{i}", "class": name} for name in ("crazing", "patches") for i in (3, 1, 2)]
    prompts = {row["id"]: f"p-{row['id']}" for row in rows}
    section = GenerationConfig(images_per_source=2, per_class_guidance={"patches": 9.0})
    plan = build_plan(section, rows, prompts, run_seed=5)
    assert [item.name for item in plan] == sorted(f"{row['id']}-s{i:03d}" for row in rows for i in range(2))
    assert all(item.seed == image_seed(5, item.source["id"], item.index) for item in plan)
    assert len({item.seed for item in plan}) == len(plan) and image_seed(6, "crazing_1", 0) != image_seed(5, "crazing_1", 0)
    assert {item.guidance_scale for item in plan if item.image_class == "patches"} == {9.0}
    assert {item.guidance_scale for item in plan if item.image_class == "crazing"} == {7.0}
    assert all(item.prompt == f"p-{item.source['id']}" for item in plan)

    quota = build_plan(GenerationConfig(images_per_class=7), rows, prompts, run_seed=5)
    crazing = [item for item in quota if item.image_class == "crazing"]
    assert len(crazing) == 7  # sources cycled: 3 + 3 + 1
    assert sorted((item.source["id"], item.index) for item in crazing) == sorted(
        [("crazing_1", 0), ("crazing_2", 0), ("crazing_3", 0), ("crazing_1", 1), ("crazing_2", 1), ("crazing_3", 1), ("crazing_1", 2)]
    )

    augmented = build_plan(GenerationConfig(images_per_class=6, layout_augmentations=["hflip", "rot90"]), rows, prompts, 5)
    layouts = [item.augmentation for item in augmented if item.image_class == "crazing"]
    assert sorted(layouts) == ["hflip", "hflip", "none", "none", "rot90", "rot90"]
    assert all(item.name.endswith(f"-{item.augmentation}") == (item.augmentation != "none") for item in augmented)


@pytest.mark.parametrize("augmentation", list(AUGMENTATIONS))
def test_boxes_move_with_the_pixels(augmentation: str, step0_sample_dir: Path) -> None:
    rows = [row for row in read_jsonl(step0_sample_dir / "step0_prepare" / MANIFEST_FILE) if len(row["boxes"]) > 1][:5]
    for row in rows:
        width, height = row["width"], row["height"]
        boxes = [Box(**box) for box in row["boxes"]]
        moved = [augment_box(box, width, height, augmentation) for box in boxes]
        expected = np.asarray(augment_image(box_mask(boxes, width, height), augmentation))
        got = np.asarray(box_mask(moved, *augmented_size(width, height, augmentation)))
        np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------------------- detectors


def test_every_detector_runs_on_a_real_image(tiny_models_dir: Path, tmp_path: Path) -> None:
    """Random weights in the real detector classes (no download), on a real 200x200 NEU-DET image."""
    aux = controlnet_aux_modules()
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel
    from controlnet_aux.normalbae.nets.NNET import NNET

    image, resolution = real_image(), 64
    assert image.size == (200, 200)
    torch.manual_seed(0)
    hed = aux.hed.ControlNetHED_Apache2()
    torch.save(hed.state_dict(), tmp_path / "ControlNetHED.pth")  # lllyasviel/Annotators file name
    models = config_for(tiny_models_dir, tmp_path / "out", f"models.annotators={tmp_path}").models
    normal_args = dict(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7)
    detectors = {
        "hed": load_detector("hed", models, CPU),  # through HEDdetector.from_pretrained(folder)
        "pidinet": load_detector("pidinet", config_for(tiny_models_dir, tmp_path / "out").models, CPU),
        "midas": annotator_detect(aux.MidasDetector(DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True).eval()), CPU),
        "normalbae": annotator_detect(aux.NormalBaeDetector(NNET(__import__("types").SimpleNamespace(**normal_args)).eval()), CPU),
        "canny": load_detector("canny", models, CPU),
        "depth_anything": depth_anything_detect(str(tiny_models_dir / "depth"), CPU),
    }
    for name, detect in detectors.items():
        made = detect(image, resolution)
        assert made.size == (resolution, resolution) and made.mode == "RGB", name
    edges = np.asarray(detectors["canny"](image, resolution))
    assert 0 < (edges > 0).mean() < 0.5  # a real crazing image has edges, not everywhere


def test_a_detector_that_cannot_load_names_its_key(tiny_models_dir: Path, tmp_path: Path) -> None:
    models = config_for(tiny_models_dir, tmp_path / "out", f"models.annotators={tmp_path}").models  # no weights there
    with pytest.raises(PipelineError, match=r"models\.annotators="):
        load_detector("hed", models, CPU)


# ------------------------------------------------------------------------------------- generator


def generator_for(tiny_models_dir: Path, tmp_path: Path, *overrides: str) -> ControlNetGenerator:
    config = config_for(tiny_models_dir, tmp_path / "out", *TEMPLATE_PROMPTS, *overrides)
    return ControlNetGenerator(config, CPU, torch.float32, tmp_path / "none", tmp_path / "none")


def control_maps(controls: list[str], names: list[str], size: int = 64) -> dict[str, list[Image.Image]]:
    """Real images as stand-in maps (what matters here is that they differ per image and per control)."""
    flips = {"softedge": None, "depth": Image.Transpose.FLIP_LEFT_RIGHT, "normal": Image.Transpose.ROTATE_90}
    return {
        c: [real_image(name, size) if flips[c] is None else real_image(name, size).transpose(flips[c]) for name in names]
        for c in controls
    }


SOURCES = ["crazing_13", "patches_1", "scratches_25", "inclusion_4"]


def test_an_image_depends_on_its_own_seed_not_on_its_batch(tiny_models_dir: Path, tmp_path: Path) -> None:
    generator = generator_for(tiny_models_dir, tmp_path)
    seeds, prompts = [11, 12, 13, 14], [f"a grayscale photo of defect {i}" for i in range(4)]
    batch = arrays(generator.generate(prompts, seeds, 7.0, control_maps(["softedge", "depth"], SOURCES)))
    again = arrays(generator.generate(prompts, seeds, 7.0, control_maps(["softedge", "depth"], SOURCES)))
    np.testing.assert_array_equal(batch, again)  # same seed, same inputs, same process: identical
    singles = np.concatenate([
        arrays(generator.generate([prompts[i]], [seeds[i]], 7.0, control_maps(["softedge", "depth"], [SOURCES[i]])))
        for i in range(4)
    ])
    assert np.abs(batch - singles).max() <= TOLERANCE
    other_seed = arrays(generator.generate(prompts[:1], [99], 7.0, control_maps(["softedge", "depth"], SOURCES[:1])))
    assert np.abs(other_seed[0] - batch[0]).mean() > 10 * TOLERANCE


@pytest.mark.parametrize("controls", [["softedge"], ["softedge", "depth", "normal"]], ids=["one", "three"])
def test_every_controlnet_steers_the_image(controls: list[str], tiny_models_dir: Path, tmp_path: Path) -> None:
    generator = generator_for(tiny_models_dir, tmp_path, f"generation.controls=[{','.join(controls)}]")
    assert len(generator.controlnets) == len(controls)
    maps = control_maps(controls, SOURCES[:2])
    base = arrays(generator.generate(["a photo"] * 2, [1, 2], 7.0, maps))
    for control in controls:
        changed = {**maps, control: [image.transpose(Image.Transpose.ROTATE_180) for image in maps[control]]}
        assert steered(arrays(generator.generate(["a photo"] * 2, [1, 2], 7.0, changed)), base), control


def test_union_controlnet_on_sdxl_takes_every_control(tiny_models_dir: Path, tmp_path: Path) -> None:
    controls = ["softedge", "depth", "normal"]  # normal: no SDXL ControlNet of its own
    generator = generator_for(
        tiny_models_dir, tmp_path, "models.pipeline=sdxl", "generation.union_controlnet=true", "generation.controls=[softedge,depth,normal]",
    )
    assert list(generator.controlnets) == ["union"] and type(generator.pipe).__name__ == "StableDiffusionXLControlNetUnionPipeline"
    maps = control_maps(controls, SOURCES[:2])
    base = arrays(generator.generate(["a photo"] * 2, [1, 2], 7.0, maps))
    assert base.shape == (2, 64, 64, 3)
    changed = {**maps, "normal": [image.transpose(Image.Transpose.ROTATE_180) for image in maps["normal"]]}
    assert steered(arrays(generator.generate(["a photo"] * 2, [1, 2], 7.0, changed)), base)


def test_union_controlnet_keeps_one_guidance_window_per_control_mode(tiny_models_dir: Path, tmp_path: Path) -> None:
    union = ("models.pipeline=sdxl", "generation.union_controlnet=true", "generation.controls=[softedge,depth]")
    # 2 steps: softedge acts on the first only, depth on the second only; collapsed, both would act on both.
    windows = ("generation.control_guidance_end.softedge=0.5", "generation.control_guidance_start.depth=0.5")
    per_mode = generator_for(tiny_models_dir, tmp_path / "per-mode", *union, *windows)
    assert per_mode.control_guidance == {"softedge": [0.0, 0.5], "depth": [0.5, 1.0]}  # what the manifest records
    maps = control_maps(["softedge", "depth"], SOURCES[:2])
    arguments = per_mode.control_arguments(maps)
    assert (arguments["control_guidance_start"], arguments["control_guidance_end"]) == ([0.0, 0.5], [0.5, 1.0])

    whole_run = generator_for(tiny_models_dir, tmp_path / "whole-run", *union)  # the collapsed window [0, 1] for both
    assert steered(arrays(per_mode.generate(["a photo"] * 2, [1, 2], 7.0, maps)), arrays(whole_run.generate(["a photo"] * 2, [1, 2], 7.0, maps)))


@pytest.mark.parametrize(
    "overrides", [(), ("models.pipeline=sdxl", "generation.union_controlnet=true")], ids=["sd15-multi-controlnet", "sdxl-union"]
)
def test_img2img_starts_from_the_source(overrides: tuple[str, ...], tiny_models_dir: Path, tmp_path: Path) -> None:
    generator = generator_for(tiny_models_dir, tmp_path, "generation.mode=img2img", "generation.strength=0.5", *overrides)
    maps = control_maps(["softedge", "depth"], SOURCES[:2])
    sources = [real_image(name, 64) for name in SOURCES[:2]]
    first = arrays(generator.generate(["a photo"] * 2, [1, 2], 7.0, maps, sources))
    np.testing.assert_array_equal(first, arrays(generator.generate(["a photo"] * 2, [1, 2], 7.0, maps, sources)))
    other_sources = [image.transpose(Image.Transpose.ROTATE_180) for image in sources]
    assert steered(arrays(generator.generate(["a photo"] * 2, [1, 2], 7.0, maps, other_sources)), first)


@pytest.mark.parametrize(
    ("scheduler", "karras", "expected"),
    [
        ("dpmsolver++", True, "DPMSolverMultistepScheduler"),
        ("unipc", False, "UniPCMultistepScheduler"),
        ("euler_a", False, "EulerAncestralDiscreteScheduler"),
        ("ddim", False, "DDIMScheduler"),
    ],
)
def test_samplers_by_name(scheduler: str, karras: bool, expected: str, tiny_models_dir: Path, tmp_path: Path) -> None:
    generator = generator_for(
        tiny_models_dir, tmp_path, f"generation.scheduler={scheduler}", f"generation.use_karras_sigmas={str(karras).lower()}",
    )
    assert type(generator.pipe.scheduler).__name__ == expected
    assert getattr(generator.pipe.scheduler.config, "use_karras_sigmas", False) == karras
    maps = control_maps(["softedge", "depth"], SOURCES[:1])
    first = arrays(generator.generate(["a photo"], [3], 7.0, maps))
    # Euler ancestral draws fresh noise every step: from the image's own generator, so it is still reproducible.
    np.testing.assert_array_equal(first, arrays(generator.generate(["a photo"], [3], 7.0, maps)))


def test_gpu_options_leave_cpu_runs_working(tiny_models_dir: Path, tmp_path: Path) -> None:
    options = ["channels_last", "compile", "vae_slicing", "vae_tiling", "cpu_offload"]
    generator = generator_for(tiny_models_dir, tmp_path, *(f"generation.{name}=true" for name in options))
    assert generator.gpu_options_ignored == ["compile", "cpu_offload"]  # CUDA-only: reported, not applied
    assert generator.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    maps = control_maps(["softedge", "depth"], SOURCES[:2])
    plain = arrays(generator_for(tiny_models_dir, tmp_path).generate(["a photo"] * 2, [1, 2], 7.0, maps))
    assert np.abs(arrays(generator.generate(["a photo"] * 2, [1, 2], 7.0, maps)) - plain).max() <= TOLERANCE


def test_rescaled_conditional_turns_the_pipeline_formula_into_cfg_rescale() -> None:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        rescale_noise_cfg,
    )

    generator = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 4, 8, 8, generator=generator), 3 * torch.randn(2, 4, 8, 8, generator=generator)
    for scale, phi in ((7.0, 0.7), (4.5, 1.0), (7.0, 0.0)):
        pipeline_combination = uncond + scale * (rescaled_conditional(uncond, cond, scale, phi) - uncond)
        expected = rescale_noise_cfg(uncond + scale * (cond - uncond), cond, guidance_rescale=phi)
        torch.testing.assert_close(pipeline_combination, expected, rtol=1e-5, atol=1e-5)


def test_cfg_rescale_changes_the_output_and_phi_zero_is_plain_cfg(tiny_models_dir: Path, tmp_path: Path) -> None:
    generator = generator_for(tiny_models_dir, tmp_path, "generation.guidance_rescale=0.7")
    maps = control_maps(["softedge", "depth"], SOURCES[:2])
    rescaled = arrays(generator.generate(["a photo"] * 2, [1, 2], 7.0, maps))

    plain = generator_for(tiny_models_dir, tmp_path, "generation.guidance_rescale=0.0")
    at_zero = arrays(plain.generate(["a photo"] * 2, [1, 2], 7.0, maps))
    # The pipeline called directly, without the step's wrapper: plain CFG as diffusers computes it.
    direct = plain.pipe(
        prompt=["a photo"] * 2, negative_prompt=[plain.section.negative_prompt] * 2, num_inference_steps=2, guidance_scale=7.0,
        generator=[torch.Generator().manual_seed(s) for s in (1, 2)], height=64, width=64, **plain.control_arguments(maps),
    ).images
    np.testing.assert_array_equal(at_zero, arrays(direct))
    assert np.abs(rescaled - at_zero).mean() > TOLERANCE

    unet = plain.pipe.unet
    with cfg_rescale(unet, 7.0, 0.0):
        assert not unet._forward_hooks  # phi = 0 adds nothing
    with cfg_rescale(unet, 7.0, 0.7):
        assert len(unet._forward_hooks) == 1
    assert not unet._forward_hooks


def test_sd15_controlnet_on_sdxl_is_one_line(tiny_models_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"models\.controlnet_sdxl\.softedge=.*is not a ControlNet for models\.sdxl"):
        generator_for(
            tiny_models_dir, tmp_path, "models.pipeline=sdxl", f"models.controlnet_sdxl.softedge={tiny_models_dir / 'controlnet-sd15-softedge'}",
        )


# ------------------------------------------------------------------------------------------ step


def test_step_writes_trainable_labelled_images(tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path) -> None:
    out = with_step0(step0_sample_dir, tmp_path / "run")
    overrides = (*TEMPLATE_PROMPTS, "generation.images_per_class=6", "generation.layout_augmentations=[hflip,vflip,rot90,rot180,rot270]")
    summary = run_step(STEP, config_for(tiny_models_dir, out, *overrides))
    step_dir = out / STEP.name
    rows = read_jsonl(step_dir / MANIFEST_FILE)
    assert summary["images"] == len(rows) == 12 and summary["images_per_class"] == {"crazing": 6, "scratches": 6}
    assert [row["name"] for row in rows] == sorted(row["name"] for row in rows)
    assert {row["augmentation"] for row in rows} == set(AUGMENTATIONS)  # one source per class: every layout once

    sources = {row["id"]: row for row in read_jsonl(step0_sample_dir / "step0_prepare" / MANIFEST_FILE)}
    classes = load_config(SMOKE_CONFIG).data.classes
    for row in rows:
        source = sources[row["source"]]
        expected = [augment_box(Box(**box), source["width"], source["height"], row["augmentation"]) for box in source["boxes"]]
        boxes = [Box(**box) for box in row["boxes"]]
        assert boxes == expected  # the source's boxes, moved with the layout (NEU-DET: 200x200 in and out)
        with Image.open(step_dir / row["file"]) as image:
            assert image.size == (200, 200) and image.mode == "L"
        voc = ET.parse(step_dir / row["label"]).getroot()
        assert [(o.findtext("name"), *(float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
                for o in voc.iter("object")] == [(b.label, b.xmin, b.ymin, b.xmax, b.ymax) for b in boxes]
        np.testing.assert_array_equal(pixels(step_dir / row["mask"]), np.asarray(box_mask(boxes, 200, 200)))
        from_yolo = boxes_from_yolo((step_dir / row["yolo_label"]).read_text(), 200, 200, classes)
        np.testing.assert_allclose([[b.xmin, b.ymin, b.xmax, b.ymax] for b in from_yolo], [[b.xmin, b.ymin, b.xmax, b.ymax] for b in boxes], atol=1e-3)
        assert (step_dir / row["yolo_image"]).is_file() and row["seed"] == image_seed(0, row["source"], int(row["name"].split("-s")[1][:3]))
    data = yaml.safe_load((step_dir / "yolo" / "data.yaml").read_text())
    assert data["names"] == yaml.safe_load((step0_sample_dir / "step0_prepare" / "yolo" / "data.yaml").read_text())["names"]
    assert sorted(p.name for p in (step_dir / "contact_sheets").iterdir()) == ["crazing.png", "scratches.png"]
    assert not (step_dir / "manifest.parts").exists()

    from neu_det_pipeline.yolo import check_yolo_dataset

    assert check_yolo_dataset(step_dir / "yolo" / "data.yaml", tmp_path / "yolo-settings")["nc"] == 6

    # A speed-only change keeps the images; another experiment sharing the map cache makes no map.
    again = run_step(STEP, config_for(tiny_models_dir, out, *overrides, "generation.batch_size=2"))
    assert again.get("up_to_date")
    shared = tmp_path / "maps"
    first = run_step(STEP, config_for(tiny_models_dir, with_step0(step0_sample_dir, tmp_path / "a"), *TEMPLATE_PROMPTS, f"generation.control_cache_dir={shared}"))
    second = run_step(STEP, config_for(
        tiny_models_dir, with_step0(step0_sample_dir, tmp_path / "b"), *TEMPLATE_PROMPTS, f"generation.control_cache_dir={shared}",
        "generation.guidance_scale=5.0",
    ))
    assert first["control_maps_made"] == 4 and second["control_maps_made"] == 0 and second["control_maps_cached"] >= 4


def test_tokens_prompts_and_adapters_come_from_steps_1_to_3(tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path) -> None:
    from neu_det_pipeline import step1_textual_inversion, step2_captions, step3_lora

    out = with_step0(step0_sample_dir, tmp_path / "run")
    config = config_for(tiny_models_dir, out, "generation.lora_scale=0.5")
    for step in (step1_textual_inversion.STEP, step2_captions.STEP, step3_lora.STEP, STEP):
        run_step(step, config)
    captions = {row["id"]: row["prompt"] for row in read_jsonl(out / "step2_captions" / "captions.jsonl")}
    rows = read_jsonl(out / STEP.name / MANIFEST_FILE)
    assert len(rows) == 2 and all(row["prompt"] == captions[row["source"]] and "<neu-" in row["prompt"] for row in rows)
    assert {row["lora_sha256"] for row in rows} == {sha256_of_files([out / "step3_lora" / LORA_WEIGHTS_FILE])}
    assert all(row["token_sha256"] and row["lora_scale"] == 0.5 for row in rows)


def test_missing_step_outputs_name_the_step_to_run(tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path) -> None:
    out = with_step0(step0_sample_dir, tmp_path / "run")
    with pytest.raises(MissingStepOutputError, match="step1_textual_inversion"):
        run_step(STEP, config_for(tiny_models_dir, out))  # defaults: Step 1 tokens, Step 2 prompts, Step 3 LoRA
    with pytest.raises(MissingStepOutputError, match="step3_lora"):
        run_step(STEP, config_for(tiny_models_dir, out, "generation.use_textual_inversion=false", "generation.prompt_source=template"))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("generation.scheduler=lms", "invalid value 'lms' for 'generation.scheduler'"),
        ("generation.controls=[edges]", "invalid value 'edges' for 'generation.controls.0'"),
        ("generation.images_per_class=0", "generation.images_per_class"),
        ("generation.detectors.softedge=midas", "generation.detectors.softedge='midas' makes depth maps"),
        ("generation.use_karras_sigmas=true generation.scheduler=euler_a", "use_karras_sigmas=true needs a scheduler"),
        ("models.pipeline=sdxl generation.controls=[softedge,normal]", "models.controlnet_sdxl.normal is null"),
        ("generation.union_controlnet=true", "needs models.pipeline=sdxl"),
        ("generation.use_textual_inversion=false", "prompt_source=captions uses the Step 2 prompts"),
    ],
)
def test_bad_generation_config_is_one_line(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE_CONFIG, override.split())
    assert expected in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------- processes and kills

KILL_AFTER_THIRD_IMAGE = """
import os, signal, sys
import neu_det_pipeline.generation.maker as maker

write, calls = maker.write_image_files, []

def write_then_die(*args, **kwargs):
    write(*args, **kwargs)
    calls.append(1)
    if len(calls) == 3:  # the third image is on disk, its manifest row is not
        os.kill(os.getpid(), signal.SIGKILL)

maker.write_image_files = write_then_die
from neu_det_pipeline.step4_generate import main

main(sys.argv[1:])
"""


def _step4(args: list[str], env: dict[str, str], launcher: list[str] | None = None, script: Path | None = None) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable]), *([str(script)] if script else ["-m", "neu_det_pipeline.step4_generate"]), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _images(step_dir: Path) -> dict[str, np.ndarray]:
    return {row["name"]: pixels(step_dir / row["file"]) for row in read_jsonl(step_dir / MANIFEST_FILE)}


def test_killed_run_continues_and_sharded_run_equals_one_process(tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    overrides = [*TEMPLATE_PROMPTS, "generation.images_per_source=3", "generation.batch_size=2"]

    def args(out: Path) -> list[str]:
        return ["--config", str(SMOKE_CONFIG), *smoke_overrides(tiny_models_dir, out), *overrides]

    straight = with_step0(step0_sample_dir, tmp_path / "straight")
    assert _step4(args(straight), env).returncode == 0

    killed = with_step0(step0_sample_dir, tmp_path / "killed")
    script = tmp_path / "kill_after_third_image.py"
    script.write_text(KILL_AFTER_THIRD_IMAGE)
    died = _step4(args(killed), env, script=script)
    assert died.returncode == -signal.SIGKILL
    resumed = _step4(args(killed), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = read_json(killed / STEP.name / "summary.json")
    assert summary["resumed"] and summary["images_from_earlier_run"] == 2 and summary["images_generated"] == 4
    rows = read_jsonl(killed / STEP.name / MANIFEST_FILE)
    assert len(rows) == len({row["name"] for row in rows}) == 6  # one line per image, no duplicate
    expected = _images(straight / STEP.name)
    got = _images(killed / STEP.name)  # every PNG decodes: none truncated
    assert got.keys() == expected.keys() and all(np.abs(got[n] - expected[n]).max() <= TOLERANCE for n in expected)

    sharded = with_step0(step0_sample_dir, tmp_path / "sharded")
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m",
        "neu_det_pipeline.step4_generate",
    ]
    two = subprocess.run([*launch, *args(sharded)], capture_output=True, text=True, cwd=REPO, env={**env, "ACCELERATE_USE_CPU": "true"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert read_json(sharded / STEP.name / "summary.json")["processes"] == 2
    assert read_jsonl(sharded / STEP.name / MANIFEST_FILE) == read_jsonl(straight / STEP.name / MANIFEST_FILE)
    got = _images(sharded / STEP.name)
    assert got.keys() == expected.keys() and all(np.abs(got[n] - expected[n]).max() <= TOLERANCE for n in expected)


def test_missing_step_output_on_the_command_line_is_one_line(tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path) -> None:
    out = with_step0(step0_sample_dir, tmp_path / "run")
    result = _step4(["--config", str(SMOKE_CONFIG), *smoke_overrides(tiny_models_dir, out), "generation.use_textual_inversion=false",
                     "generation.prompt_source=template"], {**os.environ, "HF_HUB_OFFLINE": "1"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "step3_lora" in errors[0] and "Traceback" not in result.stderr
