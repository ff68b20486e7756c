"""`generation`: Step 4's ControlNet generation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from neu_det_pipeline.config.base import Section, check_distinct, check_template

ControlType = Literal["softedge", "depth", "normal", "canny"]
DetectorName = Literal["hed", "pidinet", "midas", "depth_anything", "normalbae", "canny"]
LayoutAugmentation = Literal["hflip", "vflip", "rot90", "rot180", "rot270"]

INPAINT_MODES = ("inpaint_defects", "inpaint_background")
"""`generation.mode` values that regenerate part of the source image and paste the rest back."""

DETECTOR_CONTROL: dict[str, str] = {
    "hed": "softedge",
    "pidinet": "softedge",
    "midas": "depth",
    "depth_anything": "depth",
    "normalbae": "normal",
    "canny": "canny",
}
"""The control map each detector makes (`depth_anything` runs `models.depth` through transformers, the others
come from controlnet_aux with the weights in `models.annotators`)."""
SCHEDULERS_WITH_KARRAS = ("unipc", "dpmsolver++")
CONTROLNETS_TRAINED_ON_OTHER_MAPS: dict[str, str] = {
    "SargeZT/controlnet-sd-xl-1.0-softedge-dexined": "DexiNed edges",
}
"""ControlNets trained on maps no `generation.detectors` option makes: fed HED or PiDiNet maps, they would be
conditioned on inputs they never saw, without an error."""


class GenerationConfig(Section):
    controls: list[ControlType] = Field(default_factory=lambda: ["softedge", "depth"])
    """Control maps extracted from each source image, one ControlNet each (several: diffusers' multi-ControlNet)."""
    detectors: dict[ControlType, DetectorName] = Field(
        default_factory=lambda: {"softedge": "hed", "depth": "depth_anything", "normal": "normalbae", "canny": "canny"}
    )
    """Detector per control: softedge `hed`/`pidinet`, depth `depth_anything` (models.depth)/`midas`, normal `normalbae`, canny `canny`."""
    conditioning_scales: dict[ControlType, float] = Field(
        default_factory=lambda: {"softedge": 1.0, "depth": 0.5, "normal": 0.5, "canny": 1.0}
    )
    """ControlNet conditioning scale per control."""
    control_guidance_start: dict[ControlType, float] = Field(
        default_factory=lambda: {"softedge": 0.0, "depth": 0.0, "normal": 0.0, "canny": 0.0}
    )
    """Fraction of the denoising steps after which each control starts acting (per ControlNet, or per mode of the union one)."""
    control_guidance_end: dict[ControlType, float] = Field(
        default_factory=lambda: {"softedge": 1.0, "depth": 1.0, "normal": 1.0, "canny": 1.0}
    )
    """Fraction of the denoising steps after which each control stops acting (per ControlNet, or per mode of the union one)."""
    union_controlnet: bool = False
    """SDXL only: one union ControlNet (`models.controlnet_union_sdxl`) for every control instead of one per control."""
    control_cache_dir: Path | None = None
    """Folder of cached control maps keyed by (image content, detector, resolution); null: `<step folder>/controls`.
    Point several experiments at one folder to share maps."""
    layout_augmentations: list[LayoutAugmentation] = Field(default_factory=list)
    """Flips / rotations applied to maps, boxes and masks in turn with the unchanged layout (`[]`: off)."""
    mode: Literal["txt2img", "img2img", "inpaint_defects", "inpaint_background"] = "txt2img"
    """`txt2img` makes the whole image from pure noise, `img2img` from the noised source image (keeps more real
    texture); `inpaint_defects` regenerates only the boxes (grown by `mask_dilation`, feathered) on the real
    background, `inpaint_background` keeps the real defects (the boxes) and regenerates the rest. Inpainting uses
    diffusers' ControlNet inpainting pipelines (the control maps still apply) with `models.sd15_inpaint` /
    `models.sdxl_inpaint` when set, else the base model; pixels outside the regenerated region are the source's."""
    strength: float = Field(0.75, gt=0.0, le=1.0)
    """img2img and inpaint modes: how much of the source is re-generated inside the regenerated region (1.0 ignores it)."""
    mask_dilation: int = Field(8, ge=0)
    """Inpaint modes: output pixels over which the regenerated region fades into the kept one, outside the boxes
    (`inpaint_defects`: the boxes grow by this much; `inpaint_background`: the kept boxes fade out over it); 0: hard box edges."""
    candidates: int = Field(1, ge=1)
    """Images generated per planned image (each with its own seed); `select_by` keeps one, the only one written."""
    select_by: Literal["none", "lpips_in_box", "clip"] = "none"
    """Candidate selection: `none` (keep the first), `clip` (highest CLIP score of the prompt, Step 1 tokens read as
    class names, `models.clip`), `lpips_in_box` (DefectFill's low-fidelity selection: among the class-consistent
    candidates, those whose CLIP score is at least the candidates' median, the one whose boxes differ most from the
    source's by LPIPS, `evaluation.lpips_net`). The manifest records every candidate's scores."""
    scheduler: Literal["dpmsolver++", "unipc", "euler_a", "ddim", "flow_match_euler"] = "dpmsolver++"
    """Sampler: DPM++ multistep, UniPC, Euler ancestral or DDIM; `flow_match_euler` (the model's own flow-matching Euler
    scheduler) for `models.pipeline: sd3` only."""
    use_karras_sigmas: bool = False
    """Karras noise levels (`dpmsolver++` and `unipc` only)."""
    num_inference_steps: int = Field(40, ge=1)
    """Denoising steps per image."""
    guidance_scale: float = Field(7.0, ge=1.0)
    """Classifier-free guidance scale."""
    per_class_guidance: dict[str, float] = Field(default_factory=dict)
    """Class-specific guidance scales that override `guidance_scale`."""
    guidance_rescale: float = Field(0.0, ge=0.0, le=1.0)
    """CFG rescale factor phi (Lin et al. 2023; 0 disables it), applied by the step: the ControlNet pipelines ignore it."""
    prompt_source: Literal["captions", "template"] = "captions"
    """`captions`: each source image's Step 2 prompt; `template`: `prompt_template` with the class token."""
    prompt_template: str = "a grayscale photo of {token} on a steel strip"
    """Prompt when `prompt_source: template`; `{token}` is the Step 1 token (the class name without Step 1)."""
    negative_prompt: str = "color, blurry, low quality, text, watermark, jpeg artifacts"
    """Negative prompt of every image."""
    use_textual_inversion: bool = True
    """Load the Step 1 class tokens (required by `prompt_source: captions`)."""
    use_lora: bool = True
    """Load the Step 3 LoRA / DoRA adapters."""
    lora_scale: float = Field(1.0, ge=0.0)
    """Weight of the Step 3 adapters."""
    images_per_source: int = Field(2, ge=1)
    """Synthetic images made from each real training image (when `images_per_class` is null)."""
    images_per_class: int | None = Field(None, ge=1)
    """Balanced output: this many images per class, cycling through the class's sources; overrides `images_per_source`."""
    seeds: list[int] | None = None
    """Generation seeds: with a list, every planned image is made once per seed (`-g<seed>` name suffix,
    `generation_seed` in the manifest) and Step 5 trains its synthetic and control arms per seed; null: `run.seed`."""
    batch_size: int = Field(4, ge=1)
    """Images per pipeline call (per process); an image's pixels depend on its own seed only."""
    resolution: int = Field(512, ge=32)
    """Generation resolution (a multiple of 8: the VAE downsamples by 8 on real models)."""
    output_size: int | None = Field(None, ge=8)
    """Side of the saved images (boxes scaled to it); null: the source image's size (200 for NEU-DET)."""
    output_mode: Literal["L", "RGB"] = "L"
    """Saved colour mode: `L` grayscale like the real data, or `RGB`."""
    channels_last: bool = False
    """GPU option: channels-last memory format for the UNet and ControlNets."""
    compile: bool = False
    """GPU option: `torch.compile` the UNet and ControlNets (CUDA only; ignored on CPU)."""
    vae_slicing: bool = False
    """Decode a batch one image at a time (less memory)."""
    vae_tiling: bool = False
    """Decode in tiles (less memory at high resolution)."""
    cpu_offload: bool = False
    """GPU option: model CPU offload (accelerate) for small GPUs; single process only; ignored on CPU."""
    # Defect transplant (generation/transplant.py).
    layout: Literal["source", "transplant"] = "source"
    """`source`: each image keeps its source's boxes; `transplant`: `transplant_count` defects of other training
    images of the same class are pasted at free positions (not overlapping any box) and the seams inpainted."""
    transplant_count: int = Field(1, ge=1)
    """`layout: transplant`: defects pasted per image (fewer when the image has no free room left)."""
    transplant_seam_width: int = Field(4, ge=0)
    """`layout: transplant`: width in source pixels of the band inpainted on each side of a pasted box's edge;
    pasted boxes also keep this clearance from every other box."""

    @field_validator("prompt_template")
    @classmethod
    def _template_has_token_slot(cls, template: str) -> str:
        return check_template("generation.prompt_template", template, "token")

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        return seeds if seeds is None else check_distinct("generation.seeds", seeds, "seeds")

    @model_validator(mode="after")
    def _consistent(self) -> GenerationConfig:
        check_distinct("generation.controls", self.controls, "controls")
        for control in self.controls:
            detector = self.detectors.get(control)
            if detector is None:
                raise ValueError(f"generation.detectors has no detector for control {control!r}; set generation.detectors.{control}=...")
            if DETECTOR_CONTROL[detector] != control:
                allowed = [name for name, made in DETECTOR_CONTROL.items() if made == control]
                raise ValueError(f"generation.detectors.{control}={detector!r} makes {DETECTOR_CONTROL[detector]} maps; use one of {allowed}")
            for key in ("conditioning_scales", "control_guidance_start", "control_guidance_end"):
                if control not in getattr(self, key):
                    raise ValueError(f"generation.{key} has no value for control {control!r}; set generation.{key}.{control}=...")
            if not 0 <= self.control_guidance_start[control] < self.control_guidance_end[control] <= 1:
                raise ValueError(
                    f"generation.control_guidance_start.{control} must be < control_guidance_end.{control}, both in [0, 1]"
                )
        if self.use_karras_sigmas and self.scheduler not in SCHEDULERS_WITH_KARRAS:
            raise ValueError(
                f"generation.use_karras_sigmas=true needs a scheduler that has them ({', '.join(SCHEDULERS_WITH_KARRAS)}), "
                f"not {self.scheduler!r}"
            )
        if self.candidates > 1 and self.select_by == "none":
            raise ValueError(
                f"generation.candidates={self.candidates} needs a selection: set generation.select_by=clip or lpips_in_box "
                "(or generation.candidates=1)"
            )
        if self.select_by == "lpips_in_box" and self.mode == "inpaint_background":
            raise ValueError(
                "generation.select_by=lpips_in_box compares the boxes, which generation.mode=inpaint_background keeps "
                "exactly: use generation.select_by=clip"
            )
        if self.prompt_source == "captions" and not self.use_textual_inversion:
            raise ValueError(
                "generation.prompt_source=captions uses the Step 2 prompts, which hold the Step 1 tokens: set "
                "generation.use_textual_inversion=true or generation.prompt_source=template"
            )
        return self
