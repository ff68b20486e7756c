"""`PipelineConfig`: the whole configuration, one section per concern."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from neu_det_pipeline.config.base import Section
from neu_det_pipeline.config.captions import CaptionsConfig
from neu_det_pipeline.config.classifier import ClassifierConfig
from neu_det_pipeline.config.data import DataConfig, PrepareConfig
from neu_det_pipeline.config.evaluation import EvaluationConfig
from neu_det_pipeline.config.generation import CONTROLNETS_TRAINED_ON_OTHER_MAPS, GenerationConfig
from neu_det_pipeline.config.models import ModelsConfig
from neu_det_pipeline.config.run import RunConfig
from neu_det_pipeline.config.sd3 import check_sd3_options
from neu_det_pipeline.config.training import LoraConfigSection, TextualInversionConfig


class PipelineConfig(Section):
    """The whole pipeline's configuration: one section per concern."""

    run: RunConfig = Field(default_factory=RunConfig)
    """Output folder, seed, device, precision."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Where NEU-DET lives and how it is split."""
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    """Hub ids (or local folders) of every model."""
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    """Step 0: validation, masks, resized copies, YOLO export."""
    textual_inversion: TextualInversionConfig = Field(default_factory=TextualInversionConfig)
    """Step 1: one learned token per defect class."""
    captions: CaptionsConfig = Field(default_factory=CaptionsConfig)
    """Step 2: keyword ranking, BLIP-2 captions, prompts."""
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection)
    """Step 3: LoRA / DoRA fine-tuning."""
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    """Step 4: ControlNet generation."""
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    """Step 5: fidelity and diversity metrics, curation, YOLO utility, report."""
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    """Step 6: the DINOv3 attention-guided multitask classifier (train, evaluate, predict, export)."""

    @model_validator(mode="after")
    def _sd3_options_apply(self) -> PipelineConfig:
        check_sd3_options(self.models, self.generation)
        return self

    @model_validator(mode="after")
    def _controlnets_exist_for_the_pipeline(self) -> PipelineConfig:
        family = self.models.pipeline
        if self.generation.union_controlnet and family != "sdxl":
            raise ValueError("generation.union_controlnet=true needs models.pipeline=sdxl (the union ControlNet is an SDXL model)")
        union_hint = " or set generation.union_controlnet=true (its modes cover every control)" if family == "sdxl" else ""
        for control, (key, model_id) in self.controlnet_ids().items():
            if model_id is None:
                raise ValueError(
                    f"generation.controls has {control!r} but {key} is null: set it to a {family} ControlNet trained on "
                    f"{self.generation.detectors[control]} maps, remove {control!r} from generation.controls{union_hint}"
                )
            if model_id in CONTROLNETS_TRAINED_ON_OTHER_MAPS:
                raise ValueError(
                    f"{key}={model_id!r} was trained on {CONTROLNETS_TRAINED_ON_OTHER_MAPS[model_id]}, not the "
                    f"{self.generation.detectors[control]} maps generation.detectors.{control} makes: set {key} to a "
                    f"ControlNet trained on them{union_hint}"
                )
        return self

    def controlnet_ids(self) -> dict[str, tuple[str, str]]:
        """Control (or `union`) -> (config key, model id) of the ControlNets Step 4 loads."""
        if self.generation.union_controlnet:
            return {"union": ("models.controlnet_union_sdxl", self.models.controlnet_union_sdxl)}
        family = self.models.pipeline
        ids = getattr(self.models, f"controlnet_{family}")
        return {control: (f"models.controlnet_{family}.{control}", getattr(ids, control)) for control in self.generation.controls}

    def section(self, dotted: str) -> Any:
        """The value at a dotted key such as `data.split`."""
        value: Any = self
        for part in dotted.split("."):
            value = getattr(value, part)
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
