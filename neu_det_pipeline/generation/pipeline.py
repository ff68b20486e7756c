"""The diffusers ControlNet pipeline Step 4 generates with, built from the config.

One class picks the pipeline (SD 1.5 or SDXL; txt2img, img2img or inpainting; one ControlNet per control, diffusers'
multi-ControlNet for several, or SDXL's union ControlNet), the sampler, the Step 1 tokens, the Step 3
adapters and the GPU options, then makes a batch of images with one CPU generator per image, so an image's
pixels depend on its own seed and inputs, not on its batch or process.

Each control acts on its own `control_guidance_start/end` window, also with the union ControlNet (one window per
control mode, as its diffusers pipeline supports).

CFG rescale (Lin et al. 2023, diffusers' `rescale_noise_cfg`) is applied here: the ControlNet pipelines
accept `guidance_rescale=` and ignore it. A forward hook on the UNet rewrites the conditional half of its
output so that the pipeline's own `uncond + g * (cond - uncond)` equals the rescaled guidance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    ControlNetUnionModel,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetUnionImg2ImgPipeline,
    StableDiffusionXLControlNetUnionInpaintPipeline,
    StableDiffusionXLControlNetUnionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    rescale_noise_cfg,
)
from PIL import Image

from neu_det_pipeline.artifacts import LORA_WEIGHTS_FILE, TOKEN_MAP_FILE
from neu_det_pipeline.config import GenerationConfig, PipelineConfig
from neu_det_pipeline.config.generation import INPAINT_MODES
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.io import read_json, sha256_of_files
from neu_det_pipeline.models import drop_log_messages, load_model, weights_variant
from neu_det_pipeline.training.diffusion import base_model
from neu_det_pipeline.training.lora import load_lora
from neu_det_pipeline.training.textual_inversion import load_learned_embeddings

SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
}
PIPELINES: dict[tuple[str, str, bool], type[DiffusionPipeline]] = {
    # (family, pipeline kind, union ControlNet); `pipeline_kind` maps both inpaint modes to "inpaint"
    ("sd15", "txt2img", False): StableDiffusionControlNetPipeline,
    ("sd15", "img2img", False): StableDiffusionControlNetImg2ImgPipeline,
    ("sd15", "inpaint", False): StableDiffusionControlNetInpaintPipeline,
    ("sdxl", "txt2img", False): StableDiffusionXLControlNetPipeline,
    ("sdxl", "img2img", False): StableDiffusionXLControlNetImg2ImgPipeline,
    ("sdxl", "inpaint", False): StableDiffusionXLControlNetInpaintPipeline,
    ("sdxl", "txt2img", True): StableDiffusionXLControlNetUnionPipeline,
    ("sdxl", "img2img", True): StableDiffusionXLControlNetUnionImg2ImgPipeline,
    ("sdxl", "inpaint", True): StableDiffusionXLControlNetUnionInpaintPipeline,
}
UNION_CONTROL_MODES = {"depth": 1, "softedge": 2, "canny": 3, "normal": 4}
"""Control type index of xinsir/controlnet-union-sdxl-1.0 (0 openpose, 1 depth, 2 hed/pidi/scribble, 3 canny/lineart,
4 normal, 5 segmentation)."""
LORA_ADAPTER = "step3"


# ----------------------------------------------------------------------------------- CFG rescale


def rescaled_conditional(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float, rescale: float) -> torch.Tensor:
    """The conditional prediction that makes `uncond + g * (cond' - uncond)` equal the rescaled guided prediction."""
    guided = uncond + guidance_scale * (cond - uncond)
    target = rescale_noise_cfg(guided, cond, guidance_rescale=rescale)
    return uncond + (target - uncond) / guidance_scale


@contextlib.contextmanager
def cfg_rescale(unet: torch.nn.Module, guidance_scale: float, rescale: float) -> Iterator[None]:
    """Apply CFG rescale to every UNet call inside the block (the batch is [unconditional; conditional])."""
    if rescale == 0 or guidance_scale <= 1:
        yield  # phi = 0 is plain CFG; without CFG (g <= 1) there is nothing to rescale
        return

    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        sample = output[0] if isinstance(output, tuple) else output.sample
        uncond, cond = sample.chunk(2)
        sample = torch.cat([uncond, rescaled_conditional(uncond, cond, guidance_scale, rescale)])
        return (sample, *output[1:]) if isinstance(output, tuple) else UNet2DConditionOutput(sample=sample)

    handle = unet.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# -------------------------------------------------------------------------------------- pipeline


@dataclass
class GenerationModels:
    """What a synthetic image was made with, recorded in every manifest row."""

    base: str
    controlnets: dict[str, str]
    lora_sha256: str | None = None
    token_sha256: str | None = None


def step1_tokens(step1_dir: Path) -> tuple[dict[str, str], str]:
    """Class -> token and the hash of the token files; one error line when Step 1's outputs are missing."""
    token_map_path = step1_dir / TOKEN_MAP_FILE
    if not token_map_path.is_file():
        raise PipelineError(
            f"{token_map_path} is missing: generation.use_textual_inversion=true needs Step 1; run "
            "`python -m neu_det_pipeline.step1_textual_inversion --config <same config>` or set generation.use_textual_inversion=false "
            "generation.prompt_source=template"
        )
    token_map = read_json(token_map_path)
    files = [token_map_path] + [step1_dir / name for entry in token_map.values() for name in entry["files"].values()]
    return {name: entry["token"] for name, entry in token_map.items()}, sha256_of_files(files)


