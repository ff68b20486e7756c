"""SD3 Medium ControlNet generation (`models.pipeline: sd3`, experimental): the SD3 counterpart of
:class:`~neu_det_pipeline.generation.pipeline.ControlNetGenerator`, with the same `generate` contract, so Step 4's
plan, maps, seeds and outputs are unchanged.

`StableDiffusion3ControlNetPipeline` with `models.sd3` and one `SD3ControlNetModel` per control from
`models.controlnet_sd3` (diffusers' `SD3MultiControlNetModel` for several). SD3 samples with the flow-matching Euler
scheduler of its repo (`generation.scheduler: flow_match_euler`, shift 3); the options SD3 cannot honour (other
samplers, CFG rescale, Step 1 tokens, Step 3 adapters, img2img, controls without an SD3 ControlNet) are refused by
the config (`neu_det_pipeline.config.sd3`). The control maps are encoded by the VAE inside the pipeline, as the
InstantX ControlNets expect; diffusers draws those latents with `latent_dist.sample()` from the global random
generator, which would make an image depend on its batch and on earlier calls, so the posterior mean is used
(the VAE's posterior is narrow: the two differ by far less than the ControlNet's response to the map).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import SD3ControlNetModel, SD3MultiControlNetModel, StableDiffusion3ControlNetPipeline
from PIL import Image

from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.generation.pipeline import GenerationModels, control_guidance_windows, per_controlnet_arguments, place_on_device
from neu_det_pipeline.models import load_model, weights_variant


@contextlib.contextmanager
def control_latents_from_the_mean(vae: torch.nn.Module) -> Iterator[None]:
    """Inside: `vae.encode(...).latent_dist.sample()` returns the posterior mean (deterministic, batch-independent)."""
    encode = vae.encode

    def encode_to_mean(*args: Any, **kwargs: Any) -> Any:
        output = encode(*args, **kwargs)
        posterior = output.latent_dist
        posterior.sample = lambda generator=None: posterior.mode()
        return output

    vae.encode = encode_to_mean
    try:
        yield
    finally:
        del vae.encode  # the class's method again


class SD3ControlNetGenerator:
    """A loaded SD3 ControlNet pipeline; `generate` makes one batch (as ControlNetGenerator does)."""

    family = "sd3"

    def __init__(self, config: PipelineConfig, device: torch.device, dtype: torch.dtype, step1_dir: Path | None = None, step3_dir: Path | None = None):
        # step1_dir / step3_dir: the config refuses Step 1 tokens and Step 3 adapters for SD3.
        self.section, self.device = config.generation, device
        self.controlnet_ids = config.controlnet_ids()
        self.controlnets = {
            control: load_model(key, model_id, lambda model_id=model_id: SD3ControlNetModel.from_pretrained(
                model_id, dtype=dtype, variant=weights_variant(model_id, dtype)))
            for control, (key, model_id) in self.controlnet_ids.items()
        }  # fmt: skip
        networks = list(self.controlnets.values())
        controlnet = networks[0] if len(networks) == 1 else SD3MultiControlNetModel(networks)
        base_id = config.models.sd3
        self.pipe = load_model(
            "models.sd3",
            base_id,
            lambda: StableDiffusion3ControlNetPipeline.from_pretrained(
                base_id, controlnet=controlnet, dtype=dtype, variant=weights_variant(base_id, dtype)
            ),
        )
        self._check_controlnets_fit_the_transformer()
        self.pipe.set_progress_bar_config(disable=True)
        self.models = GenerationModels(base=base_id, controlnets={c: model_id for c, (_, model_id) in self.controlnet_ids.items()})
        self._apply_gpu_options()

    def _check_controlnets_fit_the_transformer(self) -> None:
        """A ControlNet for another transformer width fails deep inside the first call; say which key is wrong."""
        expected = self.pipe.transformer.inner_dim
        for control, controlnet in self.controlnets.items():
            width = controlnet.config.num_attention_heads * controlnet.config.attention_head_dim
            if width != expected:
                key, model_id = self.controlnet_ids[control]
                raise PipelineError(
                    f"{key}={model_id!r} is not a ControlNet for models.sd3 (width {width}, the transformer's is {expected}); "
                    f"set {key} to an SD3 Medium ControlNet"
                )

    def _apply_gpu_options(self) -> None:
        place_on_device(self.pipe, self.section, self.device, compiled=("transformer",))

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    @property
    def gpu_options_ignored(self) -> list[str]:
        """GPU-only options that were set but do nothing here (`channels_last` has no convolution stack to reorder)."""
        ignored = ["channels_last"] if self.section.channels_last else []
        if self.device.type != "cuda":
            ignored += [name for name in ("compile", "cpu_offload") if getattr(self.section, name)]
        return ignored

    @property
    def control_guidance(self) -> dict[str, list[float]]:
        return control_guidance_windows(self.section)

    def control_arguments(self, maps: dict[str, list[Image.Image]]) -> dict[str, Any]:
        """One (batch, 3, H, W) tensor in [0, 1] per control, with its scale and window (lists for several)."""
        return per_controlnet_arguments(self.section, maps, "control_image")

    @torch.no_grad()
    def generate(
        self, prompts: list[str], seeds: list[int], guidance_scale: float, maps: dict[str, list[Image.Image]],
        init_images: list[Image.Image] | None = None, masks: list[Image.Image] | None = None,
    ) -> list[Image.Image]:
        """One pipeline call for a batch; RGB images at `generation.resolution`. txt2img only: the config refuses the
        modes that would pass `init_images` / `masks`, which `ControlNetGenerator.generate` takes."""
        section = self.section
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        with control_latents_from_the_mean(self.pipe.vae):
            return self.pipe(
                prompt=prompts, negative_prompt=[section.negative_prompt] * len(prompts),
                num_inference_steps=section.num_inference_steps, guidance_scale=guidance_scale, generator=generators,
                height=section.resolution, width=section.resolution, output_type="pil", **self.control_arguments(maps),
            ).images  # fmt: skip
