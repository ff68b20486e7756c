"""The offline tiny-model harness: every model builds, reloads through the real loading API and runs."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import open_clip
import pytest
import torch
import transformers
from diffusers import (
    ControlNetModel,
    DiffusionPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForDepthEstimation,
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    DINOv3ViTBackbone,
    pipeline,
)

from neu_det_pipeline.captions.clip_tokens import CLIP_CONTEXT_LENGTH, clip_tokenizer
from neu_det_pipeline.testing import tiny_builders
from neu_det_pipeline.testing.make_tokenizer_assets import ASSETS_DIR, GPT2_TOKENIZER, write_tokenizer_assets
from neu_det_pipeline.testing.tiny_builders import (
    DERIVED_CONFIGS,
    METADATA_FIELDS,
    REAL_CONFIGS_DIR,
    SIZE_FIELDS,
    DerivedConfig,
)
from neu_det_pipeline.testing.tiny_models import TINY_MODEL_NAMES, build_tiny_models

PROMPT = "a grayscale photo of scratches on a hot-rolled steel strip surface"


@pytest.fixture(scope="module")
def models(tiny_models_dir: Path) -> dict[str, Path]:
    return {name: tiny_models_dir / name for name in TINY_MODEL_NAMES}


@pytest.fixture
def image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(48, 56, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def load_strict(load: Callable[..., tuple[Any, dict]], folder: Path) -> Any:
    """`load(folder, output_loading_info=True)`, failing on any missing or unexpected weight (which
    `from_pretrained` would otherwise only log, leaving random weights in place)."""
    model, info = load(folder, output_loading_info=True)
    assert not any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model


def quiet(pipe: DiffusionPipeline) -> DiffusionPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------- build


def test_every_model_is_built_in_hub_layout(models: dict[str, Path]) -> None:
    root = next(iter(models.values())).parent
    assert sorted(p.name for p in root.iterdir()) == sorted(TINY_MODEL_NAMES)  # no staging folders left
    marker = {"sd15": "model_index.json", "sd15-inpaint": "model_index.json", "sdxl": "model_index.json", "sdxl-inpaint": "model_index.json", "sd3": "model_index.json", "open_clip": "open_clip_config.json",
              "annotators": "table5_pidinet.pth"}  # controlnet_aux's file name in lllyasviel/Annotators
    for name, folder in models.items():
        assert (folder / marker.get(name, "config.json")).is_file(), name
        assert not list(folder.rglob("*.bin")), f"{name} should be saved as safetensors only"
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        # The CLIP text encoders hold the real 49408-id vocabulary (6 MB each at width 32).
        assert size < 32 * 2**20, f"{name} is {size / 2**20:.1f} MB"


def test_second_build_is_a_noop(tiny_models_dir: Path) -> None:
    stamps = {f: f.stat().st_mtime_ns for f in tiny_models_dir.rglob("*")}
    started = time.perf_counter()
    folders = build_tiny_models(tiny_models_dir)
    assert time.perf_counter() - started < 2.0  # a listing of files, not a model load (seconds even for tiny ones)
    assert folders == {name: tiny_models_dir / name for name in TINY_MODEL_NAMES}
    assert {f: f.stat().st_mtime_ns for f in tiny_models_dir.rglob("*")} == stamps


def test_same_seed_gives_identical_weights(tmp_path: Path) -> None:
    first = build_tiny_models(tmp_path / "first", seed=3)
    build_tiny_models(tmp_path / "second", seed=3)
    other_seed = build_tiny_models(tmp_path / "other", seed=4, only=["sd15"])
    weight_files = sorted(
        f.relative_to(tmp_path / "first") for pattern in ("*.safetensors", "*.pth") for f in (tmp_path / "first").rglob(pattern)
    )
    assert len(weight_files) == 35  # one per model, but 3 in sd15 and in sd15-inpaint, 4 in sdxl and in sdxl-inpaint, 5 in sd3
    for relative in weight_files:
        assert (tmp_path / "first" / relative).read_bytes() == (tmp_path / "second" / relative).read_bytes(), relative
    unet = Path("unet/diffusion_pytorch_model.safetensors")
    assert (first["sd15"] / unet).read_bytes() != (other_seed["sd15"] / unet).read_bytes()


def test_controlnets_start_from_the_unet_but_differ_per_control_type(models: dict[str, Path]) -> None:
    unet = load_file(models["sd15"] / "unet" / "diffusion_pytorch_model.safetensors")
    softedge, depth = (
        load_file(models[f"controlnet-sd15-{control}"] / "diffusion_pytorch_model.safetensors")
        for control in ("softedge", "depth")
    )
    assert torch.equal(softedge["conv_in.weight"], unet["conv_in.weight"])
    assert torch.equal(depth["conv_in.weight"], unet["conv_in.weight"])
    assert not torch.equal(softedge["controlnet_mid_block.weight"], depth["controlnet_mid_block.weight"])


def test_unknown_name_is_rejected_with_the_allowed_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allowed: sd15, sd15-inpaint, sdxl, sdxl-inpaint, controlnet-sd15-softedge"):
        build_tiny_models(tmp_path, only=["sd15", "sd21"])
    assert not list(tmp_path.iterdir())


def test_failed_build_leaves_no_partial_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(folder: Path, seed: int) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setitem(tiny_builders.BUILDERS, "dinov3", crash)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_tiny_models(tmp_path, only=["dinov3"])
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------ derived from the real configs

ABSENT = "<absent>"
UNCOMPARED_DICTS = {"size", "crop_size", "id2label", "label2id"}
"""Dicts compared as one value: an image size is one size field; labels are not architecture."""


def _flatten(content: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in content.items():
        if isinstance(value, dict) and value and key not in UNCOMPARED_DICTS:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def as_loaded(path: Path, diffusers_class: str | None, tmp_path: Path) -> dict[str, Any]:
    """A config file as its library reads it (defaults filled in, legacy keys applied), flattened, without
    :data:`METADATA_FIELDS`; both sides of a comparison go through the same class."""
    content = json.loads(path.read_text())
    if path.name == "preprocessor_config.json":
        folder = tmp_path / f"processor-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        shutil.copyfile(path, folder / path.name)
        content = AutoImageProcessor.from_pretrained(folder).to_dict()
    elif diffusers_class:
        init = inspect.signature(getattr(diffusers, diffusers_class).__init__).parameters.values()
        defaults = {p.name: p.default for p in init if p.default is not inspect.Parameter.empty}
        content = json.loads(json.dumps({name: content.get(name, default) for name, default in defaults.items()}))
    else:
        content = transformers.CONFIG_MAPPING[content["model_type"]].from_dict(content).to_dict()
    return {key: value for key, value in _flatten(content).items() if key.rsplit(".", 1)[-1] not in METADATA_FIELDS}


def config_differences(derived: DerivedConfig, tiny_root: Path, tmp_path: Path) -> dict[str, tuple[Any, Any]]:
    """Field -> (real value, tiny value) for every field in which the tiny file differs from the real one."""
    tiny_path = tiny_root / derived.tiny_model / derived.file
    # The class the pipeline loads it with (the union's files name ControlNetModel, as on the hub).
    diffusers_class = "ControlNetUnionModel" if derived.kind == "controlnet_union" else json.loads(tiny_path.read_text()).get("_class_name")
    real = as_loaded(REAL_CONFIGS_DIR / derived.real, diffusers_class, tmp_path)
    tiny = as_loaded(tiny_path, diffusers_class, tmp_path)
    return {
        key: (real.get(key, ABSENT), tiny.get(key, ABSENT))
        for key in sorted(real.keys() | tiny.keys())
        if real.get(key, ABSENT) != tiny.get(key, ABSENT)
    }


@pytest.mark.parametrize("derived", DERIVED_CONFIGS, ids=lambda d: f"{d.tiny_model}/{d.file}")
def test_tiny_configs_differ_from_the_real_ones_only_in_size(
    derived: DerivedConfig, models: dict[str, Path], tmp_path: Path
) -> None:
    differences = config_differences(derived, next(iter(models.values())).parent, tmp_path)
    not_size = {key: values for key, values in differences.items() if key not in SIZE_FIELDS[derived.kind]}
    assert not not_size, f"{derived.tiny_model}/{derived.file} differs from {derived.real} beyond size fields: {not_size}"
    assert differences, "a tiny model that is not smaller than the real one"


def test_tiny_timm_dinov3_differs_from_the_real_one_only_in_size(models: dict[str, Path]) -> None:
    """timm's config.json names the architecture and its pretrained settings; the tiny one adds only size arguments."""
    from neu_det_pipeline.testing.tiny_builders import DINOV3_TIMM_SIZES, real_config

    real, tiny = real_config("dinov3-timm/config.json"), json.loads((models["dinov3-timm"] / "config.json").read_text())
    assert tiny["architecture"] == real["architecture"] and tiny["num_classes"] == real["num_classes"]
    sizes = {key: value for key, value in tiny["model_args"].items() if key in DINOV3_TIMM_SIZES}
    assert sizes == {**DINOV3_TIMM_SIZES, "img_size": [DINOV3_TIMM_SIZES["img_size"]] * 2}
    # timm records every argument it was given; the rest must be what the real checkpoint uses (RGB input).
    others = {key: value for key, value in tiny["model_args"].items() if key not in DINOV3_TIMM_SIZES}
    assert others == {"num_classes": real["num_classes"], "global_pool": real["global_pool"], "in_chans": 3}
    same_settings = {key for key in real["pretrained_cfg"] if key != "input_size"}
    assert {key: tiny["pretrained_cfg"].get(key) for key in same_settings} == {key: real["pretrained_cfg"][key] for key in same_settings}


