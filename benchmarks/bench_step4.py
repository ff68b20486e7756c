"""Step 4 images/s against a bare diffusers loop, images/s per batch size, control-map extraction per detector.

    python benchmarks/bench_step4.py --config configs/smoke.yaml
    python benchmarks/bench_step4.py --config configs/base.yaml data.root=/data/NEU-DET   # GPU node, real models

1. Step 4 vs bare: the whole step (`run_step`: plan, pipeline load, generation, PNG + VOC + mask + YOLO files,
   manifest, contact sheets) against a bare loop that loads the same pipeline (`from_pretrained` with the same
   ControlNets and sampler) and calls it on the same prompts, seeds, maps, steps and batch size, keeping the images
   in memory. Control maps come from a warm cache for both (their cost is measured in part 3). Repeats alternate,
   medians of images/s are compared.
2. The step at batch sizes 1, 4 and 8.
3. Each detector on the Step 0 training images: first run (detector load + extraction + PNG) and cached.
   HED, NormalBae and MiDaS use their real network classes with random weights (same cost as the real ones).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import functools
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
)
from loop_comparison import parse_with_threads, prepared_run

from neu_det_pipeline import step0_prepare
from neu_det_pipeline.artifacts import train_rows
from neu_det_pipeline.config import PipelineConfig, load_config
from neu_det_pipeline.generation.controls import (
    ControlMapCache,
    Detect,
    annotator_detect,
    controlnet_aux_modules,
    detector_key,
    file_sha256,
    load_detector,
)
from neu_det_pipeline.generation.maker import SyntheticImageMaker
from neu_det_pipeline.generation.pipeline import SCHEDULERS
from neu_det_pipeline.generation.plan import batches, build_plan, template_prompts
from neu_det_pipeline.models import resolve_device
from neu_det_pipeline.recipe import console, new_progress, run_step
from neu_det_pipeline.step4_generate import STEP

TEMPLATE_PROMPTS = ["generation.use_textual_inversion=false", "generation.use_lora=false", "generation.prompt_source=template"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/smoke.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--map-images", type=int, default=12, help="training images per detector in part 3")
    parser.add_argument("--map-resolution", type=int, default=None, help="control-map side in part 3 (default: generation.resolution)")
    parser.add_argument("--maps-only", action="store_true", help="part 3 only")
    return parse_with_threads(parser)


def step_config(args: argparse.Namespace, out: Path, *overrides: str) -> PipelineConfig:
    return load_config(args.config, [*args.overrides, *TEMPLATE_PROMPTS, f"run.output_dir={out}", *overrides])


def step_images_per_second(args: argparse.Namespace, run_dir: Path, out: Path, *overrides: str) -> float:
    """One fresh Step 4 run in `out` (Step 0 linked from `run_dir`); images / wall time of the whole step."""
    out.mkdir(parents=True)
    (out / "step0_prepare").symlink_to(run_dir / "step0_prepare")
    config = step_config(args, out, *overrides)
    started = time.perf_counter()
    with new_progress(disable=True) as quiet:
        summary = run_step(STEP, config, quiet)
    return summary["images"] / (time.perf_counter() - started)


def bare_images_per_second(config: PipelineConfig, run_dir: Path, cache: ControlMapCache) -> float:
    """diffusers alone: `from_pretrained` of the same pipeline, ControlNets and sampler, then one call per batch on
    the same prompts, seeds, maps and batches, images kept in memory (txt2img, one ControlNet per control)."""
    section, family = config.generation, config.models.pipeline
    rows = train_rows(run_dir / "step0_prepare")
    plan = build_plan(section, rows, template_prompts(section.prompt_template, rows, None), config.run.seed)
    device = resolve_device(config.run.device)
    maker = SyntheticImageMaker(config, lambda: None, cache, device, run_dir)  # only to read the cached maps
    work = [(batch, [[maker.control_map(item.source, c)[0] for c in section.controls] for item in batch])
            for batch in batches(plan, section.batch_size)]
    started = time.perf_counter()
    ids = getattr(config.models, f"controlnet_{family}")
    controlnets = [ControlNetModel.from_pretrained(getattr(ids, c)) for c in section.controls]
    pipeline_class = StableDiffusionControlNetPipeline if family == "sd15" else StableDiffusionXLControlNetPipeline
    pipe = pipeline_class.from_pretrained(getattr(config.models, family), controlnet=controlnets).to(device)
    scheduler_class, options = SCHEDULERS[section.scheduler]
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **options)
    pipe.set_progress_bar_config(disable=True)
    images = 0
    for batch, maps in work:
        images += len(pipe(
            prompt=[item.prompt for item in batch], negative_prompt=[section.negative_prompt] * len(batch),
            image=maps, num_inference_steps=section.num_inference_steps, guidance_scale=batch[0].guidance_scale,
            controlnet_conditioning_scale=[section.conditioning_scales[c] for c in section.controls],
            generator=[torch.Generator().manual_seed(item.seed) for item in batch],
            height=section.resolution, width=section.resolution,
        ).images)
    return images / (time.perf_counter() - started)


def random_annotator(name: str) -> object:
    """HED / NormalBae / MiDaS with their real networks and random weights (no download, same compute)."""
    aux = controlnet_aux_modules()
    if name == "hed":
        return aux.HEDdetector(aux.hed.ControlNetHED_Apache2().eval())
    if name == "normalbae":
        from controlnet_aux.normalbae.nets.NNET import NNET

        args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7)
        return aux.NormalBaeDetector(NNET(args).eval())
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    return aux.MidasDetector(DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True).eval())


def map_extraction(config: PipelineConfig, run_dir: Path, images: int, resolution: int) -> None:
    device, root = resolve_device(config.run.device), Path(config.data.root)
    sources = [(root / row["source"], file_sha256(root / row["source"])) for row in train_rows(run_dir / "step0_prepare")[:images]]
    print(f"control maps: {len(sources)} training images at {resolution} px")
    for name in ("pidinet", "hed", "canny", "depth_anything", "normalbae", "midas"):

        @functools.cache
        def detector(name: str = name) -> Detect:
            if name in ("hed", "normalbae", "midas"):
                return annotator_detect(random_annotator(name), device)
            return load_detector(name, config.models, device)

        with tempfile.TemporaryDirectory() as tmp:
            cache, key, rates = ControlMapCache(Path(tmp)), detector_key(name, config.models, resolution), []
            for _ in range(2):  # first run: load + extract + write; second: cache hits
                started = time.perf_counter()
                for path, sha in sources:
                    cache.get(path, sha, key, detector, resolution)
                rates.append(len(sources) / (time.perf_counter() - started))
        print(f"  {name:15s} first run {rates[0]:9.2f} images/s   cached {rates[1]:9.1f} images/s")


def compare_with_bare(args: argparse.Namespace, config: PipelineConfig, run_dir: Path, label: str,
                      bare: Callable[[PipelineConfig, Path, ControlMapCache], float], header: str) -> str:
    """Alternating repeats of the whole step and of `bare` on maps from one warm cache; prints the medians and their
    ratio (step / bare). Returns the override that points a step at that cache."""
    shared = run_dir / "maps"
    with_cache = f"generation.control_cache_dir={shared}"
    console.quiet = True
    step_images_per_second(args, run_dir, run_dir / "warm", with_cache)  # fills the map cache, imports everything
    cache = ControlMapCache(shared)
    rates: dict[str, list[float]] = {label: [], "bare diffusers": []}
    for repeat in range(args.repeats):
        rates[label].append(step_images_per_second(args, run_dir, run_dir / f"step-{repeat}", with_cache))
        rates["bare diffusers"].append(bare(config, run_dir, cache))
    console.quiet = False
    section = config.generation
    print(f"{header}{section.num_inference_steps} steps, {section.resolution} px, batch {section.batch_size}, "
          f"{len(section.controls)} ControlNets, {args.repeats} repeats, torch threads {torch.get_num_threads()}")
    for name, values in rates.items():
        print(f"{name:15s} median {statistics.median(values):7.3f} images/s   runs {[round(v, 3) for v in values]}")
    ours, bare_rate = (statistics.median(values) for values in rates.values())
    print(f"ratio step4 / bare diffusers = {ours / bare_rate:.3f} (target >= 0.95)")
    return with_cache


def main() -> None:
    args = parse_args()
    with prepared_run(args, TEMPLATE_PROMPTS, (step0_prepare.STEP,)) as (config, run_dir):
        map_resolution = args.map_resolution or config.generation.resolution
        if args.maps_only:
            map_extraction(config, run_dir, args.map_images, map_resolution)
            return
        with_cache = compare_with_bare(args, config, run_dir, "step4", bare_images_per_second, "")
        console.quiet = True
        for size in args.batch_sizes:
            rate = step_images_per_second(args, run_dir, run_dir / f"batch-{size}", with_cache, f"generation.batch_size={size}")
            print(f"batch {size:2d}: {rate:7.3f} images/s")
        console.quiet = False
        map_extraction(config, run_dir, args.map_images, map_resolution)


if __name__ == "__main__":
    main()
