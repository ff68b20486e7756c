"""Step 4: labelled synthetic defects from ControlNet (soft-edge / depth / normal / canny maps of real images).

    python -m neu_det_pipeline.step4_generate --config configs/smoke.yaml
    accelerate launch -m neu_det_pipeline.step4_generate --config configs/base.yaml data.root=/data/NEU-DET

Each Step 0 training image gives control maps (cached by content) and `generation.images_per_source` images
(or `images_per_class` per class), made with the Step 1 tokens, the Step 2 prompt and the Step 3 adapters; every
image keeps its source's boxes. Several processes (`accelerate launch --num_processes N`) share the work list;
the result equals a single-process run. A killed run continues with the same command, making only what is
missing.

`generation.mode`: `txt2img` (pure noise), `img2img` (the noised source), `inpaint_defects` (only the boxes, grown
by `generation.mask_dilation` px with a linear feather, are regenerated on the real background) or
`inpaint_background` (the boxes are kept, the rest regenerated), with diffusers' ControlNet inpainting pipelines
(`models.sd15_inpaint` / `models.sdxl_inpaint`: a dedicated 9-channel checkpoint; null: the base model). In the
inpaint modes the decoded image is blended with the source by the feathered weights, so every pixel outside the
regenerated region is exactly the source's (`generation.regions`).

`generation.layout: transplant` pastes `transplant_count` defects of other training images of the same class at free
positions of each source (`generation.transplant`); maps come from the new layout, the inpaint modes also regenerate
the seam bands, and the new boxes go into every label file. `generation.candidates: N` makes N images per planned
image (own seeds, the first the plan's) and `generation.select_by` keeps one (`clip`: CLIP prompt score;
`lpips_in_box`: of the candidates whose CLIP score is at least their median, the one whose boxes differ most from
the source's by LPIPS; `generation.selection`); only the kept one is written.

Each control acts within its own `generation.control_guidance_start/end` window, with one ControlNet per control
and with the SDXL union ControlNet alike (one window per control mode); the manifest's `control_guidance` is
what the pipeline was given. `models.pipeline: sd3` (experimental) generates with SD3 Medium and its ControlNets
(`neu_det_pipeline.generation.sd3`); the outputs are the same. Nothing runs under autocast: the SDXL pipelines
upcast an fp16 VAE to fp32 for decoding when its config says `force_upcast`.

Outputs in `<run.output_dir>/step4_generate/` (later steps rely on this layout):
    images/<class>/<name>.png       synthetic image at the source size, grayscale (`generation.output_*`)
    labels/<name>.xml               Pascal VOC boxes, the source's boxes in output coordinates
    masks/<name>.png                0/255 box mask
    yolo/images/, yolo/labels/      the same as an ultralytics dataset; yolo/data.yaml names = Step 0's
    manifest.jsonl                  one row per image: files, source, class, boxes, prompt, seed, controls, sampler,
                                    guidance, models, LoRA / token hashes, augmentation, mode, strength,
                                    mask_dilation (inpaint modes), layout, `transplant` (layout transplant:
                                    requested count; per pasted defect its donor id, file and box and its new
                                    box, the last entries of `boxes`), `select_by` and `candidates` (selection:
                                    per candidate seed, scores, `kept`; `seed` is the kept one's) (sorted by name)
    controls/<detector>-<res>-<weights>/<sha256>.png   control-map cache (`generation.control_cache_dir`)
    contact_sheets/<class>.png      per source: the real image, its maps, its synthetic images with boxes
    summary.json                    counts per class, maps made / cached, images/s and s/image, models, dtype, ignored GPU options,
                                    `prompt_tokens`: CLIP token counts of the prompts and the negative prompt
                                    (real CLIP tokenizer, a Step 1 token counts as one); prompts over 77 tokens,
                                    which the text encoder cuts, are counted, the first ones named, and one
                                    console line says so
    manifest.parts/rank-<N>.jsonl   while running: each process's finished rows (what a resumed run skips)
`<name>` is `<source id>-s<index>` with `-<augmentation>` when `generation.layout_augmentations` moved the layout,
and `-g<seed>` (manifest `generation_seed`) for each entry of a `generation.seeds` list: the whole plan is made
once per generation seed, each image's seed derived from its generation seed instead of `run.seed`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.utils import gather_object
from rich.table import Table

from neu_det_pipeline.artifacts import train_rows
from neu_det_pipeline.captions.clip_tokens import check_prompt_lengths
from neu_det_pipeline.cli import step_main
from neu_det_pipeline.config import GenerationConfig, PipelineConfig
from neu_det_pipeline.generation.controls import ControlMapCache
from neu_det_pipeline.generation.maker import SyntheticImageMaker
from neu_det_pipeline.generation.outputs import (
    ManifestPart,
    finished_rows,
    merge_manifest,
    save_contact_sheets,
    sheet_source_ids,
)
from neu_det_pipeline.generation.pipeline import ControlNetGenerator, step1_tokens
from neu_det_pipeline.generation.plan import batches, build_seeded_plan, tag_generation_seeds, template_prompts
from neu_det_pipeline.generation.sd3 import SD3ControlNetGenerator
from neu_det_pipeline.models import DTYPE_NAMES, inference_dtype, resolve_device
from neu_det_pipeline.recipe import Step, StepContext, console
from neu_det_pipeline.training.lora import caption_prompts

SPEED_ONLY_KEYS = {"batch_size", "channels_last", "compile", "vae_slicing", "vae_tiling", "cpu_offload", "control_cache_dir"}
"""Generation keys that change how fast images are made, not which: changing them keeps finished images."""


def required_steps(config: PipelineConfig) -> tuple[str, ...]:
    section = config.generation
    wanted = {
        "step0_prepare": True,
        "step1_textual_inversion": section.use_textual_inversion,
        "step2_captions": section.prompt_source == "captions",
        "step3_lora": section.use_lora,
    }
    return tuple(name for name, needed in wanted.items() if needed)


def source_prompts(ctx: StepContext, rows: list[dict[str, Any]], tokens: dict[str, str] | None) -> dict[str, str]:
    """Source id -> prompt: its Step 2 caption, or the template with the class token (class name without Step 1)."""
    section = ctx.config.generation
    if section.prompt_source == "captions":
        return caption_prompts(ctx.upstream_dir("step2_captions"), rows, tokens)
    return template_prompts(section.prompt_template, rows, tokens)


def run(ctx: StepContext) -> dict[str, Any]:
    cfg, section, out_dir = ctx.config, ctx.config.generation, ctx.out_dir
    device = resolve_device(cfg.run.device)
    # cpu=True makes `accelerate launch --multi_gpu` on a machine without GPUs start gloo ranks (as Accelerator does).
    state = PartialState(cpu=device.type == "cpu")
    state.wait_for_everyone()  # rank 0 has prepared (possibly wiped) the folder before any rank reads it

    # 1. The plan: every image, fixed by the config and the upstream outputs.
    rows = train_rows(ctx.upstream_dir("step0_prepare"))
    tokens = step1_tokens(ctx.upstream_dir("step1_textual_inversion"))[0] if section.use_textual_inversion else None
    prompts = source_prompts(ctx, rows, tokens)
    plan = build_seeded_plan(section, rows, prompts, cfg.run.seed, tokens)
    done = finished_rows(out_dir)
    pending = [item for item in plan if item.name not in done]
    mine = batches(pending, section.batch_size, state.process_index, state.num_processes)

    # 2. This process's share, batch by batch; the pipeline loads only if there is work.
    device = state.device if state.num_processes > 1 else device  # one GPU per process
    dtype = inference_dtype(device, cfg.run.mixed_precision)
    cache = ControlMapCache(Path(section.control_cache_dir) if section.control_cache_dir else out_dir / "controls")
    generator_class = SD3ControlNetGenerator if cfg.models.pipeline == "sd3" else ControlNetGenerator  # sd3: experimental
    maker = SyntheticImageMaker(
        cfg, lambda: generator_class(cfg, device, dtype, ctx.upstream_dir("step1_textual_inversion"), ctx.upstream_dir("step3_lora")),
        cache, device, out_dir, step0_dir=ctx.upstream_dir("step0_prepare"),
    )
    part = ManifestPart(out_dir, state.process_index)
    started = time.perf_counter()
    for batch in ctx.track(mine, len(mine), f"generating {len(pending)} images"):
        part.append(tag_generation_seeds(maker.make(batch), batch))
    # Every process's counts, for one summary.
    stats = gather_object([{**asdict(maker.stats), "elapsed_s": time.perf_counter() - started}])
    if not state.is_main_process:
        return {}

    # 3. One manifest, the YOLO dataset file, contact sheets.
    manifest = merge_manifest(out_dir, [item.name for item in plan], cfg.data.classes)
    sources = {row["id"]: row for row in rows}
    sheet_sources = sheet_source_ids(manifest)
    maps = {sid: {c: maker.control_map(sources[sid], c)[1] for c in section.controls} for sid in sheet_sources}
    made = sum(rank["images"] for rank in stats)
    sheets = save_contact_sheets(out_dir, manifest, {sid: maker.source_path(sources[sid]) for sid in sheet_sources}, maps)

    per_class = Counter(row["class"] for row in manifest)
    console.print(_class_table(per_class, Counter(item.image_class for item in pending)))
    # The text encoder reads 77 tokens and drops the rest silently: say which prompts lose words.
    prompt_lengths = check_prompt_lengths([*prompts.values(), section.negative_prompt], (tokens or {}).values())
    if warning := prompt_lengths.warning("prompts (with the negative prompt)"):
        console.print(f"[yellow]step4_generate: {warning}[/yellow]")
    generator = maker.loaded_generator
    return {
        "pipeline": cfg.models.pipeline,
        "processes": state.num_processes,
        "dtype": DTYPE_NAMES[generator.dtype if generator else dtype],
        "images": len(manifest),
        "images_generated": len(pending),
        "images_from_earlier_run": len(plan) - len(pending),
        "images_per_class": dict(per_class),
        # All processes together: images made / the slowest process's time.
        "images_per_s": round(made / max(rank["elapsed_s"] for rank in stats), 3) if made else None,
        # One process's time per image (processes x the slowest process's time / images made): images_per_s x this = processes.
        "seconds_per_image": round(len(stats) * max(rank["elapsed_s"] for rank in stats) / made, 3) if made else None,
        "generation_s": round(sum(rank["generation_s"] for rank in stats), 3),
        "control_maps_made": sum(rank["maps_made"] for rank in stats),
        "control_maps_cached": sum(rank["maps_cached"] for rank in stats),
        "control_cache": str(cache.root),
        "prompt_tokens": prompt_lengths.summary(),
        "controls": list(section.controls),
        "scheduler": section.scheduler,
        "mode": section.mode,
        "models": None if generator is None else {"base": generator.models.base, "controlnets": generator.models.controlnets},
        "gpu_options_ignored_on_cpu": [] if generator is None else generator.gpu_options_ignored,
        "contact_sheets": sheets,
        "outputs": {"manifest": "manifest.jsonl", "images": "images/", "labels": "labels/", "masks": "masks/", "yolo": "yolo/data.yaml"},
    }


def _class_table(per_class: Counter, generated_now: Counter) -> Table:
    table = Table(title="step4_generate: synthetic images per class", title_justify="left")
    for column in ("class", "images", "made now"):
        table.add_column(column)
    for name, count in sorted(per_class.items()):
        table.add_row(name, str(count), str(generated_now.get(name, 0)))
    return table


STEP = Step(
    name="step4_generate",
    title="ControlNet generation of labelled synthetic defects",
    run=run,
    config_keys=(
        *(f"generation.{name}" for name in GenerationConfig.model_fields if name not in SPEED_ONLY_KEYS),
        "models.pipeline", "models.sd15", "models.sdxl", "models.controlnet_sd15", "models.controlnet_sdxl",
        "models.controlnet_union_sdxl", "models.sd3", "models.controlnet_sd3", "models.annotators", "models.depth",
        # Inpainting checkpoints and the candidate scorers (`generation.mode`, `generation.select_by`).
        "models.sd15_inpaint", "models.sdxl_inpaint", "models.clip", "evaluation.lpips_net", "evaluation.lpips_pretrained_backbone",
        "run.seed", "run.mixed_precision", "data.classes",
    ),
    requires=required_steps,
    key_figure=lambda summary: f"{summary['images']} synthetic images",
)


def main(argv: list[str] | None = None) -> None:
    step_main(STEP.name, argv)


if __name__ == "__main__":
    main()
