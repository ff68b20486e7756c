"""Every step's own code on random-weight models built from the real configs: time, memory, parameters, finiteness.

    python benchmarks/realsize_check.py                          # CPU, real size (about 30 min on 2 cores, < 14 GiB)
    python benchmarks/realsize_check.py --size tiny              # the same code on the tiny derived models (seconds)
    python benchmarks/realsize_check.py --device cuda --dtype bf16 --json realsize-gpu.json   # GPU node

Models are built with random weights from ``neu_det_pipeline/testing/real_configs`` (nothing is downloaded) and
saved in hub layout, so every step loads them through its real `from_pretrained` code. Real size: the configs as
they are; ``--size tiny``: the tiny models of ``testing/tiny_models.py`` (the same configs, size fields shrunk).
Weights use the libraries' normal initialisation (finite by construction, checked per model); SDXL and the union
ControlNet are built and saved in bf16 so that they fit in memory on a 24 GiB machine.

Each model build and each part runs in its own child process (this script with ``--part NAME``), so the peak
resident memory (`ru_maxrss`) and, on CUDA, the peak GPU memory (`torch.cuda.max_memory_allocated`) are per part.
Parts, on Step 0's copies of a few real images (data/neu-det-sample, Step 0 run first into a temporary folder):

    step1          Step 1's TextualInversion: `--train-steps` optimizer steps at textual_inversion.resolution,
                   batch 1 (CUDA: the config's batch), and its final validation cut to 1 image with 2 inference steps
    step3-lora     Step 3's LoraTraining (LoRA, AdamW), the same settings (Step 1 tokens from `step1`,
                   Step 2 plain prompts)
    step3-dora     the same with DoRA and bitsandbytes AdamW8bit
    step4-sd15     Step 4's SyntheticImageMaker + ControlNetGenerator: SD 1.5 with two ControlNets (soft edge
                   from PiDiNet, depth from Depth Anything V2 Small), 2 sampler steps, CFG rescale 0.7;
                   NaN/Inf checks on the latents the VAE decodes and on the decoded images
    step4-sdxl     the same with SDXL and the union ControlNet, in bf16 on CPU (`--sdxl-resolution`)
    step5          Step 5's feature extractors on `--feature-images` images: Inception-v3 (torch-fidelity's
                   architecture, random weights) and DINOv3 ViT-S/16 (timm form, the default `models.dinov3`)
    step6          Step 6's ClassifierTraining with the DINOv3 ViT-S/16 backbone (pretrained=true: the random
                   "pretrained" weights are loaded), one epoch cut to `--train-steps` optimizer steps

With ``--device cuda --dtype fp16|bf16`` (GPU): the config's own resolutions and batch sizes (base.yaml: 512 px;
SDXL at its native 1024 px, as configs/experiments/exp_c_sdxl_all.yaml) and precision; Step 4 images/s at `--batch-sizes` (1, 4, 8), with and without `generation.compile`;
training steps/s after one warm-up step; peak GPU memory per part.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE_ROOT = REPO / "data" / "neu-det-sample"
RESULT_PREFIX = "REALSIZE-RESULT "

# Published parameter counts (random weights have the same count). Sources, checked with the project's search tool:
# [sdxl-blog] sdxlturbo.ai "SDXL 1.0 vs Stable Diffusion 1.5": SD 1.5 860 M, its CLIP ViT-L/14 text encoder 123 M,
#   SDXL 2.6 B, OpenCLIP ViT-G 695 M (the numbers of the SDXL report, Podell et al. 2023);
# [sdxl-csdn] blog.csdn.net/Silver_ljh/article/details/140830691: SDXL base in fp16: U-Net 5.14 GB (2.57 B), VAE
#   167 MB (83.5 M), text encoders 1.39 GB (695 M) + 246 MB (123 M);
# [cn-hub] huggingface.co/lllyasviel/control_v11p_sd15_softedge: diffusion_pytorch_model.safetensors 1.45 GB fp32,
#   .fp16.bin 723 MB (the fp16 copy is 722,601,100 bytes: 361.3 M);
# [union-hub] huggingface.co/xinsir/controlnet-union-sdxl-1.0: diffusion_pytorch_model.safetensors 2.51 GB, fp16;
# [dav2] github.com/DepthAnything/Depth-Anything-V2 README: Depth-Anything-V2-Small 24.8 M;
# [dinov3] DINOv3 ViT-S/16 model card (MLX port, mlx-vision/vit_small_patch16_224.dinov3): "ViT-S/16 (21M parameters)";
# [inception] pytorch.org torchvision inception_v3: num_params 27,161,264 with the auxiliary classifier, which the FID
#   network has not; without it 23.8 M (lucid-dl/inception-v3 model card).
PUBLISHED: dict[str, float] = {
    "sd15/unet": 860e6,  # [sdxl-blog]
    "sd15/vae": 83.5e6,  # [sdxl-csdn]: the SDXL VAE has SD's architecture
    "sd15/text_encoder": 123e6,  # [sdxl-blog]
    "sdxl/unet": 2.57e9,  # [sdxl-csdn], "2.6 B" in [sdxl-blog]
    "sdxl/vae": 83.5e6,  # [sdxl-csdn]
    "sdxl/text_encoder": 123e6,  # [sdxl-blog], [sdxl-csdn]
    "sdxl/text_encoder_2": 695e6,  # [sdxl-blog], [sdxl-csdn]
    "controlnet-sd15-softedge": 361.3e6,  # [cn-hub]
    "controlnet-sd15-depth": 361.3e6,  # [cn-hub]: the same architecture
    "controlnet-sdxl-union": 1.255e9,  # [union-hub]: 2.51 GB / 2 bytes
    "depth": 24.8e6,  # [dav2]
    "dinov3-timm": 21e6,  # [dinov3]
    "inception": 23.8e6,  # [inception]
}
"""Model -> published parameter count, compared with the count of each built network."""

MODELS: dict[str, tuple[str, ...]] = {
    "step1": ("sd15",),
    "step3-lora": ("sd15", "clip"),
    "step3-dora": ("sd15", "clip"),
    "step4-sd15": ("sd15", "controlnet-sd15-softedge", "controlnet-sd15-depth", "annotators", "depth"),
    "step4-sdxl": ("sdxl", "controlnet-sdxl-union", "annotators", "depth"),
    "step5": ("dinov3-timm",),
    "step6": ("dinov3-timm",),
}
PARTS = tuple(MODELS)


# --------------------------------------------------------------------------------------------- checks


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many entries of `tensor` are NaN or +-Inf."""
    return int((~torch.isfinite(tensor.detach())).sum())


