"""Textual inversion: one new token per defect class, and only its embedding row learns.

The token is added to every tokenizer / text encoder pair (one for SD 1.5, two for SDXL, both trained)
and starts from the embedding of a configured word. Gradients reach every embedding row a prompt uses,
so they are masked to the placeholder rows; AdamW's weight decay still moves every row, so after each
optimizer step all other rows are restored from a copy taken before training.

Learned rows are saved in the diffusers format (`{token: (1, dim) tensor}`, safetensors), one file per
class and text encoder, named like diffusers' SDXL textual inversion example (`learned_embeds` for
`text_encoder`, `learned_embeds_2` for `text_encoder_2`)::

    pipe.load_textual_inversion(f"{step1}/learned_embeds-crazing.safetensors", token="<neu-crazing>")
    pipe.load_textual_inversion(f"{step1}/learned_embeds_2-crazing.safetensors", token="<neu-crazing>",
                                text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)  # SDXL only

or all classes at once with :func:`load_learned_embeddings` (reads `token_map.json`), which also makes the text
encoders pool at EOS (:func:`~neu_det_pipeline.training.diffusion.pool_at_eos`): with the hub's configs an SDXL
pipeline's pooled prompt embedding would otherwise be read at the class token.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save as safetensors_bytes
from transformers import CLIPTokenizer, PreTrainedModel

from neu_det_pipeline.artifacts import TOKEN_MAP_FILE, train_rows
from neu_det_pipeline.config import PipelineConfig, TextualInversionConfig
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.io import atomic_write_bytes, read_json, write_json
from neu_det_pipeline.training.data import DefectImageDataset, PromptFn
from neu_det_pipeline.training.diffusion import load_components, pool_at_eos
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

# Pipeline attribute names of the text encoders / tokenizers, in `DiffusionComponents` order.
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
TOKENIZER_NAMES = ("tokenizer", "tokenizer_2")
# Embedding file stem per text encoder, as in diffusers' textual_inversion_sdxl.py.
EMBEDDING_STEMS = ("learned_embeds", "learned_embeds_2")


@dataclass
class PlaceholderRows:
    """The placeholder rows of one text encoder's token embedding, and the frozen copy of every row."""

    text_encoder: PreTrainedModel
    token_ids: torch.Tensor
    frozen: torch.Tensor
    """The whole embedding matrix as it was before training (same device)."""

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.text_encoder.get_input_embeddings().weight

    def learned(self) -> torch.Tensor:
        """The placeholder rows, (num tokens, dim)."""
        return self.weight.detach()[self.token_ids]

    @torch.no_grad()
    def load(self, rows: torch.Tensor) -> None:
        self.weight[self.token_ids] = rows.to(self.weight)

    @torch.no_grad()
    def restore_frozen_rows(self) -> None:
        # One contiguous copy of the whole matrix is cheaper than a masked assignment of all other rows.
        learned = self.learned().clone()
        self.weight.copy_(self.frozen)
        self.weight[self.token_ids] = learned


def initializer_words(section: TextualInversionConfig, classes: list[str]) -> dict[str, str]:
    """Class -> initializer word, failing with one line when a class has none."""
    missing = [name for name in classes if name not in section.initializer_words]
    if missing:
        raise PipelineError(
            f"textual_inversion.initializer_words has no word for class(es) {', '.join(missing)}; "
            f"add e.g. textual_inversion.initializer_words.{missing[0]}=defect"
        )
    return {name: section.initializer_words[name] for name in classes}


