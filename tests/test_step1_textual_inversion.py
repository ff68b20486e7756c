"""Step 1 textual inversion: learning, frozen rows, exact round trip through diffusers, exact resume,
data-parallel ranks, SDXL, and one-line errors. Tiny random models on the real sample images, at 32 px.
"""

from __future__ import annotations

import json
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
    skip_optimizer_step,
    smoke_overrides,
)
from diffusers import (
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from neu_det_pipeline.config import PipelineConfig, load_config
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.io import read_json, read_jsonl, write_jsonl
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step1_textual_inversion import STEP
from neu_det_pipeline.training.diffusion import inference_pipeline
from neu_det_pipeline.training.textual_inversion import (
    TextualInversion,
    TextualInversionResult,
    add_placeholder_tokens,
    load_learned_embeddings,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
# configs/smoke.yaml already trains at 32 px for 4 steps; validation only at the end.
FAST = ("textual_inversion.validation_steps=1000",)




def with_step0(step0_sample_dir: Path, out: Path, train_images: int | None = None) -> Path:
    """`out` holding a copy of Step 0's outputs, optionally cut to the first `train_images` training images."""
    shutil.copytree(step0_sample_dir / "step0_prepare", out / "step0_prepare")
    if train_images is not None:
        manifest = out / "step0_prepare" / "manifest.jsonl"
        write_jsonl(manifest, [row for row in read_jsonl(manifest) if row["split"] == "train"][:train_images])
    return out


def config_for(tiny_models_dir: Path, out: Path, *overrides: str) -> PipelineConfig:
    return load_config(SMOKE_CONFIG, [*smoke_overrides(tiny_models_dir, out), *FAST, *overrides])


def train_in_memory(config: PipelineConfig) -> tuple[TextualInversion, TextualInversionResult]:
    """The library without the recipe, keeping the trained components for inspection."""
    training = TextualInversion(config, config.run.output_dir / "step0_prepare", config.run.output_dir / STEP.name)
    return training, training.run()


@pytest.fixture(scope="module")
def sd15_run(
    tiny_models_dir: Path, step0_sample_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TextualInversion, TextualInversionResult]:
    """SD 1.5, 4 steps at a learning rate that visibly moves the tokens, kept in memory."""
    out = with_step0(step0_sample_dir, tmp_path_factory.mktemp("sd15"))
    return train_in_memory(config_for(tiny_models_dir, out, "textual_inversion.learning_rate=0.05"))


def _images(pipe: DiffusionPipeline, prompts: list[str]) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(prompts, num_inference_steps=2, height=32, width=32, generator=generator, output_type="np").images


def test_learned_tokens_lower_the_loss_on_the_batches_they_train_on(
    tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path
) -> None:
    # The tiny random UNet barely listens to its prompt, so the loss moves by ~1e-3 while the random
    # timestep of each step moves it by ~5e-2: first-vs-last means of one run are noise. The core draws
    # noise, timesteps and images from (seed, step) alone, so a run with a frozen token sees exactly the
    # same batches; the per-step difference isolates what the learned tokens do.
    def losses(learning_rate: float, name: str) -> tuple[np.ndarray, TextualInversion]:
        out = with_step0(step0_sample_dir, tmp_path / name, train_images=2)  # a tiny batch to overfit
        config = config_for(
            tiny_models_dir, out, f"textual_inversion.learning_rate={learning_rate}", "textual_inversion.max_train_steps=32",
            "textual_inversion.lr_scheduler=constant", "textual_inversion.checkpointing_steps=1000",
        )
        training, result = train_in_memory(config)
        return np.array(result.losses), training

    learned, _ = losses(0.05, "learned")
    # An update of ~1e-30 is below float32 resolution: this run keeps the initial embeddings exactly.
    frozen, frozen_run = losses(1e-30, "frozen")
    rows = frozen_run.rows[0]
    assert torch.equal(rows.learned(), rows.frozen[rows.token_ids])

    gap = learned - frozen
    assert gap[0] == 0  # same weights, same batch, same noise: the two runs are paired
    # A single step's gap also carries that step's timestep (the real-config UNet listens to some timesteps more than
    # to others): the claim is about the average over the trained steps, not about every one. Float32 rounding of a
    # loss near 1 is ~1e-7, so an average gap below -1e-4 is the tokens' doing.
    assert gap[1:].mean() < -1e-4, gap


def test_tokens_start_from_their_word_and_only_their_rows_get_gradients(tiny_models_dir: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(tiny_models_dir / "sd15", subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_models_dir / "sd15", subfolder="text_encoder")
    original = encoder.get_input_embeddings().weight.detach().clone()
    word_ids = tokenizer.encode("discoloured", add_special_tokens=False)
    assert len(word_ids) > 1  # three pieces in CLIP's vocabulary: their embeddings are averaged

    rows = add_placeholder_tokens(tokenizer, encoder, {"patches": "<neu-patches>"}, {"patches": "discoloured"})
    torch.testing.assert_close(rows.learned()[0], original[word_ids].mean(dim=0))

    ids = tokenizer(["a photo of <neu-patches> on steel"], return_tensors="pt").input_ids
    assert rows.token_ids.item() in ids[0].tolist()  # the prompt uses the new token as one piece
    hidden = encoder(ids)[0]
    # Not `hidden.sum()`: the final LayerNorm's outputs sum to zero over the hidden size, so that gradient is
    # zero analytically and any row "gets a gradient" only through rounding noise. A fixed random projection
    # gives every input row used by the prompt a gradient of order one, before the mask.
    projection = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
    (hidden * projection).sum().backward()
    row_gradients = rows.weight.grad.abs().sum(dim=1)
    assert row_gradients.nonzero().flatten().tolist() == rows.token_ids.tolist()
    assert row_gradients[rows.token_ids].item() > 1e-3  # a real gradient, far above float32 noise


def test_only_placeholder_rows_change(sd15_run, tiny_models_dir: Path) -> None:
    training, _ = sd15_run
    original = CLIPTextModel.from_pretrained(tiny_models_dir / "sd15", subfolder="text_encoder").get_input_embeddings().weight
    trained = training.components.text_encoders[0].get_input_embeddings().weight
    vocab = original.shape[0]
    assert trained.shape[0] == vocab + len(CLASSES)
    assert torch.equal(trained[:vocab], original)  # bit-identical, though weight decay moves every row each step

    tokenizer = CLIPTokenizer.from_pretrained(tiny_models_dir / "sd15", subfolder="tokenizer")
    words = training.config.textual_inversion.initializer_words
    for name, row in zip(CLASSES, trained[vocab:]):
        initial = original[tokenizer.encode(words[name], add_special_tokens=False)].mean(dim=0)
        assert not torch.allclose(row, initial), name  # every class token learned


def test_saved_embeddings_reproduce_the_trained_pipeline(sd15_run, tiny_models_dir: Path) -> None:
    training, _ = sd15_run
    out = training.out_dir
    token_map = read_json(out / "token_map.json")
    assert list(token_map) == list(CLASSES)
    prompts = [f"a grayscale photo of {entry['token']} on a steel strip" for entry in token_map.values()]
    trained = inference_pipeline(training.components)
    trained.set_progress_bar_config(disable=True)

    fresh = StableDiffusionPipeline.from_pretrained(tiny_models_dir / "sd15", safety_checker=None, requires_safety_checker=False)
    fresh.scheduler = UniPCMultistepScheduler.from_config(trained.scheduler.config)
    fresh.set_progress_bar_config(disable=True)
    expected = _images(trained, prompts)
    assert not np.array_equal(_images(fresh, prompts), expected)  # without the tokens the prompts differ
    for entry in token_map.values():
        assert list(entry["files"]) == ["text_encoder"]
        fresh.load_textual_inversion(str(out / entry["files"]["text_encoder"]), token=entry["token"])
    np.testing.assert_array_equal(_images(fresh, prompts), expected)


def test_outputs(sd15_run) -> None:
    training, result = sd15_run
    out = training.out_dir
    assert read_json(out / "losses.json") == result.losses and len(result.losses) == 4
    assert (out / "loss.png").is_file()
    assert result.validation_images == [str(out / "validation" / "step-000004.png")]
    with Image.open(result.validation_images[0]) as grid:
        assert grid.size[::-1] == (32 * len(CLASSES), 32)  # a row per class token, one image each
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert set(load_file(out / "checkpoints" / "checkpoint-4" / "trained.safetensors")) == {"text_encoder"}


def test_resume_gives_the_losses_of_an_uninterrupted_run(
    tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path
) -> None:
    # Accumulation and a warm-up schedule on: resuming must restore the scheduler and skip whole steps;
    # a high learning rate makes any state lost on the way show in the losses.
    overrides = (
        "textual_inversion.gradient_accumulation_steps=2", "textual_inversion.lr_warmup_steps=3", "textual_inversion.learning_rate=0.05",
    )
    straight_out = with_step0(step0_sample_dir, tmp_path / "straight")
    straight = run_step(STEP, config_for(tiny_models_dir, straight_out, *overrides, "textual_inversion.checkpoints_total_limit=1"))
    assert straight["resumed_from"] is None and straight["steps"] == 4 and straight["processes"] == 1
    assert straight["tokens"] == {name: f"<neu-{name}>" for name in CLASSES}
    assert straight["final_loss"] == read_json(straight_out / STEP.name / "losses.json")[-1]
    assert [p.name for p in (straight_out / STEP.name / "checkpoints").iterdir()] == ["checkpoint-4"]  # retention

    resumed_out = with_step0(step0_sample_dir, tmp_path / "resumed")
    with crash_after_checkpoint(2):
        run_step(STEP, config_for(tiny_models_dir, resumed_out, *overrides))
    # `resume` is not part of the step's fingerprint, so the interrupted run's folder is continued, not wiped.
    resumed = run_step(STEP, config_for(tiny_models_dir, resumed_out, *overrides, "textual_inversion.resume=latest"))

    assert resumed["resumed"] and resumed["resumed_from"] == "checkpoint-2"
    straight_dir, resumed_dir = straight_out / STEP.name, resumed_out / STEP.name
    assert read_json(resumed_dir / "losses.json") == read_json(straight_dir / "losses.json")
    for files in straight["files"].values():
        for file in files.values():
            expected, got = load_file(straight_dir / file), load_file(resumed_dir / file)
            assert expected.keys() == got.keys() and all(torch.equal(got[key], value) for key, value in expected.items())
    assert resumed["validation_images"] == ["validation/step-000004.png"]


def test_placeholder_already_in_vocabulary_is_refused(tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path) -> None:
    # `{cls}` makes the tokens the class names; `inclusion` is one word of CLIP's vocabulary (`crazing` is two pieces).
    config = config_for(tiny_models_dir, with_step0(step0_sample_dir, tmp_path), "textual_inversion.placeholder_format='{cls}'")
    with pytest.raises(PipelineError, match=r"'inclusion' already exists .* textual_inversion\.placeholder_format") as error:
        run_step(STEP, config)
    assert "\n" not in str(error.value)


def test_missing_step0_is_one_line(tiny_models_dir: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "neu_det_pipeline.step1_textual_inversion", "--config", str(SMOKE_CONFIG),
        *smoke_overrides(tiny_models_dir, tmp_path / "out"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "step0_prepare" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_sdxl_trains_both_text_encoders(tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path) -> None:
    out = with_step0(step0_sample_dir, tmp_path)
    training, _ = train_in_memory(config_for(
        tiny_models_dir, out, "models.pipeline=sdxl", "textual_inversion.max_train_steps=2", "textual_inversion.learning_rate=0.05",
    ))
    step_dir = training.out_dir
    token_map = read_json(step_dir / "token_map.json")
    assert all(list(entry["files"]) == ["text_encoder", "text_encoder_2"] for entry in token_map.values())

    for subfolder, model_class, rows in zip(
        ("text_encoder", "text_encoder_2"), (CLIPTextModel, CLIPTextModelWithProjection), training.rows
    ):
        original = model_class.from_pretrained(tiny_models_dir / "sdxl", subfolder=subfolder).get_input_embeddings().weight
        assert torch.equal(rows.weight[: original.shape[0]], original), subfolder  # only the placeholders moved
        assert not torch.equal(rows.learned(), rows.frozen[rows.token_ids]), subfolder  # and they did, in both encoders

    prompts = [f"an industrial inspection image of {entry['token']}" for entry in token_map.values()][:2]
    trained_pipe = inference_pipeline(training.components)
    trained_pipe.set_progress_bar_config(disable=True)
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_models_dir / "sdxl")
    fresh.scheduler = UniPCMultistepScheduler.from_config(trained_pipe.scheduler.config)
    fresh.set_progress_bar_config(disable=True)
    assert load_learned_embeddings(fresh, step_dir) == {name: f"<neu-{name}>" for name in CLASSES}
    np.testing.assert_array_equal(_images(fresh, prompts), _images(trained_pipe, prompts))


@pytest.mark.parametrize("pipeline", ["sd15", "sdxl"])
def test_mixed_precision_trains_fp32_tokens_through_half_precision_networks(
    tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path, pipeline: str
) -> None:
    """bf16 on CPU: weights and autocast as in a GPU run."""
    out = with_step0(step0_sample_dir, tmp_path)
    training, result = train_in_memory(config_for(
        tiny_models_dir, out, f"models.pipeline={pipeline}", "textual_inversion.max_train_steps=2", "textual_inversion.validation_steps=2",
        "run.mixed_precision=bf16",
    ))
    assert training.accelerator.mixed_precision == "bf16" and training.components.unet.dtype == torch.bfloat16
    # The SDXL VAE overflows in half precision, so it stays fp32 like in diffusers' SDXL scripts.
    assert training.components.vae.dtype == (torch.float32 if pipeline == "sdxl" else torch.bfloat16)
    assert all(rows.weight.dtype == torch.float32 for rows in training.rows)
    assert np.isfinite(result.losses).all() and len(result.validation_images) == 1
    saved = load_file(training.out_dir / "learned_embeds-crazing.safetensors")["<neu-crazing>"]
    assert saved.dtype == torch.float32


def test_two_processes_learn_identical_tokens(tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path) -> None:
    out = with_step0(step0_sample_dir, tmp_path / "ddp")
    config_args = ["--config", str(SMOKE_CONFIG), *smoke_overrides(tiny_models_dir, out), *FAST, "textual_inversion.max_train_steps=2"]
    rank0, rank1 = launch_two_cpu_ranks("neu_det_pipeline.step1_textual_inversion", "neu_det_pipeline.training.textual_inversion.TextualInversion", config_args, tmp_path)

    summary = read_json(out / STEP.name / "summary.json")
    assert summary["status"] == "complete" and summary["processes"] == 2 and summary["steps"] == 2
    # Each rank sees different images: without gradient averaging their tokens would drift apart.
    assert torch.equal(rank0["text_encoder"], rank1["text_encoder"])
    saved = load_file(out / STEP.name / "learned_embeds-crazing.safetensors")["<neu-crazing>"]
    assert torch.equal(saved[0], rank0["text_encoder"][0])


def _pooled_at_eos(encoder: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """SDXL's pooled embedding by definition: the final hidden state (after the LayerNorm) at each prompt's first
    EOS token, through the text projection."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    eos = (ids == tokenizer.eos_token_id).int().argmax(dim=-1)
    assert (ids.argmax(dim=-1) != eos).all()  # the class token has the highest id: the legacy pooling would pick it
    hidden = encoder(ids).last_hidden_state
    return encoder.text_projection(hidden[torch.arange(len(prompts)), eos])


@torch.no_grad()
def test_pooled_text_embeddings_read_eos_with_the_hubs_encoder_configs(tiny_models_dir: Path, tmp_path: Path) -> None:
    from neu_det_pipeline.generation.pipeline import ControlNetGenerator
    from neu_det_pipeline.training.diffusion import encode_prompts, load_components
    from neu_det_pipeline.training.textual_inversion import save_learned_embeddings

    config = config_for(tiny_models_dir, tmp_path / "out", "models.pipeline=sdxl")
    components = load_components(config)
    # As on the hub: eos_token_id 2, which transformers reads as "pool at the highest token id".
    assert all(encoder.config.eos_token_id == 2 for encoder in components.text_encoders)
    tokens = config.textual_inversion.tokens(config.data.classes)
    words = {name: "scratches" for name in tokens}
    rows = [add_placeholder_tokens(t, e, tokens, words) for t, e in zip(components.tokenizers, components.text_encoders)]
    prompts = [f"a photo of {tokens['crazing']} on a rusty steel strip", f"{tokens['patches']} and cracks at the edge"]

    # Training: the pooled `text_embeds` of Steps 1 and 3.
    _, added = encode_prompts(components, prompts, 32, torch.device("cpu"))
    expected = _pooled_at_eos(components.text_encoders[1], components.tokenizers[1], prompts)
    torch.testing.assert_close(added["text_embeds"], expected, rtol=0, atol=1e-6)

    # Generation: the pipeline's own prompt encoding, after loading the Step 1 files.
    step1_dir = tmp_path / "step1"
    step1_dir.mkdir()
    files = save_learned_embeddings(step1_dir, rows, tokens)
    (step1_dir / "token_map.json").write_text(
        json.dumps({name: {"token": token, "files": files[name]} for name, token in tokens.items()})
    )
    generator = ControlNetGenerator(
        config_for(tiny_models_dir, tmp_path / "out", "models.pipeline=sdxl", "generation.use_lora=false"),
        torch.device("cpu"), torch.float32, step1_dir, tmp_path / "none",
    )
    pipe = generator.pipe
    pooled = pipe.encode_prompt(prompts, device=torch.device("cpu"), do_classifier_free_guidance=False)[2]
    torch.testing.assert_close(pooled, _pooled_at_eos(pipe.text_encoder_2, pipe.tokenizer_2, prompts), rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)  # same weights and tokens as training


def _count_grad_mode_calls(module: torch.nn.Module, counts: dict[str, int], name: str) -> None:
    """Count the forward calls of `module` made with gradients on (training forwards and checkpoint recomputes;
    validation renders without gradients)."""
    counts[name] = 0

    def hook(*_: object) -> None:
        counts[name] += torch.is_grad_enabled()

    module.register_forward_hook(hook)


def test_gradient_checkpointing_and_loader_workers_leave_the_result_unchanged(
    sd15_run, tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path
) -> None:
    # The fixture's run, with both options on. Checkpointing recomputes the same operations on the same inputs,
    # and the workers load the same seeded samples, so the CPU result is bit for bit the same, not just close.
    out = with_step0(step0_sample_dir, tmp_path)
    config = config_for(
        tiny_models_dir, out, "textual_inversion.learning_rate=0.05", "textual_inversion.gradient_checkpointing=true",
        "textual_inversion.num_workers=2",
    )
    training = TextualInversion(config, out / "step0_prepare", out / STEP.name)
    unet, encoder = training.components.unet, training.components.text_encoders[0]
    assert unet.is_gradient_checkpointing and all(layer.gradient_checkpointing for layer in encoder.encoder.layers)
    assert training.dataloader.num_workers == 2
    counts: dict[str, int] = {}
    # Modules inside checkpointed blocks on the gradient's path (the UNet's blocks after its first cross-attention;
    # transformers checkpoints a layer's `forward`, so the layer's own hooks run once, its submodules' twice).
    _count_grad_mode_calls(unet.up_blocks[-1].resnets[0].conv1, counts, "unet")
    _count_grad_mode_calls(encoder.encoder.layers[0].mlp.fc1, counts, "text_encoder")
    result = training.run()

    steps = config.textual_inversion.max_train_steps
    assert counts == {"unet": 2 * steps, "text_encoder": 2 * steps}  # each checkpointed block ran again in backward
    reference_training, reference = sd15_run
    assert result.losses == reference.losses
    assert torch.equal(training.rows[0].learned(), reference_training.rows[0].learned())


def test_the_lr_schedule_waits_for_a_step_the_grad_scaler_skipped(
    tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = skip_optimizer_step(monkeypatch, skipped_call=2)
    out = with_step0(step0_sample_dir, tmp_path)
    config = config_for(tiny_models_dir, out, "textual_inversion.lr_warmup_steps=10", "textual_inversion.checkpointing_steps=1000")
    training, result = train_in_memory(config)
    steps = config.textual_inversion.max_train_steps
    assert len(calls) == steps and len(result.losses) == steps
    assert training.lr_scheduler.last_epoch == steps - 1  # the skipped step did not advance the warm-up
    assert training.lr_scheduler.get_last_lr()[0] == pytest.approx(config.textual_inversion.learning_rate * (steps - 1) / 10)