@dataclass
class FiniteWatch:
    """Counts NaN/Inf in the input and the output of a module (the VAE decoder: latents in, images out)."""

    checked: dict[str, int] = field(default_factory=lambda: {"inputs": 0, "outputs": 0})
    nonfinite: dict[str, int] = field(default_factory=lambda: {"inputs": 0, "outputs": 0})

    def hook(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        for key, tensor in (("inputs", args[0]), ("outputs", output if torch.is_tensor(output) else output[0])):
            self.checked[key] += tensor.numel()
            self.nonfinite[key] += nonfinite_count(tensor)

    @contextmanager
    def watching(self, module: torch.nn.Module) -> Iterator[FiniteWatch]:
        handle = module.register_forward_hook(self.hook)
        try:
            yield self
        finally:
            handle.remove()

    @property
    def finite(self) -> bool:
        return all(self.checked.values()) and not any(self.nonfinite.values())


def parameter_rows(modules: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
    rows = []
    for name, module in modules.items():
        count = sum(p.numel() for p in module.parameters())
        finite = all(bool(torch.isfinite(p).all()) for p in module.parameters())
        rows.append({"model": name, "params": count, "finite": finite})
    return rows


# -------------------------------------------------------------------------------------------- builds


def build_real_model(name: str, folder: Path) -> dict[str, torch.nn.Module]:
    """Build `name` at real size with random weights in hub layout into `folder`; returns its networks by name."""
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        ControlNetUnionModel,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from neu_det_pipeline.testing import tiny_builders as tb

    def text_config(path: str) -> CLIPTextConfig:
        return CLIPTextConfig.from_dict({**tb.real_config(path), "torch_dtype": str(torch.get_default_dtype()).removeprefix("torch.")})

    folder.mkdir(parents=True, exist_ok=True)
    if name == "sd15":
        parts = {
            "unet": UNet2DConditionModel.from_config(tb.real_config("sd15/unet/config.json")),
            "vae": AutoencoderKL.from_config(tb.real_config("sd15/vae/config.json")),
            "text_encoder": CLIPTextModel(text_config("sd15/text_encoder/config.json")),
        }
        pipeline = StableDiffusionPipeline(
            **parts, tokenizer=tb.clip_tokenizer("sd15/tokenizer"), safety_checker=None, feature_extractor=None,
            scheduler=PNDMScheduler.from_config(tb.real_config("sd15/scheduler/scheduler_config.json")), requires_safety_checker=False,
        )
        tb.save_pipeline(pipeline, folder, {"tokenizer": "sd15/tokenizer"})
        return {f"sd15/{key}": module for key, module in parts.items()}
    if name == "sdxl":
        with bf16_default():  # 2.6 B + 0.8 B parameters: built and saved in bf16 (half the memory)
            parts = {
                "unet": UNet2DConditionModel.from_config(tb.real_config("sdxl/unet/config.json")),
                "vae": AutoencoderKL.from_config(tb.real_config("sdxl/vae/config.json")),
                "text_encoder": CLIPTextModel(text_config("sdxl/text_encoder/config.json")),
                "text_encoder_2": CLIPTextModelWithProjection(text_config("sdxl/text_encoder_2/config.json")),
            }
        pipeline = StableDiffusionXLPipeline(
            **parts, tokenizer=tb.clip_tokenizer("sdxl/tokenizer"), tokenizer_2=tb.clip_tokenizer("sdxl/tokenizer_2"),
            scheduler=EulerDiscreteScheduler.from_config(tb.real_config("sdxl/scheduler/scheduler_config.json")),
        )
        tb.save_pipeline(pipeline, folder, {"tokenizer": "sdxl/tokenizer", "tokenizer_2": "sdxl/tokenizer_2"})
        return {f"sdxl/{key}": module for key, module in parts.items()}
    if name.startswith("controlnet-"):
        real = tb.REAL_CONFIG_FILE[name]
        if name == "controlnet-sdxl-union":
            with bf16_default():
                model = ControlNetUnionModel.from_config(tb.real_config(real))
        else:
            model = ControlNetModel.from_config(tb.real_config(real))
        model.save_pretrained(folder)
        return {name: model}
    if name == "annotators":  # PiDiNet is small: the tiny-model builder already builds the real network
        tb.BUILDERS["annotators"](folder, 0)
        return {}
    if name == "depth":
        from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

        model = DepthAnythingForDepthEstimation(DepthAnythingConfig.from_dict(tb.real_config("depth/config.json")))
        model.save_pretrained(folder)
        (folder / "preprocessor_config.json").write_text(json.dumps(tb.real_config("depth/preprocessor_config.json")), encoding="utf-8")
        return {name: model}
    if name == "dinov3-timm":
        import timm
        from timm.models import save_for_hf

        real = tb.real_config("dinov3-timm/config.json")
        model = timm.create_model(real["architecture"], pretrained=False, num_classes=real["num_classes"])
        save_for_hf(model, folder, safe_serialization=True, data_config={"input_size": tuple(real["pretrained_cfg"]["input_size"])})
        return {name: model}
    raise ValueError(f"no real-size builder for {name}")


@contextmanager
def bf16_default() -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_part(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Child process: one model folder under `--models-dir` (skipped if there); parameter counts of its networks."""
    folder = args.models_dir / name
    if args.size == "tiny" or name == "clip":
        from neu_det_pipeline.testing.tiny_models import build_tiny_models

        build_tiny_models(args.models_dir, only=[name])
        return {"models": []}  # tiny models have no published counts
    staging = folder.with_name(f".{name}.partial")
    modules = build_real_model(name, staging)
    staging.rename(folder)
    return {"models": parameter_rows(modules)}


# --------------------------------------------------------------------------------------------- config


def config_for(args: argparse.Namespace, run_dir: Path, *extra: str):
    from neu_det_pipeline.config import load_config

    models = args.models_dir
    overrides = [
        f"run.output_dir={run_dir}", f"data.root={SAMPLE_ROOT}", f"run.device={args.device}",
        f"run.mixed_precision={'no' if args.device == 'cpu' else args.dtype}",
        f"models.sd15={models / 'sd15'}", f"models.sdxl={models / 'sdxl'}",
        f"models.controlnet_sd15.softedge={models / 'controlnet-sd15-softedge'}",
        f"models.controlnet_sd15.depth={models / 'controlnet-sd15-depth'}",
        f"models.controlnet_union_sdxl={models / 'controlnet-sdxl-union'}",
        f"models.annotators={models / 'annotators'}", f"models.depth={models / 'depth'}",
        f"models.dinov3={models / 'dinov3-timm'}",
        # Training parts: no warm-up, no checkpoints; the final validation cut to 1 image, 2 steps.
        f"textual_inversion.max_train_steps={args.train_steps}",
        "textual_inversion.lr_warmup_steps=0", "textual_inversion.checkpointing_steps=1000000",
        "textual_inversion.validation_steps=1000000", "textual_inversion.num_validation_images=1",
        "textual_inversion.validation_inference_steps=2",
        f"lora.max_train_steps={args.train_steps}", "lora.lr_warmup_steps=0",
        "lora.checkpointing_steps=1000000", "lora.validation_steps=1000000", "lora.num_validation_images=1",
        "lora.validation_inference_steps=2",
        # Step 3's upstream Step 2 writes plain prompts (template + token): its CLIP keyword ranking does not change
        # them, so it runs on the tiny CLIP at both sizes (Step 2 is not measured here).
        "captions.prompt_style=plain", f"models.clip={models / 'clip'}",
        # Step 4: one ControlNet per control, maps from PiDiNet and Depth Anything, 2 steps, CFG rescale on.
        "generation.controls=[softedge,depth]", "generation.detectors.softedge=pidinet",
        "generation.detectors.depth=depth_anything", "generation.num_inference_steps=2", "generation.guidance_rescale=0.7",
        "generation.use_textual_inversion=false", "generation.use_lora=false", "generation.prompt_source=template",
        "classifier.backbone=dinov3", "classifier.pretrained=true", "classifier.epochs=1", "classifier.freeze_epochs=0",
        "classifier.warmup_epochs=0",
    ]
    if args.device == "cpu":  # batch 1 on CPU; a GPU trains at the config's batch size
        overrides += ["textual_inversion.train_batch_size=1", "lora.train_batch_size=1"]
    return load_config(args.config, [*overrides, *extra])


# ---------------------------------------------------------------------------------------------- parts


def cuda_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def training_rates(stamps: list[float], started: float) -> dict[str, Any]:
    """Seconds of the whole part, and steps/s after the first (warm-up) step where there are enough steps."""
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    return {"optimizer_steps": len(stamps), "steps_per_s": rate, "first_step_s": stamps[0] - started if stamps else None}


def part_step1(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    from neu_det_pipeline.training.textual_inversion import TextualInversion

    config = config_for(args, run_dir)
    out = run_dir / "step1_textual_inversion"
    stamps: list[float] = []
    started = time.perf_counter()
    result = TextualInversion(config, run_dir / "step0_prepare", out).run(on_step=lambda step, loss: (cuda_sync(), stamps.append(time.perf_counter())))
    return {**training_rates(stamps, started), "finite": all(math.isfinite(loss) for loss in result.losses) and bool(result.losses),
            "detail": f"{config.textual_inversion.resolution} px, batch 1, losses {[round(x, 4) for x in result.losses]}"}


def part_step3(args: argparse.Namespace, run_dir: Path, dora: bool) -> dict[str, Any]:
    from neu_det_pipeline import step2_captions
    from neu_det_pipeline.recipe import console, new_progress, run_step
    from neu_det_pipeline.training.lora import LoraTraining
    from neu_det_pipeline.training.textual_inversion import TextualInversion

    extra = ["lora.use_dora=true", "lora.optimizer=adamw8bit"] if dora else []
    config = config_for(args, run_dir, *extra)
    if not (run_dir / "step1_textual_inversion").is_dir():  # the step1 part did not run: one step for the tokens
        TextualInversion(config_for(args, run_dir, "textual_inversion.max_train_steps=1"), run_dir / "step0_prepare",
                         run_dir / "step1_textual_inversion").run()
    if not (run_dir / "step2_captions").is_dir():
        console.quiet = True
        with new_progress(disable=True) as quiet:
            run_step(step2_captions.STEP, config, quiet)
        console.quiet = False
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        training = LoraTraining(config, run_dir / "step0_prepare", run_dir / "step1_textual_inversion", run_dir / "step2_captions", Path(out))
        result = training.run(on_step=lambda step, loss: (cuda_sync(), stamps.append(time.perf_counter())))
    section = config.lora
    return {**training_rates(stamps, started), "finite": all(math.isfinite(loss) for loss in result.losses) and bool(result.losses),
            "detail": f"{'DoRA' if dora else 'LoRA'} rank {section.rank}, {section.optimizer}, {section.resolution} px, batch 1, "
                      f"{result.trainable_parameters / 1e6:.2f} M trainable, optimizer state {result.optimizer_state_bits}"}


def part_step4(args: argparse.Namespace, run_dir: Path, family: str) -> dict[str, Any]:
    from neu_det_pipeline.artifacts import train_rows
    from neu_det_pipeline.generation.controls import ControlMapCache
    from neu_det_pipeline.generation.maker import SyntheticImageMaker
    from neu_det_pipeline.generation.pipeline import ControlNetGenerator
    from neu_det_pipeline.generation.plan import build_plan, template_prompts
    from neu_det_pipeline.models import inference_dtype, resolve_device

    extra = [f"models.pipeline={family}"]
    if family == "sdxl":
        extra.append("generation.union_controlnet=true")
        extra.append(f"generation.resolution={args.sdxl_resolution}")
    elif args.device == "cpu" and args.size == "real":
        extra.append("generation.resolution=512")
    config = config_for(args, run_dir, *extra)
    section, device = config.generation, resolve_device(config.run.device)
    # The step holds CPU inference in float32 (`inference_dtype`); SDXL + union in fp32 would not fit in
    # 14 GiB, so on CPU the SDXL part hands the same generator bf16 (its VAE still decodes in fp32: force_upcast).
    dtype = torch.bfloat16 if family == "sdxl" and device.type == "cpu" else inference_dtype(device, config.run.mixed_precision)
    rows = train_rows(run_dir / "step0_prepare")
    plan = build_plan(section, rows, template_prompts(section.prompt_template, rows, None), config.run.seed)
    cache = ControlMapCache(run_dir / "controls")
    batch_sizes = [1] if device.type == "cpu" else args.batch_sizes
    compile_options = [False] if device.type == "cpu" else [False, True]
    watch, rates = FiniteWatch(), {}
    sources = [item for item in plan if item.image_class == plan[0].image_class][: max(batch_sizes)]
    with tempfile.TemporaryDirectory() as out:
        # Control maps (PiDiNet, Depth Anything) made once, before any timing: images/s is generation alone.
        maps_started = time.perf_counter()
        for item in sources:
            for control in section.controls:
                SyntheticImageMaker(config, lambda: None, cache, device, Path(out)).control_map(item.source, control)
        maps_s = time.perf_counter() - maps_started
        for compiled in compile_options:
            run_config = config_for(args, run_dir, *extra, f"generation.compile={str(compiled).lower()}")
            load_started = time.perf_counter()
            generator = ControlNetGenerator(run_config, device, dtype, run_dir / "step1_textual_inversion", run_dir / "step3_lora")
            load_s = time.perf_counter() - load_started
            maker = SyntheticImageMaker(run_config, lambda generator=generator: generator, cache, device, Path(out))
            with watch.watching(generator.pipe.vae.decoder):
                for size in batch_sizes:
                    batch = sources[:size]
                    if device.type == "cuda":
                        maker.make(batch)  # warm-up (and compilation) outside the timing
                    cuda_sync()
                    started = time.perf_counter()
                    maker.make(batch)
                    cuda_sync()
                    rates[f"batch {len(batch)}{', compiled' if compiled else ''}"] = len(batch) / (time.perf_counter() - started)
            del generator, maker
    return {"images_per_s": rates, "load_s": load_s, "maps_s": maps_s, "finite": watch.finite, "nonfinite": watch.nonfinite,
            "detail": f"{family}, {section.resolution} px, {str(dtype).removeprefix('torch.')}, {section.num_inference_steps} steps, "
                      f"controls {'union' if section.union_controlnet else '+'.join(section.controls)}, "
                      f"CFG rescale {section.guidance_rescale}; pipeline load {load_s:.0f} s, control maps {maps_s:.0f} s; NaN/Inf in latents {watch.nonfinite['inputs']}, "
                      f"in images {watch.nonfinite['outputs']}"}


def part_step5(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    from neu_det_pipeline.artifacts import train_rows
    from neu_det_pipeline.evaluation.features import load_extractor
    from neu_det_pipeline.testing.random_inception import random_inception_weights

    rows = train_rows(run_dir / "step0_prepare")[: args.feature_images]
    pixels = np.stack([np.asarray(Image.open(SAMPLE_ROOT / row["source"]).convert("L")) for row in rows])
    weights = random_inception_weights(run_dir / "inception.pth", pixels)
    config = config_for(args, run_dir, f"evaluation.inception_weights={weights}")
    results, finite, params = {}, True, []
    for name in ("inception", "dinov3"):
        started = time.perf_counter()
        extractor = load_extractor(name, config)
        features = extractor(pixels)
        cuda_sync()
        results[name] = {"seconds": time.perf_counter() - started, "shape": list(features.shape)}
        finite = finite and nonfinite_count(features.float()) == 0
    from torchmetrics.image.fid import NoTrainInceptionV3

    inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights))
    params = parameter_rows({"inception": inception})
    return {"finite": finite, "models": params,
            "detail": "; ".join(f"{name} {r['seconds']:.1f} s -> {tuple(r['shape'])}" for name, r in results.items())}


def part_step6(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    from neu_det_pipeline.classifier.data import load_data
    from neu_det_pipeline.classifier.training import ClassifierTraining

    config = config_for(args, run_dir)
    data = load_data(config, run_dir / "step0_prepare", None)
    images = len(data.splits["train"])
    if args.device == "cpu":  # one epoch of exactly `--train-steps` steps: the batch is what the sample allows
        batch, epochs = math.ceil(images / args.train_steps), 1
    else:  # the configured batch, as many epochs of the small sample as `--train-steps` needs
        batch = config.classifier.batch_size
        epochs = math.ceil(args.train_steps / math.ceil(images / batch))
    config = config_for(args, run_dir, f"classifier.batch_size={batch}", f"classifier.epochs={epochs}")
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        training = ClassifierTraining(config, data, Path(out))
        losses: list[float] = []
        training.run(on_step=lambda step, loss: (cuda_sync(), stamps.append(time.perf_counter()), losses.append(loss)))
    return {**training_rates(stamps, started), "finite": bool(losses) and all(math.isfinite(x) for x in losses),
            "detail": f"{config.classifier.image_size} px, batch {batch}, {training.parameter_count() / 1e6:.1f} M parameters, "
                      f"losses {[round(x, 4) for x in losses]}"}


RUNNERS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "step1": part_step1,
    "step3-lora": lambda args, run_dir: part_step3(args, run_dir, dora=False),
    "step3-dora": lambda args, run_dir: part_step3(args, run_dir, dora=True),
    "step4-sd15": lambda args, run_dir: part_step4(args, run_dir, "sd15"),
    "step4-sdxl": lambda args, run_dir: part_step4(args, run_dir, "sdxl"),
    "step5": part_step5,
    "step6": part_step6,
}


def run_child_part(args: argparse.Namespace) -> None:
    """`--part NAME` (or `--part build:MODEL`): run it, print one result line with seconds and peak memory."""
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if args.part.startswith("build:"):
        result = build_part(args, args.part.removeprefix("build:"))
    else:
        result = RUNNERS[args.part](args, args.run_dir)
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    if args.device == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# -------------------------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="bf16", help="run.mixed_precision on CUDA")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--config", type=Path, default=None, help="default: configs/base.yaml (real), configs/smoke.yaml (tiny)")
    parser.add_argument("--train-steps", type=int, default=None, help="optimizer steps per training part (CPU 2, CUDA 20)")
    parser.add_argument("--feature-images", type=int, default=8)
    parser.add_argument("--sdxl-resolution", type=int, default=None,
                        help="SDXL generation side (default: 512 on CPU, SDXL's native 1024 on CUDA as in exp_c_sdxl_all.yaml)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8], help="Step 4 batch sizes on CUDA")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--models-dir", type=Path, default=None, help="where models are built (kept); default: a temporary folder")
    parser.add_argument("--json", type=Path, default=None, help="also write every result to this JSON file")
    parser.add_argument("--list", action="store_true", help="print what would be built and measured, run nothing")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--run-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.config = args.config or REPO / "configs" / ("base.yaml" if args.size == "real" else "smoke.yaml")
    args.train_steps = args.train_steps or (2 if args.device == "cpu" else 20)
    args.sdxl_resolution = args.sdxl_resolution or (1024 if args.device == "cuda" else 512)
    if args.size == "tiny":
        args.sdxl_resolution = min(args.sdxl_resolution, 64)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "realsize_check: --device cuda but torch sees no CUDA device (torch.cuda.is_available() is False); "
                       "run it on a GPU node or drop --device cuda\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def needed_models(parts: list[str]) -> list[str]:
    return list(dict.fromkeys(model for part in parts for model in MODELS[part]))


def plan_lines(args: argparse.Namespace) -> list[str]:
    """What a run with these arguments builds and measures (`--list`)."""
    memory = "peak GPU memory" if args.device == "cuda" else "peak RSS"
    training = f"{args.train_steps} optimizer steps, steps/s after the first, {memory}"
    if args.device == "cuda":
        generation = f"images/s at batch {', '.join(map(str, args.batch_sizes))}, compile off and on, {args.dtype}"
    else:
        generation = "1 image at batch 1"
    described = {
        "step1": training, "step3-lora": training, "step3-dora": training, "step6": training,
        "step4-sd15": f"{generation} at generation.resolution, NaN/Inf in latents and images, {memory}",
        "step4-sdxl": f"{generation if args.device == 'cuda' else '1 image in bf16'} at {args.sdxl_resolution} px, "
                      f"NaN/Inf in latents and images, {memory}",
        "step5": f"Inception + DINOv3 features of {args.feature_images} images, {memory}",
    }
    return [f"models ({args.size} size): {', '.join(needed_models(args.parts))}",
            *(f"{part}: {described[part]}" for part in args.parts)]


def child_command(args: argparse.Namespace, part: str, run_dir: Path) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--run-dir", str(run_dir),
               "--models-dir", str(args.models_dir), "--size", args.size, "--device", args.device, "--dtype", args.dtype,
               "--config", str(args.config), "--train-steps", str(args.train_steps), "--feature-images", str(args.feature_images),
               "--sdxl-resolution", str(args.sdxl_resolution), "--threads", str(args.threads), "--batch-sizes",
               *map(str, args.batch_sizes)]
    return command


def run_in_child(args: argparse.Namespace, part: str, run_dir: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    done = subprocess.run(child_command(args, part, run_dir), capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"part": part, "error": error, "seconds": time.perf_counter() - started, "finite": False, "stderr_tail": done.stderr[-4000:]}
    return {"part": part, **json.loads(lines[-1].removeprefix(RESULT_PREFIX))}


def prepare_step0(args: argparse.Namespace, run_dir: Path) -> None:
    from neu_det_pipeline import step0_prepare
    from neu_det_pipeline.recipe import console, new_progress, run_step

    config = config_for(args, run_dir)
    console.quiet = True
    with new_progress(disable=True) as quiet:
        run_step(step0_prepare.STEP, config, quiet)
    console.quiet = False


def params_cell(rows: list[dict[str, Any]]) -> str:
    cells = []
    for row in rows:
        text = f"{row['model']} {row['params'] / 1e6:.1f} M"
        if published := PUBLISHED.get(row["model"]):
            text += f" (published {published / 1e6:.1f} M, {row['params'] / published:.3f}x)"
        cells.append(text)
    return "; ".join(cells) or "-"


def table(results: list[dict[str, Any]], device: str) -> str:
    memory = "peak GPU GiB" if device == "cuda" else "peak RSS GiB"
    lines = [f"| part | seconds | {memory} | params vs published | finite | detail |", "|---|---|---|---|---|---|"]
    for r in results:
        peak = r.get("peak_gpu_gib") if device == "cuda" else r.get("peak_rss_gib")
        models_ok = all(m["finite"] for m in r.get("models", []))
        finite = "yes" if r.get("finite", True) and models_ok and "error" not in r else "no"
        detail = r.get("error") or r.get("detail", "")
        if r.get("steps_per_s"):
            detail += f"; {r['steps_per_s']:.3g} steps/s ({1 / r['steps_per_s']:.1f} s/step) after the first"
        if r.get("images_per_s"):
            detail += "; " + ", ".join(f"{key}: {rate:.3g} images/s ({1 / rate:.1f} s/image)" for key, rate in r["images_per_s"].items())
        lines.append(f"| {r['part']} | {r['seconds']:.1f} | {'-' if peak is None else f'{peak:.2f}'} | "
                     f"{params_cell(r.get('models', []))} | {finite} | {detail} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part:
        run_child_part(args)
        return 0
    if args.list:
        print("\n".join(plan_lines(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="realsize-") as tmp:
        args.models_dir = (args.models_dir or Path(tmp) / "models").resolve()
        run_dir = Path(tmp) / "run"
        prepare_step0(args, run_dir)
        results = []
        for model in needed_models(args.parts):
            if not (args.models_dir / model).is_dir():
                results.append(run_in_child(args, f"build:{model}", run_dir))
                print(table(results[-1:], args.device).splitlines()[-1], flush=True)
        for part in args.parts:
            results.append(run_in_child(args, part, run_dir))
            print(table(results[-1:], args.device).splitlines()[-1], flush=True)
    print(f"\n{args.size} size, {args.device}{'' if args.device == 'cpu' else ' ' + args.dtype}, torch threads "
          f"{args.threads or torch.get_num_threads()}:\n" + table(results, args.device))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
