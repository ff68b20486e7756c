"""`captions.prompt_style: llava`: LLaVA-1.5 structured descriptions (tiny LLaVA), cleaning, CLIP-length fitting, cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from neu_det_pipeline.captions.clip_tokens import CLIP_CONTEXT_LENGTH, clip_tokenizer
from neu_det_pipeline.captions.descriptions import (
    CACHE_DIR_NAME,
    CachedDescriber,
    PromptFitter,
    description_phrases,
)
from neu_det_pipeline.captions.llava import LlavaDescriber, llava_identity
from neu_det_pipeline.io import read_jsonl
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step2_captions import STEP
from neu_det_pipeline.testing.tiny_builders import LLAVA_IMAGE_SIZE

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models on a shared CPU

TOKEN = "<neu-crazing>"


class AnswersNothing:
    """A describer that fails the test when asked: only cached answers may be used."""

    def __init__(self, name: str, identity: dict) -> None:
        self.name, self.identity = name, identity

    def describe(self, paths: list[Path]) -> list:
        raise AssertionError(f"the captioner was asked about {len(paths)} images")

BASE = f"a grayscale photo of {TOKEN} on a steel strip"


def test_an_answer_becomes_lower_case_phrases_without_labels_or_list_markers() -> None:
    answer = (
        "1. Texture: Rough, granular.\n"
        "2. Shape: irregular network of fine lines; elongated\n"
        "- Visual characteristics: dark gray spots on a lighter background, rough"
    )
    assert description_phrases(answer) == [
        "rough", "granular", "irregular network of fine lines", "elongated", "dark gray spots on a lighter background",
    ]  # fmt: skip
    assert description_phrases("") == []


def test_phrases_are_added_while_the_prompt_fits_clips_77_tokens_with_the_class_token_as_one() -> None:
    fitter = PromptFitter([TOKEN])
    too_long = " ".join(["very"] * 80)
    phrases = [f"fine crack network {i}" for i in range(30)]
    prompt = fitter.fit(BASE, [phrases[0], too_long, *phrases[1:]])

    tokenizer = clip_tokenizer([TOKEN])
    length = len(tokenizer(prompt).input_ids)
    assert prompt.startswith(f"{BASE}, {phrases[0]}, {phrases[1]}") and too_long not in prompt
    kept = prompt.removeprefix(f"{BASE}, ").split(", ")
    assert kept == phrases[: len(kept)]  # in order, the over-long phrase left out
    # Full: the next phrase would not fit. Without the added token, `<neu-crazing>` would be 7 tokens, not one.
    assert length <= CLIP_CONTEXT_LENGTH < len(tokenizer(f"{prompt}, {phrases[len(kept)]}").input_ids)
    assert len(clip_tokenizer()(prompt).input_ids) > length


@pytest.fixture(scope="module")
def llava(tiny_models_dir: Path) -> LlavaDescriber:
    return LlavaDescriber.from_pretrained(str(tiny_models_dir / "llava"), torch.device("cpu"), torch.float32, "Describe it.", 6)


def test_llava_is_asked_through_its_chat_template_and_only_new_tokens_are_decoded(llava: LlavaDescriber, tmp_path: Path) -> None:
    from PIL import Image

    assert llava.prompt() == "USER: <image>\nDescribe it. ASSISTANT:"
    path = tmp_path / "image.png"
    Image.new("RGB", (64, 64), (120, 120, 120)).save(path)
    inputs = llava.processor(images=[Image.open(path)], text=[llava.prompt()], return_tensors="pt")
    image_tokens = (inputs["input_ids"] == llava.model.config.image_token_index).sum().item()
    assert image_tokens == (LLAVA_IMAGE_SIZE // 14) ** 2  # patches without CLS (`default` strategy)
    [first], [again] = llava.describe([path]), llava.describe([path])
    assert first == again and "ASSISTANT" not in first.text and first.error is None


def test_step2_llava_prompts_fit_clip_and_a_rerun_asks_nothing(
    make_config, step0_sample_dir: Path, tmp_path: Path, tiny_models_dir: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(step0_sample_dir / "step0_prepare", out / "step0_prepare")
    overrides = [
        "captions.prompt_style=llava", f"models.llava={tiny_models_dir / 'llava'}", "captions.description_max_new_tokens=8",
        "captions.batch_size=64",
    ]  # fmt: skip
    config = make_config(*overrides, output_dir=out)
    summary = run_step(STEP, config)

    rows = read_jsonl(out / STEP.name / "captions.jsonl")
    assert summary["descriptions"]["asked_now"] == len(rows) == summary["train_images"]
    assert summary["models"]["llava"] == str(tiny_models_dir / "llava") and summary["prompt_tokens"]["prompts_cut"] == 0
    fitter = PromptFitter({row["token"] for row in rows})
    for row in rows:
        base = f"a grayscale photo of {row['token']} on a steel strip"
        assert isinstance(row["description"], str) and row["description_error"] is None
        assert row["prompt"] == fitter.fit(base, description_phrases(row["description"]))
    assert sum(row["prompt"] != f"a grayscale photo of {row['token']} on a steel strip" for row in rows) > len(rows) / 2

    # The same captioner and instruction later (another config, another run): every answer from the cache.
    cached = CachedDescriber(AnswersNothing(LlavaDescriber.name, llava_identity(config.models.llava, config.captions.description_instruction, 8)), out / CACHE_DIR_NAME)
    paths = [out / "step0_prepare" / row["image"] for row in read_jsonl(out / "step0_prepare" / "manifest.jsonl") if row["split"] == "train"]
    assert [found.text for found in cached.describe(sorted(paths))] == [row["description"] for row in rows]
    assert cached.asked == 0


def test_doctor_knows_the_llava_captioner() -> None:
    from neu_det_pipeline.config import load_config
    from neu_det_pipeline.doctor import PARAMETERS_M, memory_estimates, model_needs

    base = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"
    llava, blip2 = (load_config(base, [f"captions.prompt_style={style}"]) for style in ("llava", "blip2"))
    needs = {need.key: need for need in model_needs(llava)}
    assert needs["models.llava"].model_id == "llava-hf/llava-1.5-7b-hf" and needs["models.llava"].steps == ["step2_captions"]
    assert "models.llava" not in {need.key for need in model_needs(blip2)}
    extra_gib = (PARAMETERS_M["llava"] - PARAMETERS_M["blip2"]) * 1e6 * 2 / 2**30  # half precision
    step2 = {name: memory_estimates(config)["step2_captions"] for name, config in (("llava", llava), ("blip2", blip2))}
    assert step2["llava"] - step2["blip2"] == pytest.approx(extra_gib)
