"""`neu-det doctor --online`: ask the hub, before anything trains, whether every model the config loads can be had.

For each hub model of `doctor.model_needs` (only those): the repo exists (a retired id is named with its
replacement), access is granted (gated repos), the files its loader fetches are there, and the configs agree
(ControlNet cross-attention width vs the UNet's, the union ControlNet's control modes, BLIP-2's image token,
the DINOv3 model type), reading only small json files. Weights from outside the hub (torch-fidelity's
Inception, ultralytics' YOLO, torchvision's LPIPS backbones) are asked for one byte. The bytes still to
download are set against the free space where the Hugging Face cache lives.

Talks to the endpoint `HF_ENDPOINT` names when the check runs (tests point it at a stand-in hub).
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.models import HALF_PRECISION_VARIANT, WEIGHT_FILE

TIMEOUT_S = 10

RETIRED_REPOS = {
    # Deleted by their owner in 2024; diffusers' docs use the maintained copies.
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "runwayml/stable-diffusion-inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
}
"""Hub ids that no longer exist -> the repo that replaces them."""

EXTERNAL_WEIGHTS = {
    # torch_fidelity/feature_extractor_inceptionv3.py, URL_INCEPTION_V3 (FID's pt_inception-2015-12-05)
    "inception": "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    # ultralytics/utils/downloads.py attempt_download_asset: GITHUB_ASSETS_REPO, release v8.4.0
    "yolo": "https://github.com/ultralytics/assets/releases/download/v8.4.0/{name}",
    # torchvision's IMAGENET1K_V1 weights, which lpips' pretrained_networks load for its backbone
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}
"""Where the weights that do not come from the hub are downloaded from (tests point them at a stand-in)."""

PIPELINE_COMPONENTS_NOT_LOADED = {"safety_checker"}
"""model_index.json components the project passes as None, so diffusers never fetches them."""
SMALL_FILE_SUFFIXES = (".json", ".txt", ".model")
"""Configs, tokenizer vocabularies and merges: fetched with the weights of their folder."""


@dataclass
class HubFindings:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)
    fetched: dict[str, dict[str, int]] = field(default_factory=dict)
    """Repo -> {file: size} of what the loaders will download."""


def endpoint() -> str:
    """The hub the check talks to: `HF_ENDPOINT` read now, not when huggingface_hub was imported."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _weight_files(files: dict[str, int], folder: str, variant: str | None) -> list[str]:
    """The weight files a diffusers/transformers loader takes from `folder`: safetensors before pickled .bin,
    the `variant` files where the repo has them (as `models.weights_variant` picks), else the plain ones."""
    matches = {
        name: match for name in files
        if posixpath.dirname(name) == folder and (match := WEIGHT_FILE.fullmatch(posixpath.basename(name)))
    }
    for weight_format in ("safetensors", "bin"):
        of_format = {name: match["variant"] for name, match in matches.items() if match["format"] == weight_format}
        chosen = [name for name, found in of_format.items() if variant and found == variant]
        chosen = chosen or [name for name, found in of_format.items() if found is None]
        if chosen:
            return sorted(chosen)
    return []


def _mmdit_width(config: dict) -> int:
    """Width of an SD3 transformer or ControlNet config (`num_attention_heads` x `attention_head_dim`)."""
    return config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)


def _small_files(files: dict[str, int], folder: str) -> list[str]:
    return [name for name in files if posixpath.dirname(name) == folder and name.endswith(SMALL_FILE_SUFFIXES)]


