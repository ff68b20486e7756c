"""Step 2: a prompt per training image, from CLIP-ranked keywords and optional BLIP-2 captions.

    python -m neu_det_pipeline.step2_captions --config configs/base.yaml captions.prompt_style=keywords

Every keyword (`captions.general_keywords` + the class's `captions.class_keywords`) and prompt variant
is scored against each Step 0 training image by the `captions.ranking_backends` (CLIP, OpenCLIP, or
both averaged after a per-image z-score, see `neu_det_pipeline.captions.ranking`). The prompt is
`captions.template` with the class token, plus the BLIP-2 caption (`prompt_style: blip2`) and the top
`captions.top_k` keywords (`keywords`, `blip2`), or (`prompt_style: llava`) a structured description of the
defect's texture, shape and visual characteristics, written by LLaVA-1.5 (`models.llava`) or an OpenAI-compatible
API (`captions.captioner: openai_compatible`, `captions.endpoint`), split into phrases and appended while the
prompt fits CLIP's 77 tokens. Descriptions are cached by image content in `captions.description_cache_dir`
(default `<run.output_dir>/caption_cache/`): a re-run asks nothing again. An image the endpoint gives no
description gets one console line and the template prompt; the step fails as soon as more than
`captions.endpoint.max_failure_fraction` of all images got none (a re-run then asks only for what is missing). An
interrupted run continues from its last batch.

Outputs in `<run.output_dir>/step2_captions/`:
    captions.jsonl          one row per training image: prompt, token, keyword and variant scores, models;
                            `prompt_style: llava` adds `description` (the raw answer) and `description_error`
    train/<id>.png          the Step 0 training copies (hard links; copies across file systems)
    train/metadata.jsonl    `file_name` + `text`: a Hugging Face `imagefolder` dataset for diffusers training
    summary.json            counts, models, device, dtype, timings, top keywords per class, `prompt_tokens`: CLIP token
                            counts of the prompts (real CLIP tokenizer, the class token counting as one); prompts
                            over 77 tokens, which the text encoder cuts, are counted, the first ones named, and one
                            console line says so; `descriptions` (`prompt_style: llava`): captioner, images asked
                            now (the others came from the cache), the failed ones, and the cache file
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from neu_det_pipeline.artifacts import CAPTIONS_FILE
from neu_det_pipeline.captions import (
    DATASET_DIR,
    CaptionAnnotator,
    ResultCache,
    keyword_table,
    read_train_images,
    top_keywords_by_class,
    write_imagefolder_metadata,
)
from neu_det_pipeline.captions.clip_tokens import check_prompt_lengths
from neu_det_pipeline.cli import step_main
from neu_det_pipeline.config import CaptionsConfig
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.io import link_or_copy, write_jsonl
from neu_det_pipeline.models import DTYPE_NAMES, inference_dtype, resolve_device
from neu_det_pipeline.recipe import Step, StepContext, console

PARTIAL_RESULTS_FILE = "captions.partial.jsonl"


def check_failures(failed: int, total: int, allowed: float) -> None:
    """Stop when more than `allowed` of the `total` images got no description."""
    if failed > allowed * total:
        raise PipelineError(
            f"step2_captions: {failed} of {total} images got no description (more than "
            f"captions.endpoint.max_failure_fraction={allowed}; reasons in the lines above): fix the captioner or raise "
            "the fraction, then rerun (answered images are cached and not asked again)"
        )


def run(ctx: StepContext) -> dict[str, Any]:
    cfg, out_dir = ctx.config, ctx.out_dir
    step0_dir = ctx.upstream_dir("step0_prepare")
    images = read_train_images(step0_dir)

    # 1. Models, loaded once (a bad model path fails here, with the config key to fix).
    started = time.perf_counter()
    annotator = CaptionAnnotator.from_config(cfg)
    load_s = time.perf_counter() - started

    # 2. Fixed batches in id order: a resumed run recomputes whole batches, so its files match a fresh run's.
    cache = ResultCache(out_dir / PARTIAL_RESULTS_FILE)
    rows = cache.load()
    size = cfg.captions.batch_size
    batches = [images[i : i + size] for i in range(0, len(images), size)]
    pending = [batch for batch in batches if any(image.id not in rows for image in batch)]
    from_cache = len(images) - sum(len(batch) for batch in pending)
    failed: list[str] = []  # ids without a description, in id order (the partial results hold none of them)
    for batch in ctx.track(pending, len(pending), "ranking, captioning"):
        batch_rows = annotator.annotate(batch)
        for image in batch:
            link_or_copy(image.path, out_dir / image.dataset_path)
        for row in batch_rows:
            if row.get("description_error"):
                console.print(f"[yellow]step2_captions: {row['id']}: no description: {row['description_error']}[/yellow]")
                failed.append(row["id"])
        # Rows without their description stay out of the partial results, so a resumed run asks for them again.
        cache.append(row for row in batch_rows if not row.get("description_error"))
        rows.update((row["id"], row) for row in batch_rows)
        check_failures(len(failed), len(images), cfg.captions.endpoint.max_failure_fraction)  # as soon as it is decided

    # 3. Final files, then the partial results are no longer needed.
    ordered = [rows[image.id] for image in images]
    write_jsonl(out_dir / CAPTIONS_FILE, ordered)
    write_imagefolder_metadata(out_dir / DATASET_DIR, {image.file_name: rows[image.id]["prompt"] for image in images})
    cache.remove()

    counts = Counter(image.image_class for image in images)
    top_keywords = top_keywords_by_class(ordered, cfg.captions.top_k)
    console.print(keyword_table(top_keywords, counts, cfg.data.classes))
    # Steps 3 and 4 read each prompt through CLIP's 77 tokens, which drop the rest silently: say which lose words.
    prompt_lengths = check_prompt_lengths([row["prompt"] for row in ordered], annotator.tokens.values())
    if warning := prompt_lengths.warning("prompts"):
        console.print(f"[yellow]step2_captions: {warning}[/yellow]")
    return {
        "train_images": len(images),
        "images_captioned": len(images) - from_cache,
        "images_from_cache": from_cache,
        "class_counts": dict(counts),
        "prompt_style": cfg.captions.prompt_style,
        "ranking_backends": [scorer.name for scorer in annotator.ranker.scorers],
        "dtype": DTYPE_NAMES[inference_dtype(resolve_device(cfg.run.device), cfg.run.mixed_precision)],
        "score_normalisation": "per-image z-score of cosine similarity over the candidates, averaged over backends",
        "models": annotator.models,
        "top_keywords": {name: [kw for kw, _ in pairs] for name, pairs in top_keywords.items()},
        "best_variants": dict(Counter(row["best_variant"] for row in ordered)),
        "prompt_tokens": prompt_lengths.summary(),
        **({"descriptions": annotator.description_summary(failed)} if annotator.describer is not None else {}),
        "timings_s": {"load_models": round(load_s, 3), **{k: round(v, 3) for k, v in annotator.timings.items()}},
        "outputs": {"captions": CAPTIONS_FILE, "imagefolder": f"{DATASET_DIR}/metadata.jsonl"},
    }


STEP = Step(
    name="step2_captions",
    title="CLIP keyword ranking, BLIP-2 captions, prompts",
    run=run,
    # run.seed is not a key: ranking and greedy BLIP-2 decoding involve no randomness.
    config_keys=(
        *(f"captions.{name}" for name in CaptionsConfig.outcome_keys()),
        "models.clip",
        "models.open_clip",
        "models.blip2",
        "models.llava",
        "textual_inversion.placeholder_format",
        "data.classes",
        "run.device",
        "run.mixed_precision",
    ),
    requires=("step0_prepare",),
    key_figure=lambda summary: f"{summary['train_images']} prompts ({summary['prompt_style']})",
)


def main(argv: list[str] | None = None) -> None:
    step_main(STEP.name, argv)


if __name__ == "__main__":
    main()