def test_a_changed_branch_field_is_caught(models: dict[str, Path], tmp_path: Path) -> None:
    """The comparison sees a non-size change, e.g. the CLIP pooling switch the hub files set."""
    root = tmp_path / "tiny"
    shutil.copytree(models["sd15"] / "text_encoder", root / "sd15" / "text_encoder")
    config_file = root / "sd15" / "text_encoder" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "eos_token_id": 49407}))
    derived = next(d for d in DERIVED_CONFIGS if d.tiny_model == "sd15" and d.file == "text_encoder/config.json")
    assert config_differences(derived, root, tmp_path)["eos_token_id"] == (2, 49407)
    assert "eos_token_id" not in SIZE_FIELDS[derived.kind]


def test_every_real_config_folder_has_its_sources() -> None:
    sources = (REAL_CONFIGS_DIR / "SOURCES.md").read_text()
    for folder in sorted(p.name for p in REAL_CONFIGS_DIR.iterdir() if p.is_dir()):
        assert f"`{folder}/`" in sources, f"real_configs/{folder} has no entry in SOURCES.md"


def test_real_configs_ship_with_the_package() -> None:
    package_data = Path(__file__).resolve().parents[1].joinpath("pyproject.toml").read_text()
    assert '"testing/real_configs/**/*"' in package_data


