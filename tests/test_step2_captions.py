"""Step 2: keyword ranking (hand-built and tiny real scorers), ensembles, BLIP-2 prompts, outputs, resume, errors."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMOKE_CONFIG, smoke_overrides
from PIL import Image

from neu_det_pipeline.captions import (
    CaptionAnnotator,
    EnsembleRanker,
    ResultCache,
    build_prompt,
    ensemble_scores,
    zscore,
)
from neu_det_pipeline.errors import ConfigError, PipelineError
from neu_det_pipeline.io import link_or_copy, read_json, read_jsonl
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step2_captions import PARTIAL_RESULTS_FILE, STEP

TOKEN = "<neu-scratches>"


class LookupScorer:
    """A hand-built encoder: images embed as their mean RGB, texts as fixed vectors."""

    def __init__(self, name: str, text_vectors: dict[str, Sequence[float]]) -> None:
        self.name = name
        self.text_vectors = text_vectors
        self.encoded_texts: list[str] = []

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([torch.tensor(image.getpixel((0, 0)), dtype=torch.float32) for image in images])

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        self.encoded_texts += texts
        return torch.tensor([self.text_vectors[text] for text in texts], dtype=torch.float32)


def solid(rgb: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (8, 8), rgb)


# ----------------------------------------------------------------------------------------- ranking


def test_ranker_keeps_the_top_k_keywords_of_a_hand_built_scorer() -> None:
    scorer = LookupScorer("rgb", {"red": [1, 0, 0], "green": [0, 1, 0], "blue": [0, 0, 1], "purple": [1, 0, 1]})
    ranker = EnsembleRanker([scorer])
    embeddings = ranker.embed_images([solid((255, 0, 0)), solid((0, 0, 200)), solid((0, 90, 0))])
    keywords = ["green", "blue", "purple", "red"]
    red, blue, green = ranker.rank(embeddings, [keywords, ["red", "blue", "purple"], keywords])

    assert red.top(2) == ["red", "purple"]
    assert blue.top(1) == ["blue"]
    assert green.top(1) == ["green"]
    assert red.cosines["rgb"][3] == pytest.approx(1.0) and red.cosines["rgb"][2] == pytest.approx(1 / math.sqrt(2))
    assert scorer.encoded_texts == [*keywords, "red", "blue", "purple"], "a keyword set is encoded once, then cached"


def test_zscore_removes_each_models_offset_and_scale() -> None:
    cosines = torch.tensor([[0.30, 0.20, 0.10], [0.25, 0.25, 0.25]])
    expected = torch.tensor([[math.sqrt(1.5), 0.0, -math.sqrt(1.5)], [0.0, 0.0, 0.0]])  # ties: all zero
    torch.testing.assert_close(zscore(cosines), expected)
    torch.testing.assert_close(zscore(cosines * 7 + 3), expected)


def test_ensemble_averages_normalised_scores_of_differently_scaled_models() -> None:
    # Four dimensions, texts on the first three axes: an image vector (c, rest) has cosine c with each text.
    axes = {"a": [1, 0, 0, 0], "b": [0, 1, 0, 0], "c": [0, 0, 1, 0]}

    def with_cosines(*cos: float) -> list[float]:
        return [*cos, math.sqrt(1 - sum(c * c for c in cos))]

    narrow = LookupScorer("narrow", axes)  # cosines 0.30 0.20 0.10: favours a
    wide = LookupScorer("wide", axes)  # cosines 0.00 0.90 0.30: favours b, by more standard deviations
    narrow.encode_images = lambda images: torch.tensor([with_cosines(0.30, 0.20, 0.10)])
    wide.encode_images = lambda images: torch.tensor([with_cosines(0.00, 0.90, 0.30)])
    ranker = EnsembleRanker([narrow, wide])
    (ranking,) = ranker.rank(ranker.embed_images([solid((0, 0, 0))]), [["a", "b", "c"]])

    z_narrow = [math.sqrt(1.5), 0.0, -math.sqrt(1.5)]
    z_wide = [-0.4 / math.sqrt(0.14), 0.5 / math.sqrt(0.14), -0.1 / math.sqrt(0.14)]
    assert ranking.scores == pytest.approx([(n + w) / 2 for n, w in zip(z_narrow, z_wide)], abs=1e-5)
    assert ranking.cosines == {"narrow": pytest.approx((0.3, 0.2, 0.1)), "wide": pytest.approx((0.0, 0.9, 0.3))}
    assert ranking.top(3) == ["b", "a", "c"]
    torch.testing.assert_close(
        ensemble_scores([torch.tensor([[0.3, 0.2, 0.1]]), torch.tensor([[0.0, 0.9, 0.3]])]), torch.tensor([ranking.scores])
    )


# ----------------------------------------------------------------------------------------- prompts


def test_prompt_styles() -> None:
    template = "a grayscale photo of {token} on a steel strip"
    keywords = ["scratches", "grayscale", "metal surface"]
    base = f"a grayscale photo of {TOKEN} on a steel strip"
    assert build_prompt("plain", template, TOKEN, keywords, "a caption") == base
    # `grayscale` is already in the template; `scratches` is only inside the token, so it is added.
    assert build_prompt("keywords", template, TOKEN, keywords) == f"{base}, scratches, metal surface"
    assert build_prompt("blip2", template, TOKEN, keywords, "lines") == f"{base}, lines, scratches, metal surface"
    assert build_prompt("blip2", "{token}", TOKEN, keywords, "") == f"{TOKEN}, scratches, grayscale, metal surface"


# ---------------------------------------------------------------------------------- files and cache


def test_result_cache_drops_a_partially_written_batch(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path / "rows.jsonl")
    cache.append([{"id": "a", "v": 1}, {"id": "b", "v": 2}])
    with cache.path.open("a") as handle:
        handle.write('{"id": "c", "v"')  # a crash in the middle of the next batch
    assert cache.load() == {"a": {"id": "a", "v": 1}, "b": {"id": "b", "v": 2}}
    cache.append([{"id": "c", "v": 3}])
    assert list(ResultCache(cache.path).load()) == ["a", "b", "c"]


def test_link_or_copy_falls_back_to_a_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "a.png"
    source.write_bytes(b"png")
    link_or_copy(source, tmp_path / "linked" / "a.png")
    assert (tmp_path / "linked" / "a.png").stat().st_ino == source.stat().st_ino

    def no_links(*args: object) -> None:
        raise OSError("cross-device link")

    monkeypatch.setattr("os.link", no_links)
    link_or_copy(source, tmp_path / "copied" / "a.png")
    assert (tmp_path / "copied" / "a.png").read_bytes() == b"png"


# ------------------------------------------------------------------------------ the step, tiny models


def run_captions(make_config, step0_sample_dir: Path, out: Path, *overrides: str) -> dict:
    shutil.copytree(step0_sample_dir / "step0_prepare", out / "step0_prepare")
    return run_step(STEP, make_config(*overrides, output_dir=out))


def check_outputs(out: Path) -> list[dict]:
    """Every Step 0 training image once, with the class token in its prompt and an existing imagefolder file."""
    step_dir = out / STEP.name
    manifest = read_jsonl(out / "step0_prepare" / "manifest.jsonl")
    rows = read_jsonl(step_dir / "captions.jsonl")
    assert [row["id"] for row in rows] == sorted(row["id"] for row in manifest if row["split"] == "train")
    metadata = read_jsonl(step_dir / "train" / "metadata.jsonl")
    assert [row["text"] for row in metadata] == [row["prompt"] for row in rows]
    variants = read_json(step_dir / "summary.json")["best_variants"]
    for row, entry in zip(rows, metadata):
        assert row["token"] == f"<neu-{row['class']}>" and row["token"] in row["prompt"]
        assert (step_dir / "train" / entry["file_name"]).is_file()
        assert step_dir / row["image"] == step_dir / "train" / entry["file_name"]
        assert len(row["keywords"]) == 3 and row["best_variant"] in variants
    assert not (step_dir / PARTIAL_RESULTS_FILE).exists()
    return rows


def test_keyword_prompts_are_valid_deterministic_and_resume_after_an_interruption(
    make_config, step0_sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = ("captions.prompt_style=keywords", "captions.batch_size=8")
    run_captions(make_config, step0_sample_dir, tmp_path / "fresh", *overrides)
    rows = check_outputs(tmp_path / "fresh")
    for row in rows:
        scores = row["keyword_scores"]["ensemble"]
        assert row["keywords"] == sorted(scores, key=lambda kw: -scores[kw])[:3]
        assert all(keyword in row["prompt"] for keyword in row["keywords"])

    # Interrupt the second run after two batches, then run it again: it continues and ends with the same files.
    annotate, calls = CaptionAnnotator.annotate, []

    def interrupted(self: CaptionAnnotator, batch):  # noqa: ANN001, ANN202
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return annotate(self, batch)

    monkeypatch.setattr(CaptionAnnotator, "annotate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_captions(make_config, step0_sample_dir, tmp_path / "resumed", *overrides)
    monkeypatch.setattr(CaptionAnnotator, "annotate", annotate)
    summary = run_step(STEP, make_config(*overrides, output_dir=tmp_path / "resumed"))

    assert summary["resumed"] and summary["images_from_cache"] == 16
    assert summary["images_captioned"] == summary["train_images"] - 16
    for name in ("captions.jsonl", "train/metadata.jsonl"):
        fresh, resumed = (tmp_path / run / STEP.name / name for run in ("fresh", "resumed"))
        assert fresh.read_bytes() == resumed.read_bytes(), name


def test_blip2_prompts_with_a_clip_and_open_clip_ensemble(make_config, step0_sample_dir: Path, tmp_path: Path) -> None:
    overrides = ("captions.prompt_style=blip2", "captions.ranking_backends=[clip, open_clip]")
    summary = run_captions(make_config, step0_sample_dir, tmp_path / "out", *overrides)
    rows = check_outputs(tmp_path / "out")
    assert summary["ranking_backends"] == ["clip", "open_clip"]
    assert set(summary["models"]) == {"clip", "open_clip", "blip2"}
    # The tiny random BLIP-2 writes gibberish, and for a few images nothing but special tokens.
    assert sum(bool(row["blip2_caption"]) for row in rows) > len(rows) / 2
    for row in rows:
        base = f"a grayscale photo of {row['token']} on a steel strip, "
        assert row["prompt"].startswith(base + row["blip2_caption"]) and ", ," not in row["prompt"]
        cosines = row["keyword_scores"]["cosine"]
        assert set(cosines) == {"clip", "open_clip"} and cosines["clip"] != cosines["open_clip"]


# ----------------------------------------------------------------------------------------- errors


def test_a_missing_model_folder_names_its_config_key(make_config, tmp_path: Path) -> None:
    missing_clip = r"^models\.clip: model folder .*missing-clip does not exist; set models\.clip="
    with pytest.raises(PipelineError, match=missing_clip) as error:
        CaptionAnnotator.from_config(make_config(f"models.clip={tmp_path / 'missing-clip'}"))
    assert "\n" not in str(error.value)
    with pytest.raises(PipelineError, match=r"^models\.blip2: model folder"):
        CaptionAnnotator.from_config(make_config("captions.prompt_style=blip2", f"models.blip2={tmp_path / 'nope'}"))
    with pytest.raises(ConfigError, match=r"models\.open_clip='ViT-H-14' must be `hf-hub:org/repo` or `local-dir:"):
        CaptionAnnotator.from_config(make_config("captions.ranking_backends=[open_clip]", "models.open_clip=ViT-H-14"))


def test_templates_without_their_placeholder_are_rejected(make_config) -> None:
    with pytest.raises(ConfigError, match=r"captions\.template='a photo of steel' must contain \{token\}"):
        CaptionAnnotator.from_config(make_config("captions.template=a photo of steel"))
    with pytest.raises(ConfigError, match=r"captions\.prompt_variants\[1\]"):
        CaptionAnnotator.from_config(make_config("captions.prompt_variants=['{prompt}', '{prompt} {style}']"))


def test_missing_step0_output_exits_with_one_error_line(tiny_models_dir: Path, tmp_path: Path) -> None:
    # tiny_models_dir=null: the models exist already, and the error comes before any is needed.
    overrides = [*smoke_overrides(tiny_models_dir, tmp_path / "out"), "run.tiny_models_dir=null"]
    result = subprocess.run(
        [sys.executable, "-m", "neu_det_pipeline.step2_captions", "--config", str(SMOKE_CONFIG), *overrides],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "step2_captions needs the outputs of step0_prepare" in lines[0], result.stderr
    assert "python -m neu_det_pipeline.step0_prepare" in lines[0]
