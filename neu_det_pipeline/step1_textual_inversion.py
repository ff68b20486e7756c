"""Step 1: textual inversion, one learned token per defect class (SD 1.5, or SDXL with both text encoders).

    python -m neu_det_pipeline.step1_textual_inversion --config configs/smoke.yaml
    accelerate launch -m neu_det_pipeline.step1_textual_inversion --config configs/base.yaml data.root=/data/NEU-DET

An interrupted run continues from its newest checkpoint with the same command plus
`textual_inversion.resume=latest` (the loss history is the one an uninterrupted run gives).

Memory, speed and precision (as in Step 3): `textual_inversion.gradient_checkpointing=true` recomputes
activations in the backward pass (the UNet, and each text encoder that gradients pass through), which SDXL at
1024 px needs; `textual_inversion.num_workers` loads images in worker processes. Neither changes the result, so both
may change on resume. Under mixed precision the VAE encodes and decodes outside autocast in its own dtype (fp32
for SDXL), and the LR schedule does not advance on a step the fp16 grad scaler skipped. A checkpoint written on
one device resumes on another.

Box-focused loss: `textual_inversion.loss_weighting` `box` averages the denoising loss over the Step 0 boxes only (latent
pixels outside every box get no gradient); `box_weighted` weighs box pixels `textual_inversion.foreground_weight` times the
background (GeoDiffusion's foreground re-weighting; `textual_inversion.foreground_area_exponent` p > 0 adds its area
re-weighting, `weight / area^p`, so small defects count more). The box mask moves with every flip and rotation of
the image, is averaged down to the latent grid and normalised to mean 1 per image, and works with
epsilon and v-prediction, SD 1.5 and SDXL. `uniform` (default) is the plain mean. summary.json records it.

The text encoders pool at their tokenizer's EOS token (SDXL's pooled prompt embedding): the hub's configs say
`eos_token_id: 2`, which transformers reads as "the highest token id", the new class token. Load the tokens with
`training.textual_inversion.load_learned_embeddings(pipe, folder)`, which also fixes the pooling of `pipe`; after
plain `pipe.load_textual_inversion` an SDXL pipeline's pooled embedding stops at the class token.

Outputs in `<run.output_dir>/step1_textual_inversion/`:
    learned_embeds-<class>.safetensors    the class token's embedding for `text_encoder` (diffusers format)
    learned_embeds_2-<class>.safetensors  the same for `text_encoder_2` (SDXL only)
    token_map.json                        class -> {token, files: {text encoder name: file}}
    losses.json, loss.png                 loss per optimizer step
    validation/step-<N>.png               one row of seeded images per class token
    checkpoints/checkpoint-<N>/           resumable state (newest `checkpoints_total_limit` kept)
    summary.json                          steps, final loss, tokens, files, the checkpoint resumed from, dtype
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neu_det_pipeline.cli import step_main
from neu_det_pipeline.models import DTYPE_NAMES
from neu_det_pipeline.recipe import Step, StepContext
from neu_det_pipeline.training.loop import training_config_keys
from neu_det_pipeline.training.textual_inversion import TextualInversion


def run(ctx: StepContext) -> dict[str, Any]:
    section = ctx.config.textual_inversion
    training = TextualInversion(ctx.config, ctx.upstream_dir("step0_prepare"), ctx.out_dir)
    with ctx.loss_progress("textual inversion", section.max_train_steps) as on_step:
        result = training.run(on_step)
    return {
        "pipeline": ctx.config.models.pipeline,
        "processes": result.processes,
        "dtype": DTYPE_NAMES[training.components.unet.dtype],  # frozen weights; the trained rows stay fp32
        "steps": len(result.losses),
        "loss_weighting": section.loss_weighting,
        "final_loss": result.losses[-1],
        "tokens": result.tokens,
        "files": result.files,
        "resumed_from": result.resumed_from,
        "validation_images": [Path(path).relative_to(ctx.out_dir).as_posix() for path in result.validation_images],
    }


STEP = Step(
    name="step1_textual_inversion",
    title="textual inversion: one learned token per defect class",
    run=run,
    config_keys=training_config_keys("textual_inversion"),
    requires=("step0_prepare",),
    key_figure=lambda summary: f"{len(summary['tokens'])} tokens, final loss {summary['final_loss']:.4f}",
)


def main(argv: list[str] | None = None) -> None:
    step_main(STEP.name, argv)


if __name__ == "__main__":
    main()
