"""Typed, layered pipeline configuration, one module per section.

A config is a YAML file validated against :class:`PipelineConfig`. A file may start with
``extends: other.yaml`` (a path relative to itself, or a list of them) and then holds only
its differences; command-line overrides ``key.sub=value`` are applied last. Unknown keys and
wrong types fail with one line naming the key, the file it came from and the allowed values.
"""

from neu_det_pipeline.config.base import COMMAND_LINE, NEU_DET_CLASSES, Section, check_template
from neu_det_pipeline.config.captions import CaptionsConfig
from neu_det_pipeline.config.classifier import ClassifierAugmentationConfig, ClassifierConfig
from neu_det_pipeline.config.data import DataConfig, PrepareConfig, SplitConfig
from neu_det_pipeline.config.evaluation import CurationConfig, EvaluationConfig, UtilityConfig
from neu_det_pipeline.config.generation import (
    CONTROLNETS_TRAINED_ON_OTHER_MAPS,
    DETECTOR_CONTROL,
    SCHEDULERS_WITH_KARRAS,
    ControlType,
    DetectorName,
    GenerationConfig,
    LayoutAugmentation,
)
from neu_det_pipeline.config.loading import config_hash, dump_config, load_config, parse_override
from neu_det_pipeline.config.models import ControlNetIds, ModelsConfig
from neu_det_pipeline.config.pipeline import PipelineConfig
from neu_det_pipeline.config.run import RunConfig
from neu_det_pipeline.config.training import LoraConfigSection, TextualInversionConfig, TrainingSection

__all__ = [
    "COMMAND_LINE",
    "CONTROLNETS_TRAINED_ON_OTHER_MAPS",
    "DETECTOR_CONTROL",
    "NEU_DET_CLASSES",
    "SCHEDULERS_WITH_KARRAS",
    "CaptionsConfig",
    "ClassifierAugmentationConfig",
    "ClassifierConfig",
    "ControlNetIds",
    "ControlType",
    "CurationConfig",
    "DataConfig",
    "DetectorName",
    "EvaluationConfig",
    "GenerationConfig",
    "LayoutAugmentation",
    "LoraConfigSection",
    "ModelsConfig",
    "PipelineConfig",
    "PrepareConfig",
    "RunConfig",
    "Section",
    "SplitConfig",
    "TextualInversionConfig",
    "TrainingSection",
    "UtilityConfig",
    "check_template",
    "config_hash",
    "dump_config",
    "load_config",
    "parse_override",
]
