"""Step 3 LoRA / DoRA: training, exact round trip through diffusers, 8-bit optimizer state, exact resume,
data-parallel ranks, and one-line errors. Tiny random models on the real sample images, at 32 px.

Step 1 and Step 2 outputs are written here in their documented formats (random class embeddings, template
prompts), so these tests do not depend on those steps' training.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    SMOKE_CONFIG,
    crash_after_checkpoint,
    launch_two_cpu_ranks,
    smoke_overrides,
)
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from neu_det_pipeline.artifacts import LORA_WEIGHTS_FILE
from neu_det_pipeline.compat import transformers_peft_integration_works
from neu_det_pipeline.config import NEU_DET_CLASSES, PipelineConfig
from neu_det_pipeline.errors import ConfigError, MissingStepOutputError, PipelineError
from neu_det_pipeline.io import read_json, read_jsonl, write_json, write_jsonl
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step3_lora import STEP
from neu_det_pipeline.training.data import collate
from neu_det_pipeline.training.diffusion import (
    denoising_loss,
    encode_prompts,
    inference_pipeline,
)
from neu_det_pipeline.training.lora import LoraTraining, load_lora, optimizer_state_bits
from neu_det_pipeline.training.textual_inversion import load_learned_embeddings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small and fast: 32 px, validation with one denoising step, only at the end.
FAST = ("lora.resolution=32", "lora.validation_inference_steps=1", "lora.validation_steps=1000")
EMBEDDING_DIM = 32  # hidden size of the tiny text encoders
PROMPT = "a grayscale photo of {token} on a steel strip"




def write_upstream(step0_sample_dir: Path, out: Path, config: PipelineConfig) -> None:
    """Step 0 (real, copied) plus Step 1 and Step 2 outputs in their documented formats."""
    shutil.copytree(step0_sample_dir / "step0_prepare", out / "step0_prepare")
    step1, step2 = out / "step1_textual_inversion", out / "step2_captions"
    step1.mkdir()
    step2.mkdir()
    encoders = ("text_encoder", "text_encoder_2") if config.models.pipeline == "sdxl" else ("text_encoder",)
    tokens = config.textual_inversion.tokens(config.data.classes)
    generator = torch.Generator().manual_seed(0)
    token_map = {}
    for name, token in tokens.items():
        files = {}
        for encoder in encoders:
            files[encoder] = f"{encoder}-{name}.safetensors"
            save_file({token: 0.02 * torch.randn(1, EMBEDDING_DIM, generator=generator)}, step1 / files[encoder])
        token_map[name] = {"token": token, "files": files}
    write_json(step1 / "token_map.json", token_map)
    rows = [row for row in read_jsonl(out / "step0_prepare" / "manifest.jsonl") if row["split"] == "train"]
    write_jsonl(step2 / "captions.jsonl", [
        {"id": row["id"], "class": row["class"], "token": tokens[row["class"]], "prompt": PROMPT.format(token=tokens[row["class"]])}
        for row in rows
    ])
    for folder in (step1, step2):
        write_json(folder / "summary.json", {"status": "complete", "fingerprint": folder.name})


@pytest.fixture
def step3_config(make_config, step0_sample_dir: Path, tmp_path: Path):
    """`step3_config(*overrides)`: a smoke config at 32 px with every upstream output in place."""

    def make(*overrides: str, output_dir: Path | None = None) -> PipelineConfig:
        out = output_dir or tmp_path / "out"
        config = make_config(*FAST, *overrides, output_dir=out)
        if not (out / "step0_prepare").exists():
            write_upstream(step0_sample_dir, out, config)
        return config

    return make


def build(config: PipelineConfig) -> LoraTraining:
    out_dir = Path(config.run.output_dir)
    (out_dir / STEP.name).mkdir(parents=True, exist_ok=True)
    return LoraTraining(
        config, out_dir / "step0_prepare", out_dir / "step1_textual_inversion", out_dir / "step2_captions", out_dir / STEP.name
    )


@torch.no_grad()
def fixed_loss(training: LoraTraining, batch: dict) -> float:
    """The denoising loss on one batch with fixed noise and timesteps: training progress without sampling noise."""
    losses = []
    for seed in range(4):
        torch.manual_seed(seed)
        hidden, added = encode_prompts(training.components, batch["prompts"], training.section.resolution, torch.device("cpu"))
        losses.append(denoising_loss(training.components, batch["pixel_values"], hidden, added).item())
    return float(np.mean(losses))


def generate(pipe: DiffusionPipeline, prompts: list[str], resolution: int = 32) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompts, num_inference_steps=2, height=resolution, width=resolution,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images


def fresh_pipeline(config: PipelineConfig, scheduler) -> DiffusionPipeline:
    """The base model from disk with the Step 1 tokens, as Step 4 will load it; same sampler as `scheduler`."""
    pipe = DiffusionPipeline.from_pretrained(getattr(config.models, config.models.pipeline))
    load_learned_embeddings(pipe, Path(config.run.output_dir) / "step1_textual_inversion")
    pipe.scheduler = scheduler
    return pipe


@pytest.mark.parametrize(
    "pipeline, overrides",
    [
        ("sd15", ()),
        ("sd15", ("lora.use_dora=true", "lora.optimizer=adamw8bit", "lora.train_text_encoder=true")),
        ("sdxl", ("lora.train_text_encoder=true", "lora.gradient_checkpointing=true", "lora.target_modules=[to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2]")),
    ],
    ids=["lora", "dora-8bit-text-encoder", "sdxl-lora-text-encoders"],
)
def test_trains_and_round_trips_through_load_lora_weights(step3_config, pipeline: str, overrides: tuple[str, ...]) -> None:
    config = step3_config(
        f"models.pipeline={pipeline}", "lora.max_train_steps=40", "lora.learning_rate=1e-2", "lora.checkpointing_steps=1000",
        *overrides,
    )
    assert config.lora.alpha != config.lora.rank  # the scale only survives the round trip with the metadata
    training = build(config)
    dataset = training.dataloader.dataset
    first_of_class = [next(i for i, row in enumerate(dataset.rows) if row["class"] == name) for name in config.data.classes]
    batch = collate([dataset[(index, 0)] for index in first_of_class])
    before = fixed_loss(training, batch)
    result = training.run()
    # Overfitting works: the adapters really train (tiny SD 1.5: -35 %; tiny SDXL, fewer attention layers: -9 %).
    assert fixed_loss(training, batch) < 0.95 * before
    assert len(result.losses) == 40 and all(np.isfinite(result.losses))

    weights = Path(result.weights_file)
    assert weights == Path(config.run.output_dir) / STEP.name / LORA_WEIGHTS_FILE
    state = load_file(weights)
    encoders = {"sd15": {"text_encoder"}, "sdxl": {"text_encoder", "text_encoder_2"}}[pipeline]
    assert {key.split(".")[0] for key in state} == {"unet"} | (encoders if config.lora.train_text_encoder else set())
    assert any("lora_magnitude_vector" in key for key in state) == config.lora.use_dora
    with safe_open(weights, "pt") as file:
        metadata = json.loads(file.metadata()["lora_adapter_metadata"])
    assert metadata["unet.lora_alpha"] == 8 and metadata["unet.r"] == 4

    prompts = list(training.validation_prompts.values())[:2]
    trained_pipe = inference_pipeline(training.components)
    training.components.unet.eval()
    trained = generate(trained_pipe, prompts)
    fresh = fresh_pipeline(config, trained_pipe.scheduler)
    base = generate(fresh, prompts)
    load_lora(fresh, weights.parent)
    for name, module in training.modules.items():  # nothing silently dropped or re-initialised
        loaded = getattr(fresh, name).state_dict()
        assert all(torch.equal(value, loaded[key]) for key, value in module.state_dict().items() if "lora_" in key)
    np.testing.assert_allclose(generate(fresh, prompts), trained, atol=1e-5)
    assert np.abs(trained - base).max() > 1e-3  # the adapters change the images
    # The same file loads whole into the family's 9-channel inpainting checkpoint (Step 4's `models.<family>_inpaint`):
    # the adapters sit on attention and feed-forward layers, which the extra input channels do not touch.
    inpaint = DiffusionPipeline.from_pretrained(Path(getattr(config.models, pipeline)).parent / f"{pipeline}-inpaint")
    assert inpaint.unet.config.in_channels == 9
    load_lora(inpaint, weights.parent)
    for name, module in training.modules.items():
        loaded = getattr(inpaint, name).state_dict()
        assert all(torch.equal(value, loaded[key]) for key, value in module.state_dict().items() if "lora_" in key)
    if not config.lora.train_text_encoder or transformers_peft_integration_works():
        # diffusers' own loader reads the same file to the same images (for text-encoder LoRA only where
        # transformers' PEFT version gate lets it: see neu_det_pipeline.compat).
        by_diffusers = fresh_pipeline(config, trained_pipe.scheduler)
        by_diffusers.load_lora_weights(weights.parent)
        np.testing.assert_allclose(generate(by_diffusers, prompts), trained, atol=1e-5)

    if pipeline == "sd15" and not overrides:
        # Without the metadata diffusers assumes alpha = rank: the trap the metadata avoids.
        no_metadata = fresh_pipeline(config, trained_pipe.scheduler)
        no_metadata.load_lora_weights(state)
        assert np.abs(generate(no_metadata, prompts) - trained).max() > 1e-3


def test_adamw8bit_keeps_8bit_state_for_every_adapter_tensor(step3_config) -> None:
    import bitsandbytes as bnb

    config = step3_config("lora.optimizer=adamw8bit", "lora.use_dora=true", "lora.train_text_encoder=true", "lora.max_train_steps=1")
    training = build(config)
    result = training.run()
    states = [training.optimizer.state[param] for param in training.parameters.values()]
    assert len(states) == len(training.parameters) > 0
    assert all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in states)
    assert result.optimizer_state_bits == {"8-bit": len(states)}

    # The trap the factory avoids: bitsandbytes' default keeps 32-bit state for these small tensors.
    params = [torch.nn.Parameter(p.detach().clone()) for p in training.parameters.values()]
    default = bnb.optim.AdamW8bit(params)
    for param in params:
        param.grad = torch.ones_like(param)
    default.step()
    assert optimizer_state_bits(default)[32] == len(params)


def test_resume_gives_the_losses_of_an_uninterrupted_run(step3_config, tmp_path: Path) -> None:
    # Accumulation on: resuming must skip whole optimizer steps of micro-batches; the 8-bit optimizer state
    # (quantised moments and their block scales) must come back exactly from the checkpoint.
    overrides = (
        "lora.gradient_accumulation_steps=2", "lora.gradient_checkpointing=true", "lora.optimizer=adamw8bit",
        "lora.use_dora=true", "lora.lr_scheduler=cosine_with_warmup", "lora.lr_warmup_steps=1",
    )
    straight = run_step(STEP, step3_config(*overrides, output_dir=tmp_path / "straight"))
    assert straight["resumed_from"] is None and straight["steps"] == 4

    with crash_after_checkpoint(2):
        run_step(STEP, step3_config(*overrides, output_dir=tmp_path / "resumed"))
    resumed = run_step(STEP, step3_config(*overrides, "lora.resume=latest", output_dir=tmp_path / "resumed"))

    assert resumed["resumed"] and resumed["resumed_from"] == "checkpoint-2"
    assert read_json(tmp_path / "resumed" / STEP.name / "losses.json") == read_json(tmp_path / "straight" / STEP.name / "losses.json")
    straight_weights = load_file(tmp_path / "straight" / STEP.name / LORA_WEIGHTS_FILE)
    resumed_weights = load_file(tmp_path / "resumed" / STEP.name / LORA_WEIGHTS_FILE)
    assert all(torch.equal(straight_weights[key], resumed_weights[key]) for key in straight_weights)
    with Image.open(tmp_path / "resumed" / STEP.name / "validation" / "step-000004.png") as grid:
        assert grid.size == (32, 32 * len(NEU_DET_CLASSES))  # one row per class, one image each
    checkpoints = sorted(p.name for p in (tmp_path / "resumed" / STEP.name / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]


def test_mixed_precision_trains_fp32_adapters_on_half_precision_weights(step3_config) -> None:
    """bf16 on CPU: weights and autocast as in a GPU run."""
    config = step3_config(
        "models.pipeline=sdxl", "lora.use_dora=true", "lora.train_text_encoder=true", "lora.optimizer=adamw8bit", "run.mixed_precision=bf16"
    )
    training = build(config)
    assert training.accelerator.mixed_precision == "bf16"
    assert training.components.unet.dtype == training.components.text_encoders[0].dtype == torch.bfloat16
    assert training.components.vae.dtype == torch.float32  # the SDXL VAE overflows in half precision
    assert {param.dtype for param in training.parameters.values()} == {torch.float32}
    result = training.run()
    assert all(np.isfinite(result.losses)) and result.optimizer_state_bits == {"8-bit": len(training.parameters)}
    assert {tensor.dtype for tensor in load_file(result.weights_file).values()} == {torch.float32}


def test_two_processes_train_identical_adapters(step3_config, tiny_models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    # The most demanding setup for DDP: SDXL, DoRA on the UNet and both text encoders, 8-bit optimizer state.
    overrides = ["models.pipeline=sdxl", "lora.use_dora=true", "lora.train_text_encoder=true", "lora.optimizer=adamw8bit", "lora.max_train_steps=2"]
    step3_config(*overrides, output_dir=out)  # writes the upstream outputs
    config_args = ["--config", str(SMOKE_CONFIG), *smoke_overrides(tiny_models_dir, out), *FAST, *overrides]
    rank0, rank1 = launch_two_cpu_ranks("neu_det_pipeline.step3_lora", "neu_det_pipeline.training.lora.LoraTraining", config_args, tmp_path)

    summary = read_json(out / STEP.name / "summary.json")
    assert summary["status"] == "complete" and summary["processes"] == 2 and summary["steps"] == 2
    assert rank0.keys() == rank1.keys() and rank0
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    assert any(key.endswith("lora_B.default.weight") and rank0[key].abs().max() > 0 for key in rank0)  # they trained


@pytest.mark.parametrize("upstream", ["step0_prepare", "step1_textual_inversion", "step2_captions"])
def test_missing_upstream_step_is_one_line(step3_config, tmp_path: Path, upstream: str) -> None:
    config = step3_config()
    shutil.rmtree(tmp_path / "out" / upstream)
    with pytest.raises(MissingStepOutputError) as info:
        run_step(STEP, config)
    assert upstream in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "remove, expected",
    [
        ("step1_textual_inversion/token_map.json", "token_map.json is missing"),
        ("step2_captions/captions.jsonl", "captions.jsonl is missing"),
    ],
)
def test_missing_upstream_file_is_one_line(step3_config, tmp_path: Path, remove: str, expected: str) -> None:
    config = step3_config()
    (tmp_path / "out" / remove).unlink()
    with pytest.raises(MissingStepOutputError, match=expected) as info:
        build(config)
    assert "\n" not in str(info.value)


def test_caption_missing_for_a_training_image_is_one_line(step3_config, tmp_path: Path) -> None:
    config = step3_config()
    captions = tmp_path / "out" / "step2_captions" / "captions.jsonl"
    write_jsonl(captions, read_jsonl(captions)[1:])
    with pytest.raises(MissingStepOutputError, match=r"no prompt for 1 training image\(s\) \(e.g. crazing_"):
        build(config)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("lora.rank=0", "invalid value 0 for 'lora.rank' in the command line: Input should be greater than or equal to 1"),
        ("lora.optimizer=sgd", "invalid value 'sgd' for 'lora.optimizer' in the command line; allowed values: 'adamw' or 'adamw8bit'"),
    ],
)
def test_bad_config_value_is_one_line(make_config, override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(override)
    assert str(info.value) == expected


def test_unknown_text_encoder_target_is_one_line(step3_config) -> None:
    # `self_attn` exists but is a whole block: peft would fail on it with a traceback.
    config = step3_config("lora.train_text_encoder=true", "lora.text_encoder_target_modules=[q_proj,qkv,self_attn]")
    with pytest.raises(PipelineError) as info:
        build(config)
    assert str(info.value).startswith(
        "lora.text_encoder_target_modules: qkv, self_attn match(es) no linear or convolution layer of the CLIPTextModel; "
        "valid names include k_proj, v_proj, q_proj, out_proj, fc1, fc2"
    )


def test_cli_unknown_target_module_is_one_line_listing_valid_names(step3_config, tiny_models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    step3_config()
    result = subprocess.run(
        [sys.executable, "-m", "neu_det_pipeline.step3_lora", "--config", str(SMOKE_CONFIG), *smoke_overrides(tiny_models_dir, out),
         "lora.target_modules=[to_q,to_qq]"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr and len(errors) == 1 and "lora.target_modules: to_qq match(es) no linear or convolution layer of the UNet2DConditionModel" in errors[0]
    assert "valid names include" in errors[0] and "to_k" in errors[0] and "to_out.0" in errors[0]
    assert not (out / STEP.name / "summary.json").exists()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_every_adapter_weight_gets_a_gradient_sdxl(step3_config, checkpointing: bool) -> None:
    """DDP on several processes requires it: SDXL never uses text_encoder's last layer, so it must get no adapter."""
    config = step3_config("models.pipeline=sdxl", "lora.train_text_encoder=true", f"lora.gradient_checkpointing={checkpointing}")
    training = build(config)
    last_layer = f"encoder.layers.{training.components.text_encoders[0].config.num_hidden_layers - 1}."
    assert not any(name.startswith("text_encoder.") and last_layer in name for name in training.parameters)
    batch = collate([training.dataloader.dataset[(index, index)] for index in range(2)])
    torch.manual_seed(0)
    hidden, added = encode_prompts(training.components, batch["prompts"], 32, torch.device("cpu"))
    denoising_loss(training.components, batch["pixel_values"], hidden, added).backward()
    assert all(param.grad is not None for param in training.parameters.values())
    # B starts at zero, so A's first gradient is zero too; B's is not.
    assert all(param.grad.any() for name, param in training.parameters.items() if "lora_B" in name)