def add_placeholder_tokens(
    tokenizer: CLIPTokenizer, text_encoder: PreTrainedModel, tokens: dict[str, str], words: dict[str, str]
) -> PlaceholderRows:
    """Add one token per class (`tokens`: class -> token), each initialised from its class's word in `words`.

    Call it with the text encoder already on its training device: the frozen copy is kept next to it.
    """
    vocab = tokenizer.get_vocab()
    for token in tokens.values():
        # CLIP spells whole words `word</w>`, so a known word is not a vocab key but tokenizes to one piece.
        if token in vocab or len(tokenizer.tokenize(token)) == 1:
            raise PipelineError(
                f"placeholder token {token!r} already exists in the tokenizer vocabulary; set "
                "textual_inversion.placeholder_format to a new string such as <neu-{cls}>"
            )
    init_ids: dict[str, list[int]] = {}
    for name, word in words.items():
        init_ids[name] = tokenizer.encode(word, add_special_tokens=False)
        if not init_ids[name]:
            raise PipelineError(f"textual_inversion.initializer_words.{name}={word!r} has no tokens; use a real word")
    tokenizer.add_tokens(list(tokens.values()))
    token_ids = tokenizer.convert_tokens_to_ids(list(tokens.values()))
    # mean_resizing would estimate a covariance over the whole vocabulary for rows we overwrite anyway.
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for name, token_id in zip(tokens, token_ids):
            weight[token_id] = weight[init_ids[name]].mean(dim=0)  # multi-token words: the average
    weight.requires_grad_(True)
    ids = torch.tensor(token_ids, device=weight.device)
    # Only the placeholder rows keep a gradient: clipping and Adam's moments must not see the prompt's other words.
    mask = torch.zeros(weight.shape[0], 1, device=weight.device, dtype=weight.dtype)
    mask[ids] = 1
    weight.register_hook(lambda grad: grad * mask)
    return PlaceholderRows(text_encoder=text_encoder, token_ids=ids, frozen=weight.detach().clone())


def template_prompts(templates: list[str], tokens: dict[str, str]) -> PromptFn:
    """A training prompt for a Step 0 row: a random template filled with its class's token."""

    def prompt(row: dict[str, Any], rng: random.Random) -> str:
        return rng.choice(templates).format(token=tokens[row["class"]])

    return prompt


def save_learned_embeddings(
    out_dir: Path, rows: list[PlaceholderRows], tokens: dict[str, str]
) -> dict[str, dict[str, str]]:
    """One `{token: (1, dim)}` safetensors file per class and text encoder; class -> {encoder name: file}."""
    files: dict[str, dict[str, str]] = {name: {} for name in tokens}
    for encoder_name, stem, encoder_rows in zip(TEXT_ENCODER_NAMES, EMBEDDING_STEMS, rows):
        learned = encoder_rows.learned().float().cpu()
        for (name, token), row in zip(tokens.items(), learned):
            file_name = f"{stem}-{name}.safetensors"
            atomic_write_bytes(out_dir / file_name, safetensors_bytes({token: row[None].contiguous()}))
            files[name][encoder_name] = file_name
    return files


def load_learned_embeddings(pipe: DiffusionPipeline, step1_dir: Path) -> dict[str, str]:
    """Load every class token of a Step 1 run into `pipe` (SD 1.5 or SDXL, ControlNet or not); class -> token.

    The pipeline's text encoders then pool at EOS (:func:`pool_at_eos`): with the hub's configs they would pool
    at the new, highest token ids, and SDXL's pooled prompt embedding would stop at the class token.
    """
    token_map = read_json(Path(step1_dir) / TOKEN_MAP_FILE)
    for entry in token_map.values():
        for encoder_name, file_name in entry["files"].items():
            tokenizer_name = TOKENIZER_NAMES[TEXT_ENCODER_NAMES.index(encoder_name)]
            pipe.load_textual_inversion(
                str(Path(step1_dir) / file_name), token=entry["token"],
                text_encoder=getattr(pipe, encoder_name), tokenizer=getattr(pipe, tokenizer_name),
            )
    for encoder_name, tokenizer_name in zip(TEXT_ENCODER_NAMES, TOKENIZER_NAMES):
        if getattr(pipe, encoder_name, None) is not None:
            pool_at_eos(getattr(pipe, tokenizer_name), getattr(pipe, encoder_name))
    return {name: entry["token"] for name, entry in token_map.items()}


@dataclass
class TextualInversionResult:
    losses: list[float]
    """Loss per optimizer step, from step 1 (a resumed run includes the steps before the checkpoint)."""
    resumed_from: str | None
    processes: int
    """Data-parallel processes that trained."""
    tokens: dict[str, str]
    """Class -> placeholder token."""
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    """Class -> {text encoder name: embedding file}; empty on ranks other than 0."""
    validation_images: list[str] = field(default_factory=list)


