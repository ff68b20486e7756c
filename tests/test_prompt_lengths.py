"""Prompts against CLIP's 77-token context: counted with the real tokenizer, cut prompts reported, defaults fit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from neu_det_pipeline.captions.clip_tokens import CLIP_CONTEXT_LENGTH, check_prompt_lengths, clip_tokenizer
from neu_det_pipeline.captions.prompts import build_prompt, keyword_candidates
from neu_det_pipeline.config import load_config
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step2_captions import STEP as STEP2

REPO = Path(__file__).resolve().parents[1]
TOKEN = "<neu-rolled-in_scale>"


def words(count: int) -> str:
    return " ".join(["steel"] * count)  # one CLIP token each


def test_the_limit_counts_start_and_end_tokens() -> None:
    fits, cut = words(CLIP_CONTEXT_LENGTH - 2), words(CLIP_CONTEXT_LENGTH - 1)
    lengths = check_prompt_lengths([fits, cut, fits])
    assert (lengths.checked, lengths.longest, lengths.cut) == (2, CLIP_CONTEXT_LENGTH + 1, [(cut, CLIP_CONTEXT_LENGTH + 1)])


def test_a_too_long_prompt_is_reported_with_its_count() -> None:
    long_prompts = [f"a photo of {TOKEN}, {words(80 + i)}" for i in range(5)]
    lengths = check_prompt_lengths(["a photo of steel", *long_prompts], [TOKEN])
    summary = lengths.summary()
    assert summary["prompts_checked"] == 6 and summary["prompts_cut"] == 5
    assert [example["tokens"] for example in summary["cut_examples"]] == [87, 88, 89]  # the first three, in order
    warning = lengths.warning("prompts")
    assert warning is not None and warning.startswith("5 of 6 prompts exceed CLIP's 77 tokens") and "\n" not in warning
    assert check_prompt_lengths(["a photo of steel"]).warning("prompts") is None


def test_a_step1_token_counts_as_one_token() -> None:
    prompt = f"a photo of {TOKEN}"
    assert check_prompt_lengths([prompt]).longest > 6  # unknown to CLIP: several pieces
    assert check_prompt_lengths([prompt], [TOKEN]).longest == 6  # start, a, photo, of, token, end
    assert len(clip_tokenizer([TOKEN])) == 49409


def test_default_prompts_fit() -> None:
    """The longest prompt each Step 2 style can make from base.yaml, and Step 4's template and negative prompt."""
    config = load_config(REPO / "configs" / "base.yaml")
    captions, tokens = config.captions, config.textual_inversion.tokens(config.data.classes)
    # BLIP-2 stops after `blip2_max_new_tokens` OPT tokens; English words are about one token in either BPE.
    caption = " ".join(" ".join(["a close up of a metal surface with scratches"] * 4).split()[: captions.blip2_max_new_tokens])
    tokenizer = clip_tokenizer()
    prompts = []
    for name, token in tokens.items():
        longest = sorted(keyword_candidates(captions, name), key=lambda keyword: -len(tokenizer(keyword).input_ids))
        prompts += [build_prompt(style, captions.template, token, longest[: captions.top_k], caption) for style in ("plain", "keywords", "blip2")]
    prompts += [config.generation.prompt_template.format(token=token) for token in tokens.values()]
    prompts.append(config.generation.negative_prompt)
    lengths = check_prompt_lengths(prompts, tokens.values())
    assert lengths.cut == [] and lengths.longest <= CLIP_CONTEXT_LENGTH


def test_step2_says_which_prompts_are_cut(
    make_config, step0_sample_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(step0_sample_dir / "step0_prepare", out / "step0_prepare")
    long_template = f"'a photo of {{token}} on {words(75)}'"
    summary = run_step(STEP2, make_config("captions.prompt_style=plain", f"captions.template={long_template}", output_dir=out))
    classes = len(summary["class_counts"])
    lengths = summary["prompt_tokens"]
    assert lengths["prompts_checked"] == classes and lengths["prompts_cut"] == classes  # plain: one prompt per class
    assert lengths["longest_prompt_tokens"] == 1 + 3 + 1 + 1 + 75 + 1  # start, "a photo of", token, "on", words, end
    assert f"{classes} of {classes} prompts exceed CLIP's 77 tokens" in " ".join(capsys.readouterr().err.split())  # one console line