# ------------------------------------------------------------------------------------ diffusion


def test_sd15_pipeline_is_seeded(models: dict[str, Path]) -> None:
    pipe = quiet(StableDiffusionPipeline.from_pretrained(models["sd15"]))

    def generate(seed: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(seed)
        return pipe(PROMPT, num_inference_steps=2, generator=generator, output_type="np").images

    first, again, other = generate(0), generate(0), generate(1)
    assert first.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_sd15_with_two_controlnets_runs_unipc(models: dict[str, Path], image: Image.Image) -> None:
    controlnets = [
        load_strict(ControlNetModel.from_pretrained, models[f"controlnet-sd15-{control}"])
        for control in ("softedge", "depth")
    ]
    pipe = quiet(StableDiffusionControlNetPipeline.from_pretrained(models["sd15"], controlnet=controlnets))
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)

    def generate(control_image: Image.Image) -> np.ndarray:
        return pipe(
            PROMPT,
            image=[control_image, control_image],
            height=64,
            width=64,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    images = generate(image)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    blank = generate(Image.new("RGB", image.size))
    assert np.abs(images - blank).max() > 1e-3, "the control image should steer generation"


def test_sdxl_pipeline_runs(models: dict[str, Path]) -> None:
    pipe = quiet(StableDiffusionXLPipeline.from_pretrained(models["sdxl"]))
    images = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_sdxl_controlnet_pipeline_runs(models: dict[str, Path], image: Image.Image) -> None:
    controlnet = load_strict(ControlNetModel.from_pretrained, models["controlnet-sdxl-depth"])
    pipe = quiet(StableDiffusionXLControlNetPipeline.from_pretrained(models["sdxl"], controlnet=controlnet))
    generator = torch.Generator().manual_seed(0)
    images = pipe(
        PROMPT, image=image, height=64, width=64, num_inference_steps=2, generator=generator, output_type="np"
    ).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


# ------------------------------------------------------------------------- scorers and captioner


def test_clip_scores_images_against_prompts(models: dict[str, Path], image: Image.Image) -> None:
    model = load_strict(CLIPModel.from_pretrained, models["clip"])
    processor = CLIPProcessor.from_pretrained(models["clip"])
    inputs = processor(text=[PROMPT, "crazing"], images=[image, image, image], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert logits.shape == (3, 2)


def test_blip2_captions_an_image(models: dict[str, Path], image: Image.Image) -> None:
    model = load_strict(Blip2ForConditionalGeneration.from_pretrained, models["blip2"])
    processor = Blip2Processor.from_pretrained(models["blip2"])
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index
    assert processor.num_query_tokens == model.config.num_query_tokens
    inputs = processor(images=image, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5)
    captions = processor.batch_decode(generated, skip_special_tokens=True)
    assert len(captions) == 1 and isinstance(captions[0], str)
    # With a prompt the processor prepends one <image> per query token; the model must accept that too.
    prompted = processor(images=image, text="a photo of", return_tensors="pt")
    assert model.generate(**prompted, max_new_tokens=5).shape[0] == 1


def test_open_clip_loads_from_local_dir(models: dict[str, Path], image: Image.Image) -> None:
    model_id = f"local-dir:{models['open_clip']}"
    model, _, preprocess = open_clip.create_model_and_transforms(model_id)
    tokenizer = open_clip.get_tokenizer(model_id)
    assert isinstance(tokenizer, open_clip.SimpleTokenizer)
    # open_clip only logs a warning when it finds no weights file and keeps its random init.
    saved = load_file(models["open_clip"] / "open_clip_model.safetensors")
    assert torch.equal(model.state_dict()["text_projection"], saved["text_projection"])
    with torch.no_grad():
        image_features = model.encode_image(preprocess(image).unsqueeze(0))
        text_features = model.encode_text(tokenizer([PROMPT, "crazing"]))
    assert image_features.shape == (1, 16) and text_features.shape == (2, 16)


def test_dinov3_returns_cls_register_and_patch_tokens(models: dict[str, Path], image: Image.Image) -> None:
    model = load_strict(AutoModel.from_pretrained, models["dinov3"])
    pixel_values = AutoImageProcessor.from_pretrained(models["dinov3"])(image, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 64, 64)
    with torch.no_grad():
        tokens = model(pixel_values=pixel_values).last_hidden_state
    config = model.config
    assert tokens.shape == (1, 1 + config.num_register_tokens + (64 // config.patch_size) ** 2, config.hidden_size)
    # Not AutoBackbone: in transformers 5.23 it asks the hub whether the id exists and rejects local folders.
    backbone = load_strict(partial(DINOv3ViTBackbone.from_pretrained, out_indices=[-1]), models["dinov3"])
    with torch.no_grad():
        (feature_map,) = backbone(pixel_values=pixel_values).feature_maps
    assert feature_map.shape == (1, config.hidden_size, 4, 4)


def test_depth_model_predicts_a_depth_map(models: dict[str, Path], image: Image.Image) -> None:
    model = load_strict(AutoModelForDepthEstimation.from_pretrained, models["depth"])
    inputs = AutoImageProcessor.from_pretrained(models["depth"])(image, return_tensors="pt")
    with torch.no_grad():
        depth = model(**inputs).predicted_depth
    assert depth.ndim == 3 and depth.shape[0] == 1 and torch.isfinite(depth).all()
    result = pipeline("depth-estimation", model=str(models["depth"]))(image)
    assert result["depth"].size == image.size and result["predicted_depth"].ndim == 2


# ------------------------------------------------------------------------------------ tokenizers


def test_tokenizer_assets_match_their_generator(tmp_path: Path) -> None:
    written = write_tokenizer_assets(tmp_path)
    committed = sorted(p.relative_to(ASSETS_DIR) for p in ASSETS_DIR.rglob("*") if p.is_file())
    assert committed == sorted(p.relative_to(tmp_path) for p in written)
    for path in written:
        assert path.read_bytes() == (ASSETS_DIR / path.relative_to(tmp_path)).read_bytes(), (
            f"{path.relative_to(tmp_path)} drifted: run python -m neu_det_pipeline.testing.make_tokenizer_assets"
        )


REAL_PROMPTS = [
    PROMPT,
    "a grayscale photo of <neu-rolled-in_scale> on a steel strip, hot-rolled steel strip, metal surface, scale flakes",
    "A close-up photograph of a rusty, pitted steel plate -- 4K, f/2.8 (macro)!",
    "Überprüfung: Kratzer & Einschlüsse auf Stahl, 50% vergrößert",
    " ".join(["crazing on the hot-rolled steel strip surface"] * 12),  # far beyond 77 tokens
]


@pytest.mark.parametrize("prompt", REAL_PROMPTS)
def test_clip_tokenizer_matches_open_clip(prompt: str) -> None:
    """The transformers tokenizer rebuilt from open_clip's BPE file gives open_clip's ids, truncation included."""
    ids = clip_tokenizer()(prompt, truncation=True, max_length=CLIP_CONTEXT_LENGTH).input_ids
    reference = open_clip.get_tokenizer("ViT-L-14")([prompt], context_length=CLIP_CONTEXT_LENGTH)[0]
    assert ids == [int(i) for i in reference if i != 0]  # open_clip pads with 0, CLIP's own tokenizer with its end token


def test_tiny_models_carry_the_real_clip_tokenizer(models: dict[str, Path]) -> None:
    real = clip_tokenizer()
    folders = [models["sd15"] / "tokenizer", models["sdxl"] / "tokenizer", models["sdxl"] / "tokenizer_2", models["clip"]]
    for folder in folders:
        # Hub layout (vocab.json + merges.txt, converted when loaded), not transformers' tokenizer.json.
        assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file(), folder
        assert not (folder / "tokenizer.json").exists(), folder
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        assert len(tokenizer) == 49408 and tokenizer.model_max_length == CLIP_CONTEXT_LENGTH
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
        assert tokenizer(REAL_PROMPTS[1]).input_ids == real(REAL_PROMPTS[1]).input_ids
    # SDXL's second tokenizer pads with "!" (id 0), a special added token: it also splits "!" out of words.
    tokenizer_2 = CLIPTokenizer.from_pretrained(models["sdxl"] / "tokenizer_2")
    assert tokenizer_2.pad_token_id == 0
    assert tokenizer_2.convert_ids_to_tokens(tokenizer_2("macro)!").input_ids[1:-1]) == ["macro</w>", ")</w>", "!"]
    tokenizer = CLIPTokenizer.from_pretrained(models["sd15"] / "tokenizer")
    assert tokenizer.pad_token_id == 49407
    # Textual inversion tells new placeholders from existing ones by this count; each is then one token.
    assert tokenizer.add_tokens(["<neu-crazing>", "<neu-patches>"]) == 2
    assert tokenizer.add_tokens(["<neu-crazing>"]) == 0
    assert len(tokenizer("a photo of <neu-crazing>").input_ids) == 6


def test_gpt2_tokenizer_covers_any_text_and_counts_added_tokens() -> None:
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / GPT2_TOKENIZER)
    ids = tokenizer(PROMPT + ", 4K ½ é 漢", add_special_tokens=False).input_ids
    assert len(ids) < 40 and tokenizer.unk_token_id not in ids  # unseen characters fall back to bytes
    assert tokenizer.add_tokens(["<image>"]) == 1 and tokenizer.add_tokens(["<image>"]) == 0


def test_gpt2_tokenizer_matches_opt_conventions() -> None:
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / GPT2_TOKENIZER)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2, 2)
    assert tokenizer("a photo").input_ids[0] == tokenizer.bos_token_id


def test_every_name_has_a_builder_and_listing_them_imports_no_model_library() -> None:
    assert tuple(tiny_builders.BUILDERS) == TINY_MODEL_NAMES
    code = "import sys, neu_det_pipeline.testing.tiny_models; print(any(m in sys.modules for m in ('diffusers', 'open_clip', 'transformers')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
