"""fp16 weight variants: loaded where a repo has them and the network is held in half precision, nowhere else.

The tiny folders get an fp16 variant whose weights differ from the full files (each weight + 1), so the loaded
tensors tell which file was read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import load_file

from neu_det_pipeline.generation.pipeline import ControlNetGenerator
from neu_det_pipeline.models import _hub_repo_files, weights_variant
from neu_det_pipeline.training.diffusion import load_components

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNET_FULL, UNET_FP16 = "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"
CONTROLNET_FP16 = "diffusion_pytorch_model.fp16.safetensors"
TEMPLATE_PROMPTS = ("generation.use_textual_inversion=false", "generation.use_lora=false", "generation.prompt_source=template")


def add_fp16_variant(model_class, folder: Path, subfolder: str | None = None) -> None:
    """Save `folder`'s model again as the fp16 variant, with every weight shifted by one."""
    model = model_class.from_pretrained(folder, subfolder=subfolder)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    model.half().save_pretrained(folder / subfolder if subfolder else folder, variant="fp16")


@pytest.fixture(scope="module")
def variant_models(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Copies of the tiny SD 1.5 pipeline and softedge ControlNet, each with an fp16 variant next to its full files."""
    root = tmp_path_factory.mktemp("variants")
    sd15, controlnet = root / "sd15", root / "controlnet"
    shutil.copytree(tiny_models_dir / "sd15", sd15)
    shutil.copytree(tiny_models_dir / "controlnet-sd15-softedge", controlnet)
    add_fp16_variant(UNet2DConditionModel, sd15, "unet")
    add_fp16_variant(ControlNetModel, controlnet)
    return {"sd15": sd15, "controlnet": controlnet}


def assert_weights_from(module: torch.nn.Module, weights_file: Path) -> None:
    saved = load_file(weights_file)
    state = module.state_dict()
    assert saved.keys() <= state.keys()
    for name, tensor in saved.items():
        # Cast the saved tensor to the module's dtype: equal values then prove which file was read.
        assert torch.equal(state[name], tensor.to(state[name].dtype)), name


def test_variant_files_decide(variant_models: dict[str, Path], tiny_models_dir: Path) -> None:
    sd15 = str(variant_models["sd15"])
    for half in (torch.float16, torch.bfloat16):
        assert weights_variant(sd15, half) == "fp16"  # a pipeline: any component with variant files
        assert weights_variant(sd15, half, "unet") == "fp16"
        assert weights_variant(sd15, half, "vae") is None  # this component has none
    assert weights_variant(sd15, torch.float32) is None
    assert weights_variant(str(tiny_models_dir / "sd15"), torch.bfloat16) is None


def test_training_components_load_the_variant_only_for_half_precision_networks(variant_models, make_config) -> None:
    folder = variant_models["sd15"]
    config = make_config(f"models.sd15={folder}")
    half = load_components(config, torch.bfloat16)
    assert_weights_from(half.unet, folder / UNET_FP16)
    full = load_components(config, torch.float32)
    assert_weights_from(full.unet, folder / UNET_FULL)
    assert not torch.equal(half.unet.conv_in.weight.float(), full.unet.conv_in.weight)
    # Step 1 holds the text encoder in fp32 (it trains embedding rows): no variant for it even in a half-precision run.
    step1 = load_components(config, torch.bfloat16, text_encoder_dtype=torch.float32)
    assert_weights_from(step1.text_encoders[0], folder / "text_encoder" / "model.safetensors")


def test_generation_loads_variants_in_half_precision_and_full_files_otherwise(variant_models, make_config, tmp_path: Path) -> None:
    sd15, controlnet = variant_models["sd15"], variant_models["controlnet"]
    config = make_config(
        *TEMPLATE_PROMPTS, "generation.controls=[softedge]", f"models.sd15={sd15}", f"models.controlnet_sd15.softedge={controlnet}"
    )
    half = ControlNetGenerator(config, torch.device("cpu"), torch.bfloat16, tmp_path, tmp_path)
    assert half.pipe.unet.dtype == torch.bfloat16
    assert_weights_from(half.pipe.unet, sd15 / UNET_FP16)
    assert_weights_from(half.controlnets["softedge"], controlnet / CONTROLNET_FP16)
    assert_weights_from(half.pipe.vae, sd15 / "vae" / "diffusion_pytorch_model.safetensors")  # no variant: full files
    full = ControlNetGenerator(config, torch.device("cpu"), torch.float32, tmp_path, tmp_path)
    assert_weights_from(full.pipe.unet, sd15 / UNET_FULL)
    assert_weights_from(full.controlnets["softedge"], controlnet / "diffusion_pytorch_model.safetensors")


def test_a_folder_without_variants_loads_in_half_precision(make_config, tiny_models_dir: Path, tmp_path: Path) -> None:
    config = make_config(*TEMPLATE_PROMPTS, "generation.controls=[softedge]")
    generator = ControlNetGenerator(config, torch.device("cpu"), torch.bfloat16, tmp_path, tmp_path)
    assert generator.pipe.unet.dtype == torch.bfloat16
    assert_weights_from(generator.pipe.unet, tiny_models_dir / "sd15" / UNET_FULL)


def test_hub_ids_are_listed_on_the_hub_or_else_in_the_cache(monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub

    # The hub cache layout: models--org--name/refs/main names the snapshot holding the downloaded files.
    repo = tmp_path / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40) / "unet").mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / UNET_FP16).write_bytes(b"")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert weights_variant("org/tiny", torch.float16, "unet") == "fp16"  # offline: the cached snapshot
    assert weights_variant("org/tiny", torch.float16, "vae") is None
    assert weights_variant("org/not-cached", torch.float16) is None  # unknown: the loader reports what is missing

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    listings = []

    def listing(self, repo_id):
        listings.append(repo_id)
        return ["vae/diffusion_pytorch_model.fp16.safetensors"]

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", listing)
    assert weights_variant("org/tiny", torch.bfloat16, "vae") == "fp16"  # online: the hub's listing
    assert weights_variant("org/tiny", torch.bfloat16, "unet") is None
    assert listings == ["org/tiny"]  # asked once per process for all the components of a repo
    _hub_repo_files.cache_clear()

    def unreachable(self, repo_id):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    assert weights_variant("org/tiny", torch.float16, "unet") == "fp16"  # listing failed: the cache decides


@pytest.mark.parametrize(
    "name, has_variant",
    [
        ("text_encoder/model.fp16.safetensors", True),
        ("unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors", True),  # sharded
        ("text_encoder_2/model-00001-of-00002.fp16.safetensors", True),  # the older sharded spelling
        ("unet/diffusion_pytorch_model.fp16.bin", False),  # a variant is never a pickle to unpickle
        ("unet/diffusion_pytorch_model.non_ema.safetensors", False),  # another variant
        ("v1-5-pruned-emaonly.fp16.safetensors", False),  # a single-file checkpoint from_pretrained does not read
    ],
)
def test_variant_file_names_are_the_ones_the_loaders_read(tmp_path: Path, name: str, has_variant: bool) -> None:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b"")
    assert weights_variant(str(tmp_path), torch.bfloat16) == ("fp16" if has_variant else None)
