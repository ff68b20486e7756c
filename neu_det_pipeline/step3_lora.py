"""Step 3: LoRA or DoRA adapters on the UNet (optionally the text encoders) from the Step 2 prompts.

    python -m neu_det_pipeline.step3_lora --config configs/smoke.yaml
    accelerate launch -m neu_det_pipeline.step3_lora --config configs/base.yaml data.root=/data/NEU-DET

Several processes train data-parallel (`accelerate launch --multi_gpu --num_processes N ...`; on CPU add
`ACCELERATE_USE_CPU=true` for gloo ranks). An interrupted run continues from its newest checkpoint with
the same command plus `lora.resume=latest` (the losses are the ones an uninterrupted run gives).

Memory, speed and precision work as in Step 1 (see its docstring): `lora.gradient_checkpointing=true` and
`lora.num_workers` do not change the result and may change on resume; the VAE runs outside autocast; the LR
schedule waits for steps the fp16 grad scaler skipped; a checkpoint resumes on another device.

Box-focused loss: `lora.loss_weighting` `box` averages the denoising loss over the Step 0 boxes only (latent
pixels outside every box get no gradient); `box_weighted` weighs box pixels `lora.foreground_weight` times the
background (GeoDiffusion's foreground re-weighting; `lora.foreground_area_exponent` p > 0 adds its area
re-weighting, `weight / area^p`, so small defects count more). The box mask moves with every flip and rotation of
the image, is averaged down to the latent grid and normalised to mean 1 per image, and composes with Min-SNR
(`lora.snr_gamma`), epsilon and v-prediction, SD 1.5 and SDXL. `uniform` (default) is the plain mean. summary.json records it.

Outputs in `<run.output_dir>/step3_lora/`:
    pytorch_lora_weights.safetensors   diffusers format with the adapter configs as metadata:
                                       `training.lora.load_lora(pipe, folder)` (or diffusers'
                                       `pipe.load_lora_weights(folder)`) after loading the Step 1 tokens
    losses.json                        loss per optimizer step
    validation/step-<N>.png            one row of seeded images per class
    checkpoints/checkpoint-<N>/        resumable state (newest `checkpoints_total_limit` kept)
    summary.json                       steps, final loss, trainable parameters, optimizer state bits, resumed from, dtype
"""

from __future__ import annotations

from typing import Any

from neu_det_pipeline.cli import step_main
from neu_det_pipeline.models import DTYPE_NAMES
from neu_det_pipeline.recipe import Step, StepContext
from neu_det_pipeline.training.loop import training_config_keys
from neu_det_pipeline.training.lora import LoraTraining


def run(ctx: StepContext) -> dict[str, Any]:
    section = ctx.config.lora
    training = LoraTraining(
        ctx.config, ctx.upstream_dir("step0_prepare"), ctx.upstream_dir("step1_textual_inversion"),
        ctx.upstream_dir("step2_captions"), ctx.out_dir,
    )
    adapter = "DoRA" if section.use_dora else "LoRA"
    with ctx.loss_progress(adapter, section.max_train_steps) as on_step:
        result = training.run(on_step)
    return {
        "pipeline": ctx.config.models.pipeline,
        "adapter": adapter,
        "rank": section.rank,
        "alpha": section.alpha,
        "processes": training.accelerator.num_processes,
        "dtype": DTYPE_NAMES[training.components.unet.dtype],  # frozen weights; the adapters stay fp32
        "steps": len(result.losses),
        "loss_weighting": section.loss_weighting,
        "final_loss": result.losses[-1],
        "trainable_parameters": result.trainable_parameters,
        "optimizer": section.optimizer,
        "optimizer_state_bits": result.optimizer_state_bits,
        "weights_file": result.weights_file,
        "resumed_from": result.resumed_from,
        "validation_images": result.validation_images,
    }


STEP = Step(
    name="step3_lora",
    title="LoRA / DoRA fine-tuning on the class tokens and prompts",
    run=run,
    config_keys=training_config_keys("lora"),
    requires=("step0_prepare", "step1_textual_inversion", "step2_captions"),
    key_figure=lambda summary: f"{summary['adapter']} rank {summary['rank']}, final loss {summary['final_loss']:.4f}",
)


def main(argv: list[str] | None = None) -> None:
    step_main(STEP.name, argv)


if __name__ == "__main__":
    main()