def step3_lora_file(step3_dir: Path) -> Path:
    path = step3_dir / LORA_WEIGHTS_FILE
    if not path.is_file():
        raise PipelineError(
            f"{path} is missing: generation.use_lora=true needs Step 3; run `python -m neu_det_pipeline.step3_lora "
            "--config <same config>` or set generation.use_lora=false"
        )
    return path


# ------------------------------------------------------------------------------------- inpainting


def pipeline_kind(mode: str) -> str:
    """`txt2img`, `img2img` or `inpaint` (both inpaint modes load the same pipeline; only their masks differ)."""
    return "inpaint" if mode in INPAINT_MODES else mode


def generation_base_model(config: PipelineConfig) -> tuple[str, str]:
    """(config key, model id) of the base pipeline Step 4 loads: the family's dedicated inpainting checkpoint
    (`models.sd15_inpaint` / `models.sdxl_inpaint`) in an inpaint mode when one is set, else the base model."""
    family = config.models.pipeline
    inpaint_id = getattr(config.models, f"{family}_inpaint", None)
    if pipeline_kind(config.generation.mode) == "inpaint" and inpaint_id:
        return f"models.{family}_inpaint", inpaint_id
    return base_model(config)


def inpaint_arguments(init_images: list[Image.Image], masks: list[Image.Image], strength: float) -> dict[str, Any]:
    """The inpainting pipelines' source and mask arguments: white (255) mask pixels are regenerated.

    The pipelines binarise the mask at 0.5 and work on whole latent pixels; the step pastes the source back outside
    its own (feathered) region after decoding, so what the mask covers beyond that region does not reach the output.
    """
    return {"image": init_images, "mask_image": [mask.convert("L") for mask in masks], "strength": strength}


def _as_batch(images: list[Image.Image]) -> torch.Tensor:
    pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)


def place_on_device(pipe: Any, section: GenerationConfig, device: torch.device, compiled: tuple[str, ...]) -> None:
    """VAE slicing / tiling, then model CPU offload or `.to(device)`, then torch.compile of the pipeline's `compiled`
    modules (CUDA only; the CPU ignores offload and compile, and the summary says so)."""
    if section.vae_slicing:
        pipe.vae.enable_slicing()
    if section.vae_tiling:
        pipe.vae.enable_tiling()
    cuda = device.type == "cuda"
    if section.cpu_offload and cuda:
        pipe.enable_model_cpu_offload(device=device)  # moves each model to the GPU only while it runs
    else:
        pipe.to(device)
    if section.compile and cuda:
        for name in compiled:
            setattr(pipe, name, torch.compile(getattr(pipe, name), mode="max-autotune-no-cudagraphs", fullgraph=False))