class HubChecker:
    def __init__(self, config: PipelineConfig):
        from huggingface_hub import HfApi

        self.config = config
        self.endpoint = endpoint()
        self.api = HfApi(endpoint=self.endpoint)
        self.findings = HubFindings()
        # The loaders take the fp16 files in half precision where a repo has them (models.weights_variant).
        self.variant = HALF_PRECISION_VARIANT if config.run.mixed_precision in ("fp16", "bf16") else None
        self.unet_cross_attention: int | None = None
        self.transformer_width: int | None = None
        """SD3: the MMDiT transformer's width (heads x head size), which an SD3 ControlNet must share."""
        self.unreachable = False

    # ------------------------------------------------------------------------------ repo level

    def repo_files(self, key: str, repo: str) -> dict[str, int] | None:
        """{file: size} of a repo the token can read; None (and a problem line) when it cannot be had."""
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

        problems = self.findings.problems
        shown = f"{key}={repo!r}"
        no_access = (
            f"{shown} is gated and your token has no access: accept its licence at {self.endpoint}/{repo} "
            "(logged in), then `hf auth login` with a token of that account (or set HF_TOKEN)"
        )
        try:
            info = self.api.model_info(repo, files_metadata=True, timeout=TIMEOUT_S)
            if info.gated:
                try:
                    self.api.auth_check(repo)
                except HfHubHTTPError as exc:
                    # Without a token the hub answers 401, which huggingface_hub reports as RepositoryNotFoundError.
                    if isinstance(exc, (GatedRepoError, RepositoryNotFoundError)) or exc.response.status_code in (401, 403):
                        problems.append(no_access)
                        return None
                    raise
        except GatedRepoError:
            problems.append(no_access)
            return None
        except RepositoryNotFoundError:
            if repo in RETIRED_REPOS:
                problems.append(f"{shown} was deleted from the hub: set {key}={RETIRED_REPOS[repo]}")
            else:
                problems.append(
                    f"{shown} does not exist on {self.endpoint} (or is private): check the id, or `hf auth login` "
                    "with a token that can read it"
                )
            return None
        except Exception as exc:  # noqa: BLE001 - network, server or timeout: the same advice for each
            # No HTTP answer at all: asking about the other models would only repeat this line.
            self.unreachable = not isinstance(exc, HfHubHTTPError)
            rest = "; the remaining models were not checked" if self.unreachable else ""
            problems.append(
                f"{shown}: could not ask {self.endpoint} ({type(exc).__name__}: {str(exc)[:120]}): check the network and HF_ENDPOINT{rest}"
            )
            return None
        return {sibling.rfilename: sibling.size or 0 for sibling in info.siblings or []}

    def read_json(self, repo: str, filename: str) -> dict:
        path = self.api.hf_hub_download(repo, filename)
        with open(path, encoding="utf-8") as file:
            return json.load(file)

    def fetch(self, repo: str, files: dict[str, int], names: list[str]) -> None:
        self.findings.fetched.setdefault(repo, {}).update({name: files[name] for name in names})

    # ----------------------------------------------------------------------------- per loader

    def check_pipeline(self, key: str, repo: str, files: dict[str, int]) -> None:
        if "model_index.json" not in files:
            self.findings.problems.append(f"{key}={repo!r} has no model_index.json: it is not a diffusers pipeline; set {key} to one")
            return
        index = self.read_json(repo, "model_index.json")
        self.fetch(repo, files, ["model_index.json"])
        for component, spec in index.items():
            if component.startswith("_") or not isinstance(spec, list) or spec[0] is None or component in PIPELINE_COMPONENTS_NOT_LOADED:
                continue
            if not any(name.startswith(f"{component}/") for name in files):
                self.findings.problems.append(
                    f"{key}={repo!r}: model_index.json names the component {component!r} but the repo has no {component}/ "
                    f"folder: the copy is incomplete; use the complete repo or a local folder"
                )
                continue
            self.fetch(repo, files, _small_files(files, component) + _weight_files(files, component, self.variant))
        if "unet/config.json" in files:
            self.unet_cross_attention = self.read_json(repo, "unet/config.json").get("cross_attention_dim")
        if "transformer/config.json" in files:
            self.transformer_width = _mmdit_width(self.read_json(repo, "transformer/config.json"))

    def check_controlnet(self, key: str, repo: str, files: dict[str, int]) -> None:
        problems = self.findings.problems
        if "config.json" not in files:
            problems.append(f"{key}={repo!r} has no config.json: it is not a diffusers ControlNet; set {key} to one")
            return
        weights = _weight_files(files, "", self.variant)
        if not weights:
            problems.append(f"{key}={repo!r} has no weights (diffusion_pytorch_model.safetensors): set {key} to a complete ControlNet")
        elif weights[0].endswith(".bin"):
            self.findings.warnings.append(
                f"{key}={repo!r} ships only a pickled .bin (no safetensors): it loads, but prefer a safetensors "
                f"ControlNet, or convert it once and point {key} at the folder"
            )
        self.fetch(repo, files, ["config.json", *weights])
        config = self.read_json(repo, "config.json")
        family = self.config.models.pipeline
        width = config.get("cross_attention_dim")
        if self.unet_cross_attention is not None and width != self.unet_cross_attention:
            problems.append(
                f"{key}={repo!r} has cross_attention_dim {width}, the UNet of models.{family} has {self.unet_cross_attention}: "
                f"it is a ControlNet for another base model; set {key} to a ControlNet made for {family}"
            )
        if family == "sd3" and self.transformer_width is not None and _mmdit_width(config) != self.transformer_width:
            problems.append(
                f"{key}={repo!r} is {_mmdit_width(config)} wide, the transformer of models.sd3 is {self.transformer_width}: "
                f"it is a ControlNet for another SD3 model (e.g. SD3.5 Large); set {key} to an SD3 Medium ControlNet"
            )
        if key == "models.controlnet_union_sdxl":
            from neu_det_pipeline.generation.pipeline import UNION_CONTROL_MODES

            modes = config.get("num_control_type", 0)
            uncovered = [c for c in self.config.generation.controls if UNION_CONTROL_MODES[c] >= modes]
            if uncovered:
                problems.append(
                    f"{key}={repo!r} has {modes} control modes (num_control_type), generation.controls needs "
                    f"{', '.join(f'{c} (mode {UNION_CONTROL_MODES[c]})' for c in uncovered)}: use xinsir/controlnet-union-sdxl-1.0 "
                    "or remove those controls"
                )

    def check_transformers(self, key: str, repo: str, files: dict[str, int]) -> dict | None:
        """config.json and weights at the repo root; returns the config."""
        if "config.json" not in files:
            self.findings.problems.append(f"{key}={repo!r} has no config.json: it is not a transformers model; set {key} to one")
            return None
        weights = _weight_files(files, "", None)
        if not weights:
            self.findings.problems.append(f"{key}={repo!r} has no weights (model.safetensors or pytorch_model.bin): set {key} to a complete model")
        self.fetch(repo, files, _small_files(files, "") + weights)
        return self.read_json(repo, "config.json")

    def check_blip2(self, key: str, repo: str, files: dict[str, int]) -> None:
        config = self.check_transformers(key, repo, files)
        if config is not None and config.get("image_token_index") is None:
            self.findings.problems.append(
                f"{key}={repo!r}: config.json has no image_token_index, which transformers needs to place the image tokens: "
                "use Salesforce/blip2-opt-2.7b (its current revision sets it) or a copy that sets it"
            )

    def check_dinov3(self, key: str, repo: str, files: dict[str, int]) -> None:
        config = self.check_transformers(key, repo, files)
        if config is None:
            return
        from neu_det_pipeline.dinov3 import is_timm_config

        timm = is_timm_config(config)
        kind = (config["architecture"] if timm else config.get("model_type")) or "unknown model"
        if not ("dinov3" in kind if timm else kind == "dinov3_vit"):
            self.findings.problems.append(
                f"{key}={repo!r} is a {kind}, not a DINOv3 ViT: set {key}=timm/vit_small_patch16_dinov3.lvd1689m "
                "(or facebook/dinov3-vits16-pretrain-lvd1689m)"
            )

    def check_open_clip(self, key: str, repo: str, files: dict[str, int]) -> None:
        if "open_clip_config.json" not in files:
            self.findings.problems.append(f"{key}='hf-hub:{repo}' has no open_clip_config.json: it is not an OpenCLIP model; set {key} to one")
            return
        # open_clip's download_pretrained_from_hf: the safetensors file first, then the pickled one.
        weights = [name for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin") if name in files][:1]
        if not weights:
            self.findings.problems.append(f"{key}='hf-hub:{repo}' has no open_clip_model.safetensors: set {key} to a complete OpenCLIP model")
        self.fetch(repo, files, ["open_clip_config.json", *weights])

    def check_annotators(self, key: str, repo: str, files: dict[str, int]) -> None:
        from neu_det_pipeline.doctor import ANNOTATOR_FILES

        generation = self.config.generation
        wanted = sorted({ANNOTATOR_FILES[generation.detectors[c]] for c in generation.controls if generation.detectors[c] in ANNOTATOR_FILES})
        missing = [name for name in wanted if name not in files]
        if missing:
            self.findings.problems.append(
                f"{key}={repo!r} lacks {', '.join(missing)} (controlnet_aux loads them): set {key}=lllyasviel/Annotators"
            )
        self.fetch(repo, files, [name for name in wanted if name in files])

    # ----------------------------------------------------------------------- outside the hub

    def reachable(self, what: str, url: str, fix: str) -> None:
        """One byte of `url` (a ranged GET: urllib turns HEAD into GET on redirects anyway)."""
        request = urllib.request.Request(url, headers={"Range": "bytes=0-0"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                response.read(1)
            return
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            reason = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        self.findings.problems.append(f"{what}: {url} is not reachable ({reason}): {fix}")

    def check_external(self) -> None:
        import torch

        evaluation, checkpoints = self.config.evaluation, Path(torch.hub.get_dir()) / "checkpoints"

        def cached(url: str) -> bool:
            return (checkpoints / posixpath.basename(url)).is_file()

        # A configured evaluation.inception_weights file is checked offline (doctor.locate).
        if "inception" in evaluation.features and evaluation.inception_weights is None and not cached(EXTERNAL_WEIGHTS["inception"]):
            self.reachable(
                "FID Inception weights (torch-fidelity)", EXTERNAL_WEIGHTS["inception"],
                "download the file where it is reachable and set evaluation.inception_weights=FILE",
            )
        if evaluation.lpips_pretrained_backbone:
            url = EXTERNAL_WEIGHTS[evaluation.lpips_net]
            if not cached(url):
                self.reachable(
                    f"LPIPS {evaluation.lpips_net} backbone (torchvision)", url,
                    f"put the file in {checkpoints}, or set evaluation.lpips_pretrained_backbone=false",
                )
        yolo = self.config.models.yolo
        if evaluation.utility.enabled and yolo.endswith(".pt") and not Path(yolo).is_file():
            url = EXTERNAL_WEIGHTS["yolo"].format(name=yolo)
            self.reachable(f"models.yolo={yolo!r} (ultralytics)", url, f"download {yolo} and set models.yolo=/path/to/{yolo}")

    # ------------------------------------------------------------------------------- download size

    def check_space(self) -> None:
        from huggingface_hub import constants, try_to_load_from_cache

        total = sum(
            size for repo, files in self.findings.fetched.items() for name, size in files.items()
            if not isinstance(try_to_load_from_cache(repo, name), str)
        )
        cache = Path(constants.HF_HUB_CACHE)
        existing = next(parent for parent in (cache, *cache.parents) if parent.exists())
        free = shutil.disk_usage(existing).free
        self.findings.facts.append(("to download", f"{total / 1e9:.2f} GB into {cache} ({free / 1e9:.1f} GB free)"))
        if total > free:
            self.findings.problems.append(
                f"the models still to download take {total / 1e9:.1f} GB, {cache} has {free / 1e9:.1f} GB free: free space "
                "or point HF_HUB_CACHE (or HF_HOME) at a larger disk"
            )


def check_online(config: PipelineConfig, needs: list) -> HubFindings:
    """Every check above for the hub models in `needs` (doctor.ModelNeed) and the weights from outside the hub."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return HubFindings(problems=[
            "HF_HUB_OFFLINE=1 is set: the online checks need the hub; run `HF_HUB_OFFLINE=0 neu-det doctor --config ... --online`"
        ])
    from neu_det_pipeline.models import local_folder

    checker = HubChecker(config)
    checker.findings.facts.append(("Hugging Face hub", f"asked {checker.endpoint}"))
    family = config.models.pipeline
    checks = {
        f"models.{family}": checker.check_pipeline, f"models.{family}_inpaint": checker.check_pipeline, "models.blip2": checker.check_blip2, "models.dinov3": checker.check_dinov3,
        "models.open_clip": checker.check_open_clip, "models.annotators": checker.check_annotators,
    }
    # The pipeline first: the ControlNets are compared with its UNet.
    hub_needs = sorted(
        (need for need in needs if need.probe is not None and local_folder(need.model_id) is None),
        key=lambda need: need.key != f"models.{family}",
    )
    for need in hub_needs:
        repo = need.model_id.removeprefix("hf-hub:")
        files = checker.repo_files(need.key, repo)
        if checker.unreachable:
            break
        if files is None:
            continue
        check = checks.get(need.key) or (checker.check_controlnet if need.key.startswith("models.controlnet_") else checker.check_transformers)
        try:
            check(need.key, repo, files)
        except Exception as exc:  # noqa: BLE001 - a config that will not download or parse: one line, not a traceback
            checker.findings.problems.append(f"{need.key}={need.model_id!r}: reading its config failed ({type(exc).__name__}: {str(exc)[:120]})")
    checker.check_external()
    checker.check_space()
    return checker.findings
