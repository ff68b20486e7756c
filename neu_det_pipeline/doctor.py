"""`neu-det doctor [--config FILE]`: what this machine has for the pipeline, and what a config will need.

The machine: torch and CUDA, each GPU and its memory, the bitsandbytes backend, accelerate's config file, and
whether the Hugging Face hub is used (offline mode or not). With a config: every model it loads, by step, and
where it comes from (a local folder, the Hugging Face cache, or a download), plus the GPU memory each step needs
(estimates from parameter counts, the configured precision, batch sizes and resolutions, compared with the GPUs
found). Every problem is one line saying what to do; exit 1 when there is any.

Plain `doctor` uses no network. `--online` also asks the hub about every model (`neu_det_pipeline.hub_check`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.table import Table

from neu_det_pipeline.classifier.backbone_sizes import DINOV3_SIZES
from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.config.generation import INPAINT_MODES
from neu_det_pipeline.models import local_folder
from neu_det_pipeline.runner import inapplicable_steps

DIFFUSION_STEPS = ("step1_textual_inversion", "step3_lora", "step4_generate")
"""The steps that load the diffusion base model."""

ANNOTATOR_FILES = {
    "hed": "ControlNetHED.pth",
    "pidinet": "table5_pidinet.pth",
    "normalbae": "scannet.pt",
    "midas": "dpt_hybrid-midas-501f0c75.pt",
}
"""The file each controlnet_aux detector loads from `models.annotators` (lllyasviel/Annotators)."""

PARAMETERS_M = {
    # Published parameter counts, in millions: the model cards and papers named on each line.
    "sd15_unet": 860,          # SD 1.5 model card: "860M UNet"
    "sd15_text": 123,          # CLIP ViT-L/14 text encoder (SD 1.5 model card: 123M)
    "vae": 84,                 # SD / SDXL autoencoder (83.7M)
    "sdxl_unet": 2567,         # SDXL paper (Podell et al. 2023): 2.6B UNet
    "sdxl_text": 123 + 695,    # SDXL paper: CLIP ViT-L + OpenCLIP ViT-bigG text encoders (817M)
    "sd15_controlnet": 361,    # ControlNet v1.1 for SD 1.5 (1.45 GB fp32 checkpoint)
    "sdxl_controlnet": 1251,   # diffusers/controlnet-*-sdxl-1.0 and xinsir's union (2.5 GB fp16 checkpoints)
    "clip": 428,               # openai/clip-vit-large-patch14
    "open_clip": 986,          # OpenCLIP ViT-H-14 (open_clip's model table)
    "blip2": 3870,             # Salesforce/blip2-opt-2.7b model page: 3.87B (ViT-g + Q-Former + OPT-2.7B)
    "llava": 7063,             # llava-hf/llava-1.5-7b-hf: Vicuna-7B (6.74B) + CLIP ViT-L/14-336 (304M) + projector (21M)
    "dinov3": 22,              # DINOv3 ViT-S/16 (DINOv3 model card: 21.6M)
    "inception": 24,           # FID Inception v3 (pt_inception-2015-12-05)
    "depth": 25,               # Depth-Anything-V2-Small (24.8M)
}
TOKEN_EMBEDDINGS_M = {"sd15": 49408 * 768 / 1e6, "sdxl": 49408 * (768 + 1280) / 1e6}
"""Step 1 trains through whole token-embedding matrices (CLIP vocabulary x width): gradients and AdamW state on them."""
LORA_M_PER_RANK = {"sd15": 0.2, "sdxl": 1.45}
"""LoRA parameters per unit of rank on the UNet's attention projections (diffusers' rank-4 files: 3.2 MB / 23 MB fp32)."""
BASE_RESOLUTION = {"sd15": 512, "sdxl": 1024}
ACTIVATION_GIB = {
    # Rough activation memory per image at the family's base resolution in half precision with PyTorch SDPA,
    # from peaks commonly reported for diffusers' training scripts; scaled by batch x (resolution / base)^2.
    "train": {"sd15": 2.5, "sdxl": 10.0},          # backward through the UNet (Steps 1 and 3)
    "unet_inference": {"sd15": 0.15, "sdxl": 0.6},  # one UNet pass per image and CFG branch (Step 4)
    "vae_decode": {"sd15": 0.75, "sdxl": 3.0},      # the VAE decoder's full-resolution feature maps (Step 4)
}
GRADIENT_CHECKPOINTING_FACTOR = 0.3
"""Share of the training activations kept with gradient checkpointing (the rest is recomputed)."""
SMALL_MODEL_GIB_PER_IMAGE = {"vit_224": 0.08, "feature_224": 0.02, "yolo_640": 0.15}
"""ViT-S training with the decoder at 224 px (Step 6); frozen feature extractors at 224 px (Steps 2, 5);
YOLOv8n training at 640 px (ultralytics' logs: ~2.4 GB at batch 16)."""
CUDA_CONTEXT_GIB = 0.8
"""CUDA context and cuDNN/cuBLAS workspaces of one process."""
ADAMW_BYTES = {"adamw": 16, "adamw8bit": 10}
"""Per trained parameter: fp32 weight + fp32 gradient + AdamW's two moments (32-bit or 8-bit)."""
GPU_MEMORY_FIXES = {
    "step1_textual_inversion": "textual_inversion.train_batch_size=1 textual_inversion.gradient_accumulation_steps=4 textual_inversion.gradient_checkpointing=true",
    "step2_captions": "captions.batch_size=4",
    "step3_lora": "lora.train_batch_size=1 lora.gradient_accumulation_steps=4 lora.gradient_checkpointing=true lora.optimizer=adamw8bit",
    "step4_generate": "generation.batch_size=1 generation.vae_slicing=true generation.cpu_offload=true",
    "step5_evaluate": "evaluation.batch_size=8 evaluation.utility.batch=8",
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
    """For models that are not on the hub: what downloads them on first use (None with no probe: a file the config names)."""
    where: str = ""
    problem: str | None = None
    local_fix: str | None = None
    """What to do instead of downloading, where it is not `set <key> to a folder` (a key that takes no folder)."""


@dataclass
class Report:
    machine: list[tuple[str, str]] = field(default_factory=list)
    models: list[ModelNeed] = field(default_factory=list)
    memory: list[tuple[str, str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """Worth knowing, not failing: the exit code stays 0."""


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


def hub_facts(report: Report, online: bool) -> bool:
    """Fill the hub row (no network: `--online` asks the hub itself); True when downloads are allowed."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        report.machine.append(("Hugging Face hub", "offline mode (HF_HUB_OFFLINE=1): local folders and cached models only"))
        return False
    if not online:
        report.machine.append(("Hugging Face hub", "not asked: `neu-det doctor --config FILE --online` checks every model there"))
    return True


# ----------------------------------------------------------------------------------------- config


def model_needs(config: PipelineConfig) -> list[ModelNeed]:
    """Every model the config's steps load, with the steps that load it."""
    needs: dict[tuple[str, str], ModelNeed] = {}

    def need(key: str, model_id: str | None, step: str, probe: str | None, fetched_by: str | None = None,
             local_fix: str | None = None) -> None:
        if model_id is None:
            return
        entry = needs.setdefault((key, model_id), ModelNeed(key, model_id, [], probe, fetched_by, local_fix=local_fix))
        if step not in entry.steps:
            entry.steps.append(step)

    models, family = config.models, config.models.pipeline
    skipped = inapplicable_steps(config)  # SD3 (experimental) serves Step 4 only
    for step in DIFFUSION_STEPS:
        if step not in skipped:
            need(f"models.{family}", getattr(models, family), step, "model_index.json")
    captions = config.captions
    if "clip" in captions.ranking_backends:
        need("models.clip", models.clip, "step2_captions", "config.json")
    if "open_clip" in captions.ranking_backends:
        need("models.open_clip", models.open_clip, "step2_captions", "open_clip_config.json")
    if captions.prompt_style == "blip2":
        need("models.blip2", models.blip2, "step2_captions", "config.json")
    if captions.resolved_captioner() == "llava":
        need("models.llava", models.llava, "step2_captions", "config.json")
    for key, model_id in config.controlnet_ids().values():
        need(key, model_id, "step4_generate", "config.json")
    generation = config.generation
    inpaint_id = getattr(models, f"{family}_inpaint", None)
    if generation.mode in INPAINT_MODES and inpaint_id:
        need(f"models.{family}_inpaint", inpaint_id, "step4_generate", "model_index.json")
    if generation.select_by != "none":  # candidate selection scores with CLIP (and LPIPS for lpips_in_box)
        need("models.clip", models.clip, "step4_generate", "config.json")
    if generation.select_by == "lpips_in_box" and config.evaluation.lpips_pretrained_backbone:
        need("evaluation.lpips_net", f"{config.evaluation.lpips_net} ImageNet weights", "step4_generate", None, "torchvision")
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
        if evaluation.inception_weights is not None:
            need("evaluation.inception_weights", str(evaluation.inception_weights), "step5_evaluate", None)
        else:
            need("evaluation.inception_weights", "FID Inception (pt_inception-2015-12-05)", "step5_evaluate", None, "torch-fidelity (from GitHub)")
    if evaluation.lpips_pretrained_backbone:
        need("evaluation.lpips_net", f"{evaluation.lpips_net} ImageNet weights", "step5_evaluate", None, "torchvision")
    if evaluation.utility.enabled:
        need("models.yolo", models.yolo, "step5_evaluate", None, "ultralytics (from its GitHub releases)")
    classifier = config.classifier
    if classifier.backbone == "dinov3" and classifier.pretrained:
        need("models.dinov3", models.dinov3, "step6_classifier", "config.json")
    # classifier.backbone names hub repos only: a downloaded DINOv3 goes through models.dinov3.
    if classifier.backbone in DINOV3_SIZES and classifier.pretrained:  # a size name: timm's hub repo of that size
        need("classifier.backbone", f"timm/{DINOV3_SIZES[classifier.backbone].timm_name}", "step6_classifier", "config.json",
             local_fix="set classifier.backbone=dinov3 and models.dinov3 to its folder")
    if classifier.backbone.startswith("timm:") and classifier.pretrained:  # timm fetches its default tag's weights file
        need("classifier.backbone", _timm_weights_repo(classifier.backbone.removeprefix("timm:")), "step6_classifier", "model.safetensors",
             local_fix="set classifier.pretrained=false")
    return list(needs.values())


def _timm_weights_repo(name: str) -> str | None:
    """The hub repo timm downloads `name`'s pretrained weights from (None: unknown name or no hub weights)."""
    import timm

    return getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)


def locate(need: ModelNeed, downloads: bool) -> None:
    """Where the model comes from, and a problem line when it cannot be had."""
    from huggingface_hub import try_to_load_from_cache

    from neu_det_pipeline.hub_check import EXTERNAL_WEIGHTS, RETIRED_REPOS

    if need.probe is None and need.fetched_by is None:  # a file the config names
        need.where = "local file"
        if not Path(need.model_id).is_file():
            need.problem = f"{need.key}={need.model_id!r} is not a file: download {EXTERNAL_WEIGHTS['inception']} and point {need.key} at it"
        return
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
    if repo in RETIRED_REPOS:
        need.problem = f"{need.key}={need.model_id!r} was deleted from the hub: set {need.key}={RETIRED_REPOS[repo]}"
    elif not downloads:
        need.problem = (
            f"{need.key}={need.model_id!r} is neither a local folder nor in the Hugging Face cache and the hub is not "
            f"usable: download it on a machine with the hub (`hf download {repo}`) or {need.local_fix or f'set {need.key} to a folder'}"
        )


def _gib(parameters_m: float, bytes_per_parameter: float) -> float:
    return parameters_m * 1e6 * bytes_per_parameter / 2**30


def _classifier_parameters_m(config: PipelineConfig) -> float:
    """Step 6 backbone size: DINOv3 ViT-S, or a timm model counted on the meta device (no memory, no download)."""
    backbone = config.classifier.backbone
    if backbone == "dinov3":
        return PARAMETERS_M["dinov3"]
    if backbone in DINOV3_SIZES:
        return DINOV3_SIZES[backbone].parameters_millions
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(backbone.removeprefix("timm:"), pretrained=False, **config.classifier.backbone_kwargs)
    return sum(parameter.numel() for parameter in model.parameters()) / 1e6


def memory_estimates(config: PipelineConfig) -> dict[str, float]:
    """Peak GPU memory (GiB) per step: weights x bytes of the configured precision, optimizer state of what
    trains, activations scaling with batch x (resolution / base)^2. Estimates from parameter counts, not measured."""
    if config.models.pipeline not in BASE_RESOLUTION:
        # sd3 (experimental): no activation measurements to scale from; the steps that do not use it are estimated.
        sd15 = memory_estimates(config.model_copy(update={"models": config.models.model_copy(update={"pipeline": "sd15"})}))
        return {step: gib for step, gib in sd15.items() if step not in DIFFUSION_STEPS}
    family, base = config.models.pipeline, BASE_RESOLUTION[config.models.pipeline]
    half = 4 if config.run.mixed_precision == "no" else 2
    unet, text, vae = PARAMETERS_M[f"{family}_unet"], PARAMETERS_M[f"{family}_text"], PARAMETERS_M["vae"]

    def training_activations(section) -> float:
        checkpointing = GRADIENT_CHECKPOINTING_FACTOR if getattr(section, "gradient_checkpointing", False) else 1.0
        return ACTIVATION_GIB["train"][family] * section.train_batch_size * (section.resolution / base) ** 2 * checkpointing

    # Step 1 (diffusers' textual-inversion recipe): frozen UNet and VAE in half precision, the text encoders in
    # fp32 since their embeddings train; gradient + AdamW moments on the whole embedding matrices.
    step1 = _gib(unet + vae, half) + _gib(text, 4) + _gib(TOKEN_EMBEDDINGS_M[family], 12) + training_activations(config.textual_inversion)
    lora = config.lora
    step3 = _gib(unet + vae + text, half) + _gib(lora.rank * LORA_M_PER_RANK[family], ADAMW_BYTES[lora.optimizer]) + training_activations(lora)

    captions = config.captions
    ranking = [PARAMETERS_M[name] for name in captions.ranking_backends]
    if captions.prompt_style == "blip2":
        ranking.append(PARAMETERS_M["blip2"])
    if captions.resolved_captioner() == "llava":
        ranking.append(PARAMETERS_M["llava"])
    step2 = _gib(sum(ranking), half) + captions.batch_size * SMALL_MODEL_GIB_PER_IMAGE["feature_224"]

    generation = config.generation
    models = [unet, vae, text] + [PARAMETERS_M[f"{family}_controlnet"]] * len(config.controlnet_ids())
    if any(generation.detectors[control] == "depth_anything" for control in generation.controls):
        models.append(PARAMETERS_M["depth"])
    weights = _gib(max(models) if generation.cpu_offload else sum(models), half)  # offload: one model on the GPU at a time
    decoded_at_once = 1 if generation.vae_slicing else generation.batch_size
    step4 = weights + (generation.resolution / base) ** 2 * (
        2 * generation.batch_size * ACTIVATION_GIB["unet_inference"][family] + decoded_at_once * ACTIVATION_GIB["vae_decode"][family]
    )

    evaluation = config.evaluation
    extractors = [PARAMETERS_M[name] for name in ("inception", "clip", "dinov3") if name in evaluation.features]
    if evaluation.clip_score and "clip" not in evaluation.features:
        extractors.append(PARAMETERS_M["clip"])
    features = _gib(sum(extractors), half) + evaluation.batch_size * SMALL_MODEL_GIB_PER_IMAGE["feature_224"]
    utility = evaluation.utility
    yolo = utility.batch * (utility.imgsz / 640) ** 2 * SMALL_MODEL_GIB_PER_IMAGE["yolo_640"] if utility.enabled else 0.0
    step5 = max(features, yolo)  # the detector trains after the feature extractors are gone

    classifier = config.classifier
    step6 = _gib(_classifier_parameters_m(config), ADAMW_BYTES["adamw"]) + (
        classifier.batch_size * (classifier.image_size / 224) ** 2 * SMALL_MODEL_GIB_PER_IMAGE["vit_224"]
    )
    steps = {"step1_textual_inversion": step1, "step2_captions": step2, "step3_lora": step3, "step4_generate": step4,
             "step5_evaluate": step5, "step6_classifier": step6}
    return {step: gib + CUDA_CONTEXT_GIB for step, gib in steps.items()}


def gpu_memory(config: PipelineConfig, gpus: list[float], report: Report) -> None:
    smallest = min(gpus) if gpus else None
    for step, gib in memory_estimates(config).items():
        fits = "no GPU" if smallest is None else ("fits" if gib <= smallest else "too large")
        report.memory.append((step, f"~{gib:.1f} GiB (estimate)", fits))
        if smallest is not None and gib > smallest:
            report.problems.append(
                f"{step} needs about {gib:.1f} GiB of GPU memory (estimate), the smallest GPU has {smallest:.0f} GiB: "
                f"try {GPU_MEMORY_FIXES[step]}"
            )


GATED_REPO_PREFIXES = ("facebook/dinov3-", "stabilityai/stable-diffusion-3")
"""Hub ids gated behind a licence to accept (DINOv3: approval by hand; timm's DINOv3 weights are not gated)."""


def caption_endpoint(config: PipelineConfig, report: Report) -> None:
    """`captions.captioner: openai_compatible`: where Step 2 sends its images, and whether the key variable is set
    (doctor sends nothing to the endpoint)."""
    captions = config.captions
    if captions.resolved_captioner() != "openai_compatible":
        return
    endpoint = captions.endpoint
    key = f"API key from ${endpoint.api_key_env}" if endpoint.api_key_env else "no API key"
    report.machine.append(("caption endpoint", f"step2_captions sends each training image to {endpoint.base_url} ({endpoint.model}), {key}"))
    if endpoint.api_key_env and not os.environ.get(endpoint.api_key_env):
        report.problems.append(
            f"captions.endpoint.api_key_env={endpoint.api_key_env!r}: the variable is not set; export {endpoint.api_key_env}=<your key> "
            "before Step 2"
        )


def diagnose(config: PipelineConfig | None, online: bool = False) -> Report:
    """The machine, and with a config what it needs; `online` also asks the hub (`hub_check`)."""
    report = Report()
    gpus = machine_facts(report)
    downloads = hub_facts(report, online)
    if config is not None:
        report.models = model_needs(config)
        for need in report.models:
            locate(need, downloads)
            if need.problem:
                report.problems.append(need.problem)
        gated = [need for need in report.models if need.where == "to download" and need.model_id.startswith(GATED_REPO_PREFIXES)]
        if gated and not online:  # --online asks whether access is granted
            report.problems.extend(
                f"{need.key}={need.model_id!r} is a gated model: accept its licence on its hub page and "
                "`hf auth login` before the first download (`--online` checks whether access is granted)"
                for need in gated
            )
        caption_endpoint(config, report)
        if online:
            from neu_det_pipeline.hub_check import check_online

            findings = check_online(config, report.models)
            report.machine.extend(findings.facts)
            report.problems.extend(findings.problems)
            report.warnings.extend(findings.warnings)
        try:
            gpu_memory(config, gpus, report)
        except RuntimeError as exc:  # timm: unknown model name
            report.problems.append(f"classifier.backbone={config.classifier.backbone!r}: {exc}; pick a name from `timm.list_models()`")
        report.problems = list(dict.fromkeys(report.problems))  # a retired id is named offline and online alike
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
        memory = Table(
            title="GPU memory per step (estimates from parameter counts, precision, batch and resolution; not measured)",
            title_justify="left",
        )
        for column in ("step", "needs (estimate)", "on this machine"):
            memory.add_column(column)
        for row in report.memory:
            memory.add_row(*row)
        console.print(memory)
    for warning in report.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if report.problems:
        for problem in report.problems:
            console.print(f"[bold red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    else:
        console.print("[green]no problem found[/]")