class TextualInversion:
    """Everything one textual inversion run needs, built from the config; `run()` trains and saves."""

    def __init__(self, config: PipelineConfig, step0_dir: Path, out_dir: Path):
        section = config.textual_inversion
        self.config, self.section, self.out_dir = config, section, out_dir
        self.tokens = section.tokens(config.data.classes)
        words = initializer_words(section, config.data.classes)
        self.accelerator = make_accelerator(config)
        if self.accelerator.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
        # Under the recipe, rank 0 prepares (possibly wipes) out_dir first; no rank may read it before that.
        self.accelerator.wait_for_everyone()
        self.components = load_components(config, weight_dtype(self.accelerator), text_encoder_dtype=torch.float32)
        # The text encoders hold the trained (fp32) rows; accelerate's autocast runs them in half precision.
        self.components.place(self.accelerator.device, weight_dtype(self.accelerator), text_encoder_dtype=torch.float32)
        self.rows = [
            add_placeholder_tokens(tokenizer, encoder, self.tokens, words)
            for tokenizer, encoder in zip(self.components.tokenizers, self.components.text_encoders)
        ]
        if section.gradient_checkpointing:
            self.components.enable_gradient_checkpointing(text_encoders=True)
        self.settings = TrainingSettings.from_section(section)
        dataset = DefectImageDataset(
            step0_dir, train_rows(step0_dir), section.resolution, template_prompts(section.templates, self.tokens),
            seed=config.run.seed, box_areas=section.loss_weighting != "uniform",
        )
        self.dataloader = make_dataloader(dataset, self.settings, self.accelerator.num_processes, config.run.seed)
        self.optimizer = torch.optim.AdamW(
            [rows.weight for rows in self.rows], lr=section.learning_rate, weight_decay=section.weight_decay
        )
        self.lr_scheduler = make_lr_scheduler(
            section.lr_scheduler, self.optimizer, section.lr_warmup_steps, section.max_train_steps
        )

    def task(self) -> TrainingTask:
        return TrainingTask(
            model=torch.nn.ModuleList(self.components.text_encoders),
            parameters=[rows.weight for rows in self.rows],
            trained_state=self.trained_state,
            load_trained_state=self.load_trained_state,
            validate=self.validate,
            after_optimizer_step=self.restore_frozen_rows,
        )

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The placeholder rows of each text encoder: all a checkpoint needs."""
        return {name: rows.learned() for name, rows in zip(TEXT_ENCODER_NAMES, self.rows)}

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, rows in zip(TEXT_ENCODER_NAMES, self.rows):
            rows.load(state[name])

    def restore_frozen_rows(self) -> None:
        for rows in self.rows:
            rows.restore_frozen_rows()

    def validate(self, step: int) -> Path:
        """One row per class token (first template), `num_validation_images` seeded images per row."""
        prompts = [self.section.templates[0].format(token=token) for token in self.tokens.values()]
        return save_validation_grid(
            self.components, self.accelerator, prompts, self.section, self.config.run.seed, self.out_dir, step
        )

    def run(self, on_step: Callable[[int, float], None] = lambda step, loss: None) -> TextualInversionResult:
        """Train (or resume) to `max_train_steps`; rank 0 then writes embeddings, token map and losses."""
        trained = train(
            self.accelerator, self.components, self.task(), self.optimizer, self.lr_scheduler, self.dataloader,
            self.settings, self.out_dir, self.config.run.seed, on_step,
        )
        result = TextualInversionResult(
            losses=trained.losses, resumed_from=trained.resumed_from, processes=self.accelerator.num_processes,
            tokens=self.tokens, validation_images=trained.validation_images,
        )
        if self.accelerator.is_main_process:
            result.files = save_learned_embeddings(self.out_dir, self.rows, self.tokens)
            write_json(self.out_dir / TOKEN_MAP_FILE, {
                name: {"token": token, "files": result.files[name]} for name, token in self.tokens.items()
            })
            save_losses(trained.losses, self.out_dir, "textual inversion training loss")
        self.accelerator.wait_for_everyone()
        return result
