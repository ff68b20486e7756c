"""Step 4 in an inpaint mode against a bare diffusers ControlNet inpainting loop on the same inputs.

    python benchmarks/bench_step4_inpaint.py --config configs/smoke.yaml
    python benchmarks/bench_step4_inpaint.py --config configs/base.yaml data.root=/data/NEU-DET   # GPU node, real models

The whole step (`run_step` with `generation.mode=inpaint_defects`: plan, pipeline load, the regenerated region and
its mask per image, generation, paste-back of the source, PNG + VOC + mask + YOLO files, manifest, contact sheets)
against a bare loop that loads the same pipeline (`StableDiffusionControlNetInpaintPipeline.from_pretrained` with
the same ControlNets and sampler) and calls it on the same prompts, seeds, control maps, source images, box masks,
strength, steps and batches, keeping the images in memory. Control maps come from a warm cache for both. Repeats
alternate, medians of images/s are compared (the same definition as `bench_step4.py`: ratio step / bare).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from bench_step4 import TEMPLATE_PROMPTS, compare_with_bare
from diffusers import ControlNetModel, StableDiffusionControlNetInpaintPipeline
from loop_comparison import parse_with_threads, prepared_run
from PIL import Image

from neu_det_pipeline import step0_prepare
from neu_det_pipeline.artifacts import train_rows
from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.data.export import box_mask
from neu_det_pipeline.data.neu_det import Box
from neu_det_pipeline.generation.controls import ControlMapCache
from neu_det_pipeline.generation.maker import SyntheticImageMaker
from neu_det_pipeline.generation.pipeline import SCHEDULERS
from neu_det_pipeline.generation.plan import batches, build_plan, template_prompts
from neu_det_pipeline.models import resolve_device

INPAINT = ["generation.mode=inpaint_defects", "generation.strength=1.0"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/smoke.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    return parse_with_threads(parser)


def maps_tensor(maps: list[Image.Image]) -> torch.Tensor:
    pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in maps])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)


def bare_inpaint_images_per_second(config: PipelineConfig, run_dir: Path, cache: ControlMapCache) -> float:
    """diffusers alone (SD 1.5): the inpainting pipeline called per batch on the plan's prompts and seeds, the cached
    maps, the sources at the generation resolution and their box masks, images kept in memory."""
    section, resolution = config.generation, config.generation.resolution
    rows = train_rows(run_dir / "step0_prepare")
    plan = build_plan(section, rows, template_prompts(section.prompt_template, rows, None), config.run.seed)
    device = resolve_device(config.run.device)
    maker = SyntheticImageMaker(config, lambda: None, cache, device, run_dir)  # only to read the cached maps
    # One (batch, 3, H, W) tensor in [0, 1] per ControlNet: the multi-ControlNet inpainting pipeline rejects a list
    # of maps per image ("A single batch of multiple conditionings are supported").
    work = [(batch, [maps_tensor([maker.control_map(item.source, c)[0] for item in batch]) for c in section.controls])
            for batch in batches(plan, section.batch_size)]
    started = time.perf_counter()
    controlnets = [ControlNetModel.from_pretrained(getattr(config.models.controlnet_sd15, c)) for c in section.controls]
    pipe = StableDiffusionControlNetInpaintPipeline.from_pretrained(config.models.sd15, controlnet=controlnets).to(device)
    scheduler_class, options = SCHEDULERS[section.scheduler]
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **options)
    pipe.set_progress_bar_config(disable=True)
    images = 0
    for batch, maps in work:
        sources, masks = [], []
        for item in batch:
            with Image.open(maker.source_path(item.source)) as source:
                sources.append(source.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC))
            boxes = [Box(**box) for box in item.source["boxes"]]
            masks.append(box_mask(boxes, item.source["width"], item.source["height"]).resize((resolution, resolution)))
        images += len(pipe(
            prompt=[item.prompt for item in batch], negative_prompt=[section.negative_prompt] * len(batch),
            image=sources, mask_image=masks, control_image=maps, strength=section.strength,
            num_inference_steps=section.num_inference_steps, guidance_scale=batch[0].guidance_scale,
            controlnet_conditioning_scale=[section.conditioning_scales[c] for c in section.controls],
            generator=[torch.Generator().manual_seed(item.seed) for item in batch],
            height=resolution, width=resolution,
        ).images)
    return images / (time.perf_counter() - started)


def main() -> None:
    args = parse_args()
    args.overrides = [*args.overrides, *INPAINT]
    with prepared_run(args, [*TEMPLATE_PROMPTS, *INPAINT], (step0_prepare.STEP,)) as (config, run_dir):
        if config.models.pipeline != "sd15":
            raise SystemExit("bench_step4_inpaint compares the SD 1.5 inpainting pipeline: set models.pipeline=sd15")
        compare_with_bare(args, config, run_dir, "step4 inpaint", bare_inpaint_images_per_second, f"{config.generation.mode}, ")


if __name__ == "__main__":
    main()