def per_controlnet_arguments(section: GenerationConfig, maps: dict[str, list[Image.Image]], image_key: str) -> dict[str, Any]:
    """Pipeline keyword arguments for one ControlNet per control: each control's maps as one (batch, 3, H, W) tensor
    in [0, 1] under `image_key`, with its scale and window; plain values for one control, lists for several."""
    controls = section.controls
    values = {
        image_key: [_as_batch(maps[c]) for c in controls],
        "controlnet_conditioning_scale": [section.conditioning_scales[c] for c in controls],
        "control_guidance_start": [section.control_guidance_start[c] for c in controls],
        "control_guidance_end": [section.control_guidance_end[c] for c in controls],
    }
    return {key: value[0] for key, value in values.items()} if len(controls) == 1 else values


def control_guidance_windows(section: GenerationConfig) -> dict[str, list[float]]:
    """Control -> [start, end] fraction of the denoising steps it acts on."""
    return {c: [section.control_guidance_start[c], section.control_guidance_end[c]] for c in section.controls}


class ControlNetGenerator:
    """A loaded ControlNet pipeline; `generate` makes one batch."""

    def __init__(self, config: PipelineConfig, device: torch.device, dtype: torch.dtype, step1_dir: Path, step3_dir: Path):
        section, family = config.generation, config.models.pipeline
        self.section, self.family, self.device = section, family, device
        base_key, base_id = generation_base_model(config)
        self.controlnet_ids = config.controlnet_ids()
        self.controlnets = self._load_controlnets(config, dtype)
        pipeline_class = PIPELINES[(family, pipeline_kind(section.mode), section.union_controlnet)]
        controlnet = next(iter(self.controlnets.values())) if len(self.controlnets) == 1 else list(self.controlnets.values())
        extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd15" else {}
        self.pipe = load_model(
            base_key,
            base_id,
            lambda: pipeline_class.from_pretrained(
                base_id, controlnet=controlnet, dtype=dtype, variant=weights_variant(base_id, dtype), **extra
            ),
        )
        self._check_controlnets_fit_the_unet(config)
        scheduler_class, options = SCHEDULERS[section.scheduler]
        if section.use_karras_sigmas:
            options = {**options, "use_karras_sigmas": True}
        self.pipe.scheduler = scheduler_class.from_config(self.pipe.scheduler.config, **options)
        self.pipe.set_progress_bar_config(disable=True)

        self.models = GenerationModels(base=base_id, controlnets={c: model_id for c, (_, model_id) in self.controlnet_ids.items()})
        if section.use_textual_inversion:
            self.models.token_sha256 = step1_tokens(step1_dir)[1]
            load_learned_embeddings(self.pipe, step1_dir)
        if section.use_lora:
            lora_file = step3_lora_file(step3_dir)
            self.models.lora_sha256 = sha256_of_files([lora_file])
            load_lora(self.pipe, step3_dir, adapter_name=LORA_ADAPTER)
            self.pipe.set_adapters([LORA_ADAPTER], adapter_weights=[section.lora_scale])
        self._apply_gpu_options()

    def _load_controlnets(self, config: PipelineConfig, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
        loaded = {}
        for control, (key, model_id) in self.controlnet_ids.items():
            model_class = ControlNetUnionModel if control == "union" else ControlNetModel
            loaded[control] = load_model(
                key, model_id, lambda: model_class.from_pretrained(model_id, dtype=dtype, variant=weights_variant(model_id, dtype))
            )
        return loaded

    def _check_controlnets_fit_the_unet(self, config: PipelineConfig) -> None:
        """An SD 1.5 ControlNet on SDXL (or the reverse) fails deep inside the first call; say which key is wrong."""
        expected = self.pipe.unet.config.cross_attention_dim
        family = config.models.pipeline
        for control, controlnet in self.controlnets.items():
            if controlnet.config.cross_attention_dim != expected:
                key, model_id = self.controlnet_ids[control]
                raise PipelineError(
                    f"{key}={model_id!r} is not a ControlNet for models.{family} (cross-attention width "
                    f"{controlnet.config.cross_attention_dim}, the UNet's is {expected}); set {key} to a {family} ControlNet"
                )

    def _apply_gpu_options(self) -> None:
        section, pipe = self.section, self.pipe
        networks = [pipe.unet, *self.controlnets.values()]
        if section.channels_last:
            for network in networks:
                network.to(memory_format=torch.channels_last)
        place_on_device(pipe, section, self.device, compiled=("unet", "controlnet"))

    @property
    def gpu_options_ignored(self) -> list[str]:
        """GPU-only options that were set but do nothing on this device (reported in the summary)."""
        if self.device.type == "cuda":
            return []
        return [name for name in ("compile", "cpu_offload") if getattr(self.section, name)]

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def control_guidance(self) -> dict[str, list[float]]:
        """Control -> [start, end] fraction of the denoising steps it acts on: what the pipeline is given (per
        ControlNet, or per control mode of the union ControlNet) and what the manifest records."""
        return control_guidance_windows(self.section)

    def control_arguments(self, maps: dict[str, list[Image.Image]]) -> dict[str, Any]:
        """The pipeline's control keyword arguments for per-control lists of maps (one map per image).

        Maps go in as one (batch, 3, H, W) tensor in [0, 1] per control, the form the pipelines' own image
        processor makes of PIL images: the img2img multi-ControlNet pipelines accept no list of maps per image.
        """
        section, controls = self.section, self.section.controls
        if not section.union_controlnet:
            return per_controlnet_arguments(section, maps, "image" if pipeline_kind(section.mode) == "txt2img" else "control_image")
        # One union model sees every map; its pipeline takes one start / end per control mode and multiplies each
        # mode's conditioning scale by 0 outside that mode's window (diffusers' `controlnet_keep`).
        return {
            "control_image": [_as_batch(maps[c]) for c in controls], "control_mode": [UNION_CONTROL_MODES[c] for c in controls],
            "controlnet_conditioning_scale": [section.conditioning_scales[c] for c in controls],
            "control_guidance_start": [section.control_guidance_start[c] for c in controls],
            "control_guidance_end": [section.control_guidance_end[c] for c in controls],
        }

    @torch.no_grad()
    def generate(
        self, prompts: list[str], seeds: list[int], guidance_scale: float, maps: dict[str, list[Image.Image]],
        init_images: list[Image.Image] | None = None, masks: list[Image.Image] | None = None,
    ) -> list[Image.Image]:
        """One pipeline call for a batch (one guidance scale); returns RGB images at `generation.resolution`.

        `init_images`: the sources (img2img and inpaint modes); `masks`: what to regenerate (inpaint modes, white).
        """
        section = self.section
        # CPU generators: the starting noise of a seed is the same on every device and in every batch.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        kwargs: dict[str, Any] = dict(
            prompt=prompts, negative_prompt=[section.negative_prompt] * len(prompts),
            num_inference_steps=section.num_inference_steps, guidance_scale=guidance_scale, generator=generators,
            height=section.resolution, width=section.resolution, output_type="pil", **self.control_arguments(maps),
        )
        if section.mode == "img2img":
            kwargs.update(image=init_images, strength=section.strength)
        elif pipeline_kind(section.mode) == "inpaint":
            kwargs.update(inpaint_arguments(init_images, masks, section.strength))
        with (
            cfg_rescale(self.pipe.unet, guidance_scale, section.guidance_rescale),
            # The img2img pipelines warn that several ControlNets share one map across the prompts; the batched maps
            # above are per image (the warning only checks that there are several prompts).
            drop_log_messages(type(self.pipe).__module__, "You have"),
            # The SDXL img2img pipelines upcast the VAE themselves, and diffusers then warns about no module at all.
            drop_log_messages("diffusers.models.modeling_utils", "There are modules in AutoencoderKL that should be kept in float32: []"),
        ):
            return self.pipe(**kwargs).images
