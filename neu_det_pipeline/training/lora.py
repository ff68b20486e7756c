"""LoRA / DoRA fine-tuning of the Stable Diffusion UNet (and optionally the text encoders) with peft.

Adapters are added with peft (`LoraConfig(..., use_dora=...)`) to the frozen base model, whose text encoders
first receive the Step 1 class tokens. The text encoders get theirs from peft itself (`inject_adapter_in_model`),
not through transformers' PEFT integration (`add_adapter` / `load_adapter`), whose version gate refuses peft
releases older than the one it was written against (transformers 5.24 demands peft >= 0.22.0, not released yet).
The images are the Step 0 training copies, each with its Step 2 prompt. Only the adapter weights train, in fp32
even under mixed precision.

The result is saved with the pipeline's `save_lora_weights` and the adapter configs as metadata,
so a LoRA trained with `alpha != rank` reloads with the right scale::

    pipe = StableDiffusionPipeline.from_pretrained(base)      # or StableDiffusionXLPipeline
    load_learned_embeddings(pipe, step1_dir)                   # Step 1 class tokens the prompts use
    load_lora(pipe, step3_dir)                                 # pytorch_lora_weights.safetensors

`pipe.load_lora_weights(step3_dir)` reads the same file and gives the same result, but for a text-encoder LoRA
it goes through transformers' `load_adapter` and so its peft version gate (see `neu_det_pipeline.compat`).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from neu_det_pipeline.artifacts import (
    CAPTIONS_FILE,
    LORA_WEIGHTS_FILE,
    TOKEN_MAP_FILE,
    train_rows,
)
from neu_det_pipeline.config import LoraConfigSection, PipelineConfig
from neu_det_pipeline.errors import MissingStepOutputError, PipelineError
from neu_det_pipeline.io import read_json, read_jsonl
from neu_det_pipeline.training.data import DefectImageDataset
from neu_det_pipeline.training.diffusion import (
    DiffusionComponents,
    inference_pipeline,
    load_components,
)
from neu_det_pipeline.training.loop import (
    TrainingSettings,
    TrainingTask,
    make_accelerator,
    make_dataloader,
    make_lr_scheduler,
    train,
    weight_dtype,
)
from neu_det_pipeline.training.reporting import save_losses, save_validation_grid
from neu_det_pipeline.training.textual_inversion import (
    TEXT_ENCODER_NAMES,
    load_learned_embeddings,
)

SUGGESTED_TARGETS = 12
"""Valid target names listed when a configured one matches nothing."""


# ------------------------------------------------------------------------------------ adapters


ADAPTABLE_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)
"""Layer types the adapters are meant for (peft also adapts embeddings, which Step 1 owns)."""


def adaptable_module_names(model: torch.nn.Module) -> list[str]:
    """Target names that match adaptable layers of `model`, e.g. `to_q`, `to_out.0`, `q_proj`, in model order."""
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, ADAPTABLE_LAYERS):
            parts = name.split(".")
            # `to_out.0` rather than `0`: a bare index would match every Sequential's first layer.
            names[".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]] = None
    return list(names)


def check_target_modules(model: torch.nn.Module, targets: list[str], config_key: str) -> None:
    """Fail with one line when a target name matches no linear or convolution layer (peft's own matching rule).

    peft fails only when *none* of the names matches, and with a traceback when one matches a whole block.
    """
    layers = [name for name, module in model.named_modules() if isinstance(module, ADAPTABLE_LAYERS)]
    missing = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in layers)]
    if missing:
        valid = ", ".join(adaptable_module_names(model)[:SUGGESTED_TARGETS])
        raise PipelineError(
            f"{config_key}: {', '.join(missing)} match(es) no linear or convolution layer of the "
            f"{type(model).__name__}; valid names include {valid}"
        )


def lora_config(section: LoraConfigSection, target_modules: list[str], **kwargs: Any) -> LoraConfig:
    return LoraConfig(
        r=section.rank,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        use_dora=section.use_dora,
        target_modules=target_modules,
        init_lora_weights="gaussian",  # as diffusers' LoRA scripts: A random, B zero, so training starts at the base model
        **kwargs,
    )


def add_lora_adapters(components: DiffusionComponents, section: LoraConfigSection) -> dict[str, torch.nn.Module]:
    """Add adapters to the UNet (and the text encoders); returns the adapted modules by diffusers' prefix.

    Every target name is checked before any adapter is added, so a typo fails before training starts.
    """
    modules: dict[str, torch.nn.Module] = {"unet": components.unet}
    if section.train_text_encoder:
        modules.update(zip(TEXT_ENCODER_NAMES, components.text_encoders))
    for name, module in modules.items():
        targets, key = (
            (section.target_modules, "lora.target_modules")
            if name == "unet"
            else (section.text_encoder_target_modules, "lora.text_encoder_target_modules")
        )
        check_target_modules(module, targets, key)
    components.unet.add_adapter(lora_config(section, section.target_modules))
    for index, encoder in enumerate(components.text_encoders if section.train_text_encoder else []):
        extra: dict[str, Any] = {}
        if components.family == "sdxl" and index == 0:
            # SDXL conditions on the penultimate hidden states of text_encoder (see `encode_prompts`): its last
            # layer never reaches the loss, so an adapter there would be dead weight and, without gradients,
            # would stop DDP ("Expected to have finished reduction") on several processes.
            extra = {"layers_to_transform": list(range(encoder.config.num_hidden_layers - 1)), "layers_pattern": "layers"}
        inject_adapter_in_model(lora_config(section, section.text_encoder_target_modules, **extra), encoder)
    # Frozen weights may be fp16/bf16 under mixed precision, but trained ones must be fp32: the grad scaler
    # refuses half-precision gradients ("Attempting to unscale FP16 gradients") and small updates would round away.
    cast_training_params(list(modules.values()), dtype=torch.float32)
    return modules


def trainable_parameters(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """`<prefix>.<parameter name>` -> parameter, for every adapter weight."""
    return {
        f"{prefix}.{name}": param
        for prefix, module in modules.items()
        for name, param in module.named_parameters()
        if param.requires_grad
    }


# ----------------------------------------------------------------------------------- optimizer


def make_optimizer(section: LoraConfigSection, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if section.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # only here: a slow import that probes for GPU kernels

        # bitsandbytes keeps 32-bit state for tensors under `min_8bit_size` elements (default 4096), which
        # silently covers most LoRA matrices (rank 16 x 320 channels = 5120, rank 4 x 320 = 1280) and every
        # DoRA magnitude vector; 1 puts every adapter tensor on 8-bit state.
        return bnb.optim.AdamW8bit(params, lr=section.learning_rate, weight_decay=section.weight_decay, min_8bit_size=1)
    return torch.optim.AdamW(params, lr=section.learning_rate, weight_decay=section.weight_decay)


def optimizer_state_bits(optimizer: torch.optim.Optimizer) -> Counter[int]:
    """How many parameters keep 8-bit and how many 32-bit Adam moments, e.g. `Counter({8: 64})`."""
    bits: Counter[int] = Counter()
    for state in optimizer.state.values():
        moments = [state[key] for key in ("state1", "state2", "exp_avg", "exp_avg_sq") if key in state]
        if moments:
            bits[max(m.element_size() for m in moments) * 8] += 1
    return bits


# --------------------------------------------------------------------------------------- export


def adapter_state_dict(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of `module` in peft's key format (the Step 1 embeddings stay out).

    Not passed through `convert_state_dict_to_diffusers` as the older diffusers scripts do: it renames only
    the attention projections (`to_q.lora_A` -> `to_q.lora.down`), so other targets (`proj_in`, `ff.net.2`)
    leave a file of mixed formats, and `load_lora_weights` then silently drops the renamed half.
    """
    layers = get_peft_model_state_dict(module, save_embedding_layers=False)
    if prefix == "unet":
        return layers
    # peft names a DoRA magnitude `<layer>.lora_magnitude_vector`, which transformers 5's `load_adapter` maps to no
    # parameter: the text encoder's magnitudes were silently re-initialised on loading. With the parameter's own
    # `.weight` suffix both transformers 5 and peft's loader (older transformers) find them.
    return {f"{key}.weight" if key.endswith("lora_magnitude_vector") else key: value for key, value in layers.items()}


def save_lora_weights(family: str, modules: dict[str, torch.nn.Module], out_dir: Path) -> Path:
    """`pytorch_lora_weights.safetensors` for `load_lora_weights`, with each adapter's config as metadata.

    Without the metadata, `load_lora_weights` assumes `alpha = rank` and a LoRA trained with another
    alpha reloads at the wrong scale.
    """
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    layers = {f"{prefix}_lora_layers": adapter_state_dict(prefix, module) for prefix, module in modules.items()}
    metadata = {f"{prefix}_lora_adapter_metadata": module.peft_config["default"].to_dict() for prefix, module in modules.items()}
    # diffusers writes in place; a temporary folder and a rename keep a crash from leaving half a file.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".lora-") as tmp:
        pipeline_class.save_lora_weights(tmp, **layers, **metadata, weight_name=LORA_WEIGHTS_FILE)
        os.replace(Path(tmp) / LORA_WEIGHTS_FILE, out_dir / LORA_WEIGHTS_FILE)
    return out_dir / LORA_WEIGHTS_FILE


def load_lora(pipe: DiffusionPipeline, lora_dir: Path, adapter_name: str = "default") -> None:
    """Load a Step 3 LoRA into `pipe` as `adapter_name`: what `pipe.load_lora_weights(lora_dir)` does.

    The UNet part goes through diffusers (`load_lora_into_unet`, peft underneath); the text encoders' parts through
    peft directly, with the adapter config saved as metadata, so that no transformers version gate applies.
    """
    state_dict, network_alphas, metadata = pipe.lora_state_dict(
        str(lora_dir), weight_name=LORA_WEIGHTS_FILE, return_lora_metadata=True
    )
    pipe.load_lora_into_unet(
        state_dict, network_alphas=network_alphas, unet=pipe.unet, adapter_name=adapter_name, metadata=metadata, _pipeline=pipe
    )
    def under(prefix: str, entries: dict[str, Any]) -> dict[str, Any]:
        return {key.removeprefix(f"{prefix}."): value for key, value in entries.items() if key.startswith(f"{prefix}.")}

    for prefix in TEXT_ENCODER_NAMES:
        layers = under(prefix, state_dict)
        if not layers:
            continue
        adapter_config = under(prefix, metadata or {})
        if not adapter_config:
            raise PipelineError(f"{lora_dir / LORA_WEIGHTS_FILE}: no adapter config for {prefix} in the file's metadata; re-run step3_lora")
        encoder = getattr(pipe, prefix)
        inject_adapter_in_model(LoraConfig(**adapter_config), encoder, adapter_name=adapter_name)
        result = set_peft_model_state_dict(encoder, layers, adapter_name=adapter_name)
        if result.unexpected_keys:
            raise PipelineError(
                f"{lora_dir / LORA_WEIGHTS_FILE}: {len(result.unexpected_keys)} {prefix} weights match no adapter layer "
                f"(e.g. {result.unexpected_keys[0]}); was it trained for another base model?"
            )


# ----------------------------------------------------------------------------------------- data


def caption_prompts(step2_dir: Path, rows: list[dict[str, Any]], tokens: dict[str, str]) -> dict[str, str]:
    """Image id -> Step 2 prompt for every training row; each prompt must use its class's Step 1 token."""
    path = step2_dir / CAPTIONS_FILE
    if not path.is_file():
        raise MissingStepOutputError(f"{path} is missing; run `python -m neu_det_pipeline.step2_captions` first")
    prompts = {caption["id"]: caption["prompt"] for caption in read_jsonl(path)}
    missing = [row["id"] for row in rows if row["id"] not in prompts]
    if missing:
        raise MissingStepOutputError(
            f"{path} has no prompt for {len(missing)} training image(s) (e.g. {missing[0]}); re-run step2_captions "
            "with the same config as step0_prepare"
        )
    for row in rows:
        token = tokens[row["class"]]
        if token not in prompts[row["id"]]:
            raise PipelineError(
                f"{path}: the prompt of {row['id']} lacks its class token {token} from Step 1; re-run step2_captions "
                "with the same textual_inversion.placeholder_format as step1_textual_inversion"
            )
    return {row["id"]: prompts[row["id"]] for row in rows}


def class_tokens(step1_dir: Path, classes: list[str]) -> dict[str, str]:
    """Class -> Step 1 token, from `token_map.json` (the embeddings are loaded by `load_learned_embeddings`)."""
    path = step1_dir / TOKEN_MAP_FILE
    if not path.is_file():
        raise MissingStepOutputError(f"{path} is missing; run `python -m neu_det_pipeline.step1_textual_inversion` first")
    token_map = read_json(path)
    missing = [name for name in classes if name not in token_map]
    if missing:
        raise MissingStepOutputError(f"{path} has no token for class(es) {', '.join(missing)}; re-run step1_textual_inversion")
    return {name: token_map[name]["token"] for name in classes}


# ------------------------------------------------------------------------------------- training


@dataclass
class LoraResult:
    losses: list[float]
    """Loss per optimizer step, from step 1 (a resumed run includes the steps before the checkpoint)."""
    resumed_from: str | None
    trainable_parameters: int
    optimizer_state_bits: dict[str, int]
    """`8-bit` / `32-bit` Adam moments -> number of adapter tensors (all `8-bit` with `adamw8bit`)."""
    weights_file: str | None = None
    """The saved LoRA; None on ranks other than 0."""
    validation_images: list[str] = field(default_factory=list)


class LoraTraining:
    """Everything one LoRA / DoRA run needs, built from the config; `run()` trains and saves."""

    def __init__(self, config: PipelineConfig, step0_dir: Path, step1_dir: Path, step2_dir: Path, out_dir: Path):
        section = config.lora
        self.config, self.section, self.out_dir = config, section, out_dir
        self.accelerator = make_accelerator(config)
        # Rank 0 prepares (possibly wipes) out_dir before `run`; no rank may read it before that is done.
        self.accelerator.wait_for_everyone()
        # Inputs first: a missing or inconsistent upstream output fails before any model loads.
        self.tokens = class_tokens(step1_dir, config.data.classes)
        rows = train_rows(step0_dir)
        prompts = caption_prompts(step2_dir, rows, self.tokens)
        self.components = components = load_components(config, weight_dtype(self.accelerator))
        load_learned_embeddings(inference_pipeline(components), step1_dir)
        components.freeze()  # the token rows were added as new, trainable embeddings
        # Validation renders each class with the prompt of its first training image.
        first_prompts: dict[str, str] = {}
        for row in rows:
            first_prompts.setdefault(row["class"], prompts[row["id"]])
        self.validation_prompts = {name: first_prompts[name] for name in config.data.classes if name in first_prompts}

        components.place(self.accelerator.device, weight_dtype(self.accelerator))  # adapters are cast to fp32 below
        torch.manual_seed(config.run.seed)  # adapter initialisation draws from the global RNG: same seed, same run
        self.modules = add_lora_adapters(components, section)
        if section.gradient_checkpointing:
            components.enable_gradient_checkpointing(text_encoders=section.train_text_encoder)
        self.parameters = trainable_parameters(self.modules)

        self.settings = TrainingSettings.from_section(section)
        dataset = DefectImageDataset(
            step0_dir, rows, section.resolution, lambda row, rng: prompts[row["id"]], seed=config.run.seed,
            hflip=section.hflip, vflip=section.vflip, rot90=section.rot90, box_areas=section.loss_weighting != "uniform",
        )
        self.dataloader = make_dataloader(dataset, self.settings, self.accelerator.num_processes, config.run.seed)
        self.optimizer = make_optimizer(section, list(self.parameters.values()))
        self.lr_scheduler = make_lr_scheduler(section.lr_scheduler, self.optimizer, section.lr_warmup_steps, section.max_train_steps)

    def task(self) -> TrainingTask:
        return TrainingTask(
            model=torch.nn.ModuleList(self.modules.values()),
            parameters=list(self.parameters.values()),
            trained_state=self.trained_state,
            load_trained_state=self.load_trained_state,
            validate=self.validate,
        )

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {name: param.detach() for name, param in self.parameters.items()}

    @torch.no_grad()
    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, param in self.parameters.items():
            param.copy_(state[name])

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """LoRA dropout off while rendering; the loop keeps the adapters in training mode otherwise."""
        modes = {module: module.training for module in self.modules.values()}
        for module in modes:
            module.eval()
        try:
            yield
        finally:
            for module, training in modes.items():
                module.train(training)

    def validate(self, step: int) -> Path:
        """One row per class, `num_validation_images` seeded images per row, adapters in eval mode."""
        with self._eval_mode():
            return save_validation_grid(
                self.components, self.accelerator, list(self.validation_prompts.values()), self.section,
                self.config.run.seed, self.out_dir, step,
            )

    def run(self, on_step: Callable[[int, float], None] = lambda step, loss: None) -> LoraResult:
        """Train (or resume) to `max_train_steps`; rank 0 then writes the LoRA weights and the losses."""
        trained = train(
            self.accelerator, self.components, self.task(), self.optimizer, self.lr_scheduler, self.dataloader,
            self.settings, self.out_dir, self.config.run.seed, on_step,
        )
        result = LoraResult(
            losses=trained.losses,
            resumed_from=trained.resumed_from,
            trainable_parameters=sum(param.numel() for param in self.parameters.values()),
            optimizer_state_bits={f"{bits}-bit": n for bits, n in sorted(optimizer_state_bits(self.optimizer).items())},
            validation_images=trained.validation_images,
        )
        if self.accelerator.is_main_process:
            result.weights_file = str(save_lora_weights(self.components.family, self.modules, self.out_dir))
            save_losses(trained.losses, self.out_dir, f"{'DoRA' if self.section.use_dora else 'LoRA'} training loss")
        self.accelerator.wait_for_everyone()
        return result
