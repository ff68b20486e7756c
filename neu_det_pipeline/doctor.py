"""`neu-det doctor [--config FILE]`: what this machine has for the pipeline, and what a config will need.

The machine: torch and CUDA, each GPU and its memory, the bitsandbytes backend, accelerate's config file, and
whether the Hugging Face hub is used (offline mode or reachable). With a config: every model it loads, by step,
and where it comes from (a local folder, the Hugging Face cache, or a download), plus the GPU memory each step
needs (estimates, compared with the GPUs found). Every problem is one line saying what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.table import Table

from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.models import local_folder

ANNOTATOR_FILES = {
    "hed": "ControlNetHED.pth",
    "pidinet": "table5_pidinet.pth",
    "normalbae": "scannet.pt",
    "midas": "dpt_hybrid-midas-501f0c75.pt",
}
"""The file each controlnet_aux detector loads from `models.annotators` (lllyasviel/Annotators)."""

GPU_GB_ESTIMATES = {
    # Peak GPU memory (GiB) at the base config's batch sizes and resolutions (SD 1.5: 512 px, SDXL: 1024 px,
    # gradient checkpointing for the SDXL LoRA), fp16/bf16 weights; estimates from the model sizes, not measured here.
    "sd15": {"step1_textual_inversion": 8, "step2_captions": 3, "step3_lora": 10, "step4_generate": 6, "step5_evaluate": 4, "step6_classifier": 4},
    "sdxl": {"step1_textual_inversion": 18, "step2_captions": 3, "step3_lora": 22, "step4_generate": 14, "step5_evaluate": 4, "step6_classifier": 4},
}
BLIP2_EXTRA_GB = 8  # BLIP-2 OPT-2.7B in half precision, loaded by Step 2 with `prompt_style: blip2`
GPU_MEMORY_FIXES = {
    "step1_textual_inversion": "textual_inversion.train_batch_size=1 textual_inversion.gradient_accumulation_steps=4",
    "step2_captions": "captions.batch_size=4",
    "step3_lora": "lora.train_batch_size=1 lora.gradient_accumulation_steps=4 lora.gradient_checkpointing=true lora.optimizer=adamw8bit",
    "step4_generate": "generation.batch_size=1 generation.vae_slicing=true generation.cpu_offload=true",
    "step5_evaluate": "evaluation.batch_size=8",
    "step6_classifier": "classifier.batch_size=8 classifier.gradient_accumulation_steps=4",
}


@dataclass
class ModelNeed:
    key: str
    """Config key, e.g. `models.sd15`."""
    model_id: str
    steps: list[str]
    probe: str | None
    """A file the model's hub repo holds, to look up in the cache (None: not a hub model)."""
    fetched_by: str | None = None
    """For models that are not on the hub: what downloads them on first use."""
    where: str = ""
    problem: str | None = None


