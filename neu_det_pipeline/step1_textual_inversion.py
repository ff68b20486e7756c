"""Step 1: textual inversion, one learned token per defect class (SD 1.5, or SDXL with both text encoders).

    python -m neu_det_pipeline.step1_textual_inversion --config configs/smoke.yaml
    accelerate launch -m neu_det_pipeline.step1_textual_inversion --config configs/base.yaml data.root=/data/NEU-DET

An interrupted run continues from its newest checkpoint with the same command plus
`textual_inversion.resume=latest` (the loss history is the one an uninterrupted run gives).

Outputs in `<run.output_dir>/step1_textual_inversion/`:
    learned_embeds-<class>.safetensors    the class token's embedding for `text_encoder` (diffusers format:
                                          `pipe.load_textual_inversion(path, token=token)`)
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
