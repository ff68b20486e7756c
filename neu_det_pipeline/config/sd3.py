"""What `models.pipeline: sd3` (SD3 Medium, experimental) refuses, each with the reason, in one place.

SD3 is a rectified-flow model: an MMDiT transformer predicts the velocity between noise and image, sampled with
the flow-matching Euler scheduler of its repo. Options built for the SD 1.5 / SDXL UNets do not carry over.
"""

from __future__ import annotations

from neu_det_pipeline.config.generation import GenerationConfig
from neu_det_pipeline.config.models import ModelsConfig

SD3_SCHEDULER = "flow_match_euler"


def check_sd3_options(models: ModelsConfig, generation: GenerationConfig) -> None:
    """Raise ValueError (one line naming the key, the reason and the fix) for a setting SD3 cannot honour."""
    if models.pipeline != "sd3":
        if generation.scheduler == SD3_SCHEDULER:
            raise ValueError(
                f"generation.scheduler={SD3_SCHEDULER} is the flow-matching sampler of models.pipeline=sd3; SD 1.5 and SDXL "
                "predict noise: use dpmsolver++, unipc, euler_a or ddim"
            )
        return
    if generation.scheduler != SD3_SCHEDULER:
        raise ValueError(
            f"generation.scheduler={generation.scheduler!r} does not apply to models.pipeline=sd3: DPM++, UniPC, Euler "
            "ancestral and DDIM solve the noise-prediction diffusion ODE, SD3 is a flow-matching model that predicts "
            f"velocities; set generation.scheduler={SD3_SCHEDULER} (the repo's FlowMatchEulerDiscreteScheduler)"
        )
    if generation.guidance_rescale > 0:
        raise ValueError(
            f"generation.guidance_rescale={generation.guidance_rescale} does not apply to models.pipeline=sd3: CFG rescale "
            "(Lin et al. 2023) corrects the over-exposure of noise/v-prediction UNets on zero-terminal-SNR schedules, and "
            "diffusers' SD3 pipelines have no such option; set generation.guidance_rescale=0"
        )
    if generation.use_textual_inversion:
        raise ValueError(
            "generation.use_textual_inversion=true does not apply to models.pipeline=sd3: Step 1 learns one embedding per "
            "class for SD 1.5 / SDXL's CLIP encoders, SD3 reads every prompt through three text encoders (CLIP-L, "
            "CLIP-G, T5-XXL); set generation.use_textual_inversion=false and generation.prompt_source=template"
        )
    if generation.use_lora:
        raise ValueError(
            "generation.use_lora=true does not apply to models.pipeline=sd3: diffusers loads SD3 transformer LoRAs, but "
            "Step 3 trains SD 1.5 / SDXL UNet adapters only; set generation.use_lora=false"
        )
    if generation.mode != "txt2img":
        raise ValueError(
            f"generation.mode={generation.mode} does not apply to models.pipeline=sd3: the experimental SD3 path runs "
            "diffusers' SD3 ControlNet text-to-image pipeline only (no SD3 ControlNet img2img pipeline exists, and its "
            "inpainting one needs an inpainting ControlNet); set generation.mode=txt2img"
        )
    available = [control for control in ("softedge", "depth", "normal", "canny") if getattr(models.controlnet_sd3, control)]
    for control in generation.controls:
        if getattr(models.controlnet_sd3, control) is None:
            raise ValueError(
                f"generation.controls has {control!r} but no public SD3 Medium ControlNet is trained on {control} maps "
                f"(models.controlnet_sd3.{control} is null): use generation.controls from {available} "
                "(InstantX/SD3-Controlnet-Canny, -Depth), set models.controlnet_sd3."
                f"{control} to an SD3 ControlNet you trained, or models.pipeline=sd15 / sdxl for {control}"
            )