@dataclass
class Report:
    machine: list[tuple[str, str]] = field(default_factory=list)
    models: list[ModelNeed] = field(default_factory=list)
    memory: list[tuple[str, str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- machine


def machine_facts(report: Report) -> list[float]:
    """Fill the machine rows; returns each GPU's memory in GiB."""
    from neu_det_pipeline import compat

    report.problems.extend(compat.matching(compat.BREAKS))
    for limit in compat.matching(compat.LIMITS):
        report.machine.append(("known library limit", limit))
    import torch

    report.machine.append(("torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})"))
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            gpus.append(properties.total_memory / 2**30)
            report.machine.append((f"GPU {index}", f"{properties.name}, {gpus[-1]:.0f} GiB"))
    else:
        report.machine.append(("GPU", "none visible: every step runs on CPU in fp32 (tiny models only are practical)"))
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        report.machine.append(("CUDA_VISIBLE_DEVICES", os.environ["CUDA_VISIBLE_DEVICES"]))

    try:
        import bitsandbytes
        from bitsandbytes import cextension

        report.machine.append(("bitsandbytes", f"{bitsandbytes.__version__}, {cextension.BNB_BACKEND} backend"))
        if gpus and cextension.BNB_BACKEND == "CPU":
            report.problems.append(
                "bitsandbytes has no GPU backend although a GPU is visible: reinstall it for your CUDA "
                "(`pip install -U bitsandbytes`) or set lora.optimizer=adamw"
            )
    except ImportError as exc:
        report.problems.append(f"bitsandbytes does not import ({exc}): `pip install bitsandbytes` or set lora.optimizer=adamw")

    from accelerate.commands.config import default_config_file

    config_file = Path(os.environ.get("ACCELERATE_CONFIG_FILE") or default_config_file)
    if config_file.is_file():
        settings = yaml.safe_load(config_file.read_text()) or {}
        report.machine.append((
            "accelerate config", f"{config_file}: {settings.get('distributed_type', '?')}, "
            f"{settings.get('num_processes', '?')} process(es), mixed precision {settings.get('mixed_precision', '?')}",
        ))
    else:
        report.machine.append(("accelerate config", f"none ({config_file}): `accelerate launch` uses one process"))
        if len(gpus) > 1:
            report.problems.append(f"{len(gpus)} GPUs but no accelerate config: run `accelerate config` once to train on all of them")
    return gpus


def hub_facts(report: Report) -> bool:
    """Fill the hub row; True when downloads are possible."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        report.machine.append(("Hugging Face hub", "offline mode (HF_HUB_OFFLINE=1): local folders and cached models only"))
        return False
    from huggingface_hub import HfApi

    try:
        HfApi().model_info("openai/clip-vit-large-patch14", timeout=5)
    except Exception as exc:  # any failure means the same to the user: no downloads
        report.machine.append(("Hugging Face hub", f"not reachable ({type(exc).__name__})"))
        return False
    report.machine.append(("Hugging Face hub", f"reachable ({constants.ENDPOINT})"))
    return True


# ----------------------------------------------------------------------------------------- config


def model_needs(config: PipelineConfig) -> list[ModelNeed]:
    """Every model the config's steps load, with the steps that load it."""
    needs: dict[tuple[str, str], ModelNeed] = {}

    def need(key: str, model_id: str | None, step: str, probe: str | None, fetched_by: str | None = None) -> None:
        if model_id is None:
            return
        entry = needs.setdefault((key, model_id), ModelNeed(key, model_id, [], probe, fetched_by))
        if step not in entry.steps:
            entry.steps.append(step)

    models, family = config.models, config.models.pipeline
    for step in ("step1_textual_inversion", "step3_lora", "step4_generate"):
        need(f"models.{family}", getattr(models, family), step, "model_index.json")
    captions = config.captions
    if "clip" in captions.ranking_backends:
        need("models.clip", models.clip, "step2_captions", "config.json")
    if "open_clip" in captions.ranking_backends:
        need("models.open_clip", models.open_clip, "step2_captions", "open_clip_config.json")
    if captions.prompt_style == "blip2":
        need("models.blip2", models.blip2, "step2_captions", "config.json")
    for key, model_id in config.controlnet_ids().values():
        need(key, model_id, "step4_generate", "config.json")
    generation = config.generation
    for control in generation.controls:
        detector = generation.detectors[control]
        if detector == "depth_anything":
            need("models.depth", models.depth, "step4_generate", "config.json")
        elif detector in ANNOTATOR_FILES:
            need("models.annotators", models.annotators, "step4_generate", ANNOTATOR_FILES[detector])
    evaluation = config.evaluation
    if "clip" in evaluation.features or evaluation.clip_score:
        need("models.clip", models.clip, "step5_evaluate", "config.json")
    if "dinov3" in evaluation.features:
        need("models.dinov3", models.dinov3, "step5_evaluate", "config.json")
    if "inception" in evaluation.features:
        weights = str(evaluation.inception_weights) if evaluation.inception_weights else "FID Inception (pt_inception-2015-12-05)"
        need("evaluation.inception_weights", weights, "step5_evaluate", None, "torch-fidelity (from GitHub)")
    if evaluation.lpips_pretrained_backbone:
        need("evaluation.lpips_net", f"{evaluation.lpips_net} ImageNet weights", "step5_evaluate", None, "torchvision")
    if evaluation.utility.enabled:
        need("models.yolo", models.yolo, "step5_evaluate", None, "ultralytics (from its GitHub releases)")
    classifier = config.classifier
    if classifier.backbone == "dinov3" and classifier.pretrained:
        need("models.dinov3", models.dinov3, "step6_classifier", "config.json")
    return list(needs.values())


def locate(need: ModelNeed, online: bool) -> None:
    """Where the model comes from, and a problem line when it cannot be had."""
    from huggingface_hub import try_to_load_from_cache

    repo = need.model_id.removeprefix("hf-hub:")
    folder = local_folder(need.model_id)
    if folder is not None:
        need.where = f"local folder {folder}"
        if not folder.exists():
            need.problem = f"{need.key}={need.model_id!r}: {folder} does not exist; set {need.key} to a model folder or hub id"
        return
    if need.probe is None:  # not a hub model: a local file, a model YAML, or what its library downloads
        if Path(need.model_id).is_file():
            need.where = "local file"
        elif need.model_id.endswith(".yaml"):
            need.where = "built from its YAML"
        else:
            need.where = f"downloaded by {need.fetched_by} on first use"
        return
    cached = try_to_load_from_cache(repo, need.probe)
    if isinstance(cached, str):
        need.where = "Hugging Face cache"
        return
    need.where = "to download"
    if not online:
        need.problem = (
            f"{need.key}={need.model_id!r} is neither a local folder nor in the Hugging Face cache and the hub is not "
            f"usable: download it on a machine with the hub (`hf download {repo}`) or set {need.key} to a folder"
        )


def gpu_memory(config: PipelineConfig, gpus: list[float], report: Report) -> None:
    estimates = dict(GPU_GB_ESTIMATES[config.models.pipeline])
    if config.captions.prompt_style == "blip2":
        estimates["step2_captions"] += BLIP2_EXTRA_GB
    smallest = min(gpus) if gpus else None
    for step, gib in estimates.items():
        fits = "no GPU" if smallest is None else ("fits" if gib <= smallest else "too large")
        report.memory.append((step, f"~{gib} GiB", fits))
        if smallest is not None and gib > smallest:
            report.problems.append(
                f"{step} needs about {gib} GiB of GPU memory (estimate), the smallest GPU has {smallest:.0f} GiB: "
                f"try {GPU_MEMORY_FIXES[step]}"
            )


def diagnose(config: PipelineConfig | None) -> Report:
    report = Report()
    gpus = machine_facts(report)
    online = hub_facts(report)
    if config is not None:
        report.models = model_needs(config)
        for need in report.models:
            locate(need, online)
            if need.problem:
                report.problems.append(need.problem)
        if any(need.key == "models.dinov3" and need.where == "to download" for need in report.models):
            report.problems.append(
                f"models.dinov3={config.models.dinov3!r} is a gated model: accept its licence on its hub page and "
                "`hf auth login` before the first download"
            )
        gpu_memory(config, gpus, report)
    return report


def print_report(report: Report, console) -> None:
    machine = Table(title="this machine", show_header=False, title_justify="left")
    for name, value in report.machine:
        machine.add_row(name, value)
    console.print(machine)
    if report.models:
        models = Table(title="models the config loads", title_justify="left")
        for column in ("key", "model", "steps", "from"):
            models.add_column(column)
        for need in report.models:
            models.add_row(need.key, need.model_id, ", ".join(need.steps), need.where)
        console.print(models)
        memory = Table(title="GPU memory per step (estimates at the base config's sizes, not measured)", title_justify="left")
        for column in ("step", "needs", "on this machine"):
            memory.add_column(column)
        for row in report.memory:
            memory.add_row(*row)
        console.print(memory)
    if report.problems:
        for problem in report.problems:
            console.print(f"[bold red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    else:
        console.print("[green]no problem found[/]")
