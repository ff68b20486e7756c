"""`neu-det doctor --online` against a stand-in hub that the test serves on 127.0.0.1 (json and sizes only, no weights)."""

from __future__ import annotations

import copy
import json
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO

from neu_det_pipeline import hub_check
from neu_det_pipeline.cli import main
from neu_det_pipeline.config import PipelineConfig, load_config
from neu_det_pipeline.doctor import ANNOTATOR_FILES, diagnose, model_needs

COMMIT = "1" * 40
GB = 10**9
TIMM_DINOV3 = "timm/vit_small_patch16_dinov3.lvd1689m"
TRANSFORMERS_DINOV3 = "facebook/dinov3-vits16-pretrain-lvd1689m"
# base.yaml plus every optional loader: OpenCLIP ranking and BLIP-2 captions.
OVERRIDES = [f"models.dinov3={TIMM_DINOV3}", "captions.ranking_backends=[clip,open_clip]", "captions.prompt_style=blip2"]
SDXL_UNION = ["models.pipeline=sdxl", "generation.union_controlnet=true"]


class StandInHub:
    """What huggingface_hub 2.4 asks: /api/models/<repo>[/revision/<rev>] (model_info), /api/models/<repo>/auth-check,
    HEAD then GET /<repo>/resolve/<rev>/<file> (hf_hub_download); and /weights/<name> for the non-hub weights."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        """repo -> {"files": {path: bytes (served) or int (size only)}, "gated": bool, "access": bool,
        "refusal": 403 (GatedRepo, a token without access) or 401 (no token: the hub's answer reads as RepoNotFound)}"""
        self.weights: set[str] = set()
        self.requests = 0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                hub.answer(self, body=True)

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests += 1
        path = urllib.parse.unquote(urllib.parse.urlsplit(handler.path).path)

        def send(status: int, content: bytes = b"", error: str | None = None) -> None:
            handler.send_response(status)
            if error:
                handler.send_header("X-Error-Code", error)
            handler.send_header("Content-Length", str(len(content)))
            handler.send_header("X-Repo-Commit", COMMIT)
            handler.send_header("ETag", f'"{abs(hash(content))}"')
            handler.end_headers()
            if body:
                handler.wfile.write(content)

        if path.startswith("/weights/"):
            return send(206, b"w") if path.removeprefix("/weights/") in self.weights else send(404)
        api = path.startswith("/api/models/")
        if api:
            rest = path.removeprefix("/api/models/")
            auth = rest.endswith("/auth-check")
            repo_id, filename = rest.removesuffix("/auth-check").split("/revision/")[0], None
        else:
            repo_id, _, filename = path.lstrip("/").partition("/resolve/main/")
        repo = self.repos.get(repo_id)
        if repo is None:
            return send(404, error="RepoNotFound")
        locked = repo.get("gated") and not repo.get("access")
        if api and not auth:
            siblings = [{"rfilename": name, "size": data if isinstance(data, int) else len(data)} for name, data in repo["files"].items()]
            info = {"id": repo_id, "sha": COMMIT, "gated": "manual" if repo.get("gated") else False, "siblings": siblings}
            return send(200, json.dumps(info).encode())
        if locked:
            return send(repo.get("refusal", 403), error="RepoNotFound" if repo.get("refusal") == 401 else "GatedRepo")
        if api:
            return send(200, b"{}")
        data = repo["files"].get(filename)
        if data is None:
            return send(404, error="EntryNotFound")
        send(200, data if isinstance(data, bytes) else b"")


def as_json(value: dict) -> bytes:
    return json.dumps(value).encode()


def pipeline_repo(cross_attention_dim: int, components: tuple[str, ...]) -> dict:
    index = {"_class_name": "StableDiffusionPipeline", **{name: ["diffusers", "Any"] for name in components}, "safety_checker": [None, None]}
    files: dict[str, bytes | int] = {"model_index.json": as_json(index)}
    for name in components:
        files[f"{name}/config.json"] = as_json({"cross_attention_dim": cross_attention_dim} if name == "unet" else {})
        if name in ("unet", "vae") or name.startswith("text_encoder"):
            files[f"{name}/diffusion_pytorch_model.safetensors"] = 2 * GB if name == "unet" else GB // 4
            files[f"{name}/diffusion_pytorch_model.fp16.safetensors"] = GB if name == "unet" else GB // 8
    return {"files": files}


def config_repo(config: dict, weights: str = "model.safetensors", size: int = GB // 2) -> dict:
    return {"files": {"config.json": as_json(config), weights: size}}


def healthy_hub(config: PipelineConfig) -> dict[str, dict]:
    """A complete, consistent, ungated repo for every hub model the config loads."""
    family = config.models.pipeline
    cross = {"sd15": 768, "sdxl": 2048}[family]
    components = ("scheduler", "text_encoder", "tokenizer", "unet", "vae") + (("text_encoder_2", "tokenizer_2") if family == "sdxl" else ())
    repos = {}
    for need in model_needs(config):
        repo = need.model_id.removeprefix("hf-hub:")
        if need.key == f"models.{family}":
            repos[repo] = pipeline_repo(cross, components)
        elif need.key == "models.controlnet_union_sdxl":
            repos[repo] = config_repo({"cross_attention_dim": cross, "num_control_type": 6}, "diffusion_pytorch_model.safetensors")
        elif need.key.startswith("models.controlnet_"):
            repos[repo] = config_repo({"cross_attention_dim": cross}, "diffusion_pytorch_model.safetensors")
        elif need.key == "models.blip2":
            repos[repo] = config_repo({"model_type": "blip-2", "image_token_index": 50265})
        elif need.key == "models.dinov3":
            repos[repo] = config_repo({"architecture": "vit_small_patch16_dinov3", "pretrained_cfg": {"tag": "lvd1689m"}})
        elif need.key == "models.open_clip":
            repos[repo] = {"files": {"open_clip_config.json": as_json({"model_cfg": {}}), "open_clip_model.safetensors": GB}}
        elif need.key == "models.annotators":
            repos[repo] = {"files": {name: 1000 for name in ANNOTATOR_FILES.values()}}
        elif need.probe is not None:
            repos[repo] = config_repo({"model_type": "clip"})
    return repos


@pytest.fixture(scope="module")
def stand_in() -> Iterator[StandInHub]:
    hub = StandInHub()
    thread = threading.Thread(target=hub.server.serve_forever, daemon=True)
    thread.start()
    yield hub
    hub.server.shutdown()
    hub.server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def hub(stand_in: StandInHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandInHub:
    """The stand-in as HF_ENDPOINT with the hub allowed, an empty HF cache and torch hub folder, non-hub weights served."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "torch-hub"))
    urls = {"inception": "inception.pth", "yolo": "{name}", "alex": "alexnet.pth", "vgg": "vgg16.pth", "squeeze": "squeezenet.pth"}
    monkeypatch.setattr(hub_check, "EXTERNAL_WEIGHTS", {key: f"{stand_in.url}/weights/{name}" for key, name in urls.items()})
    stand_in.weights = {"inception.pth", "yolov8n.pt", "alexnet.pth"}
    stand_in.requests = 0
    return stand_in


def base_config(*overrides: str) -> PipelineConfig:
    return load_config(REPO / "configs" / "base.yaml", [*OVERRIDES, *overrides])


def online(hub: StandInHub, config: PipelineConfig, edit=None):
    """doctor --online's report on a healthy hub for `config`, changed by `edit(repos)` first."""
    repos = healthy_hub(config)
    if edit is not None:
        edit(repos)
    hub.repos = copy.deepcopy(repos)
    return diagnose(config, online=True)


def test_healthy_hub_gives_no_problem_and_exit_0(hub: StandInHub, capsys: pytest.CaptureFixture) -> None:
    config = base_config()
    hub.repos = healthy_hub(config)
    code = main(["doctor", "--config", str(REPO / "configs" / "base.yaml"), "--online", *OVERRIDES])
    output = capsys.readouterr()
    text = output.out + output.err
    assert code == 0 and "no problem found" in text and "problem:" not in text, text[-3000:]
    assert f"asked {hub.url}" in text.replace("\n", "")
    # base.yaml runs in fp16: the pipeline's fp16 files (1 GB UNet, 2 x 125 MB) are what would download, plus the rest.
    report = diagnose(config, online=True)
    facts = dict(report.machine)
    fetched_gb = float(facts["to download"].split(" GB")[0])
    others = sum(size for repo, spec in hub.repos.items() if "model_index.json" not in spec["files"]
                 for name, size in spec["files"].items() if isinstance(size, int)) - 3 * 1000  # normalbae/midas unused
    assert fetched_gb == pytest.approx((GB + 2 * GB // 8 + others) / GB, abs=0.01)


def test_plain_doctor_asks_nobody_and_names_only_gated_repos(hub: StandInHub) -> None:
    timm = diagnose(base_config())
    assert hub.requests == 0 and any("not asked" in value for _, value in timm.machine)
    assert not [line for line in timm.problems if "gated" in line], timm.problems
    facebook = diagnose(base_config(f"models.dinov3={TRANSFORMERS_DINOV3}"))
    assert [line for line in facebook.problems if line.startswith(f"models.dinov3='{TRANSFORMERS_DINOV3}' is a gated model")]
    assert hub.requests == 0


def deleted_base(repos: dict) -> None:
    repos.pop("stable-diffusion-v1-5/stable-diffusion-v1-5")


def gated_dinov3(repos: dict) -> None:
    repos[TRANSFORMERS_DINOV3] = {**config_repo({"model_type": "dinov3_vit"}), "gated": True, "access": False}


def gated_dinov3_without_token(repos: dict) -> None:
    repos[TRANSFORMERS_DINOV3] = {**config_repo({"model_type": "dinov3_vit"}), "gated": True, "access": False, "refusal": 401}


def mismatched_controlnet(repos: dict) -> None:
    repos["lllyasviel/control_v11p_sd15_softedge"] = config_repo({"cross_attention_dim": 1024}, "diffusion_pytorch_model.safetensors")


def union_without_softedge(repos: dict) -> None:
    repos["xinsir/controlnet-union-sdxl-1.0"] = config_repo({"cross_attention_dim": 2048, "num_control_type": 2}, "diffusion_pytorch_model.safetensors")


def no_vae_folder(repos: dict) -> None:
    files = repos["stable-diffusion-v1-5/stable-diffusion-v1-5"]["files"]
    for name in [name for name in files if name.startswith("vae/")]:
        del files[name]


def blip2_without_image_token(repos: dict) -> None:
    repos["Salesforce/blip2-opt-2.7b"] = config_repo({"model_type": "blip-2"})


def dinov3_of_another_kind(repos: dict) -> None:
    repos[TIMM_DINOV3] = config_repo({"architecture": "vit_small_patch16_224"})


def annotators_without_hed(repos: dict) -> None:
    del repos["lllyasviel/Annotators"]["files"]["ControlNetHED.pth"]


def open_clip_without_config(repos: dict) -> None:
    del repos["laion/CLIP-ViT-H-14-laion2B-s32B-b79K"]["files"]["open_clip_config.json"]


@pytest.mark.parametrize(
    ("overrides", "edit", "expected"),
    [
        (["models.sd15=runwayml/stable-diffusion-v1-5"], None,
         "models.sd15='runwayml/stable-diffusion-v1-5' was deleted from the hub: set models.sd15=stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ([], deleted_base, "does not exist on"),
        ([f"models.dinov3={TRANSFORMERS_DINOV3}"], gated_dinov3,
         f"is gated and your token has no access: accept its licence at {{url}}/{TRANSFORMERS_DINOV3}"),
        ([f"models.dinov3={TRANSFORMERS_DINOV3}"], gated_dinov3_without_token, "is gated and your token has no access"),
        ([], mismatched_controlnet, "has cross_attention_dim 1024, the UNet of models.sd15 has 768"),
        (SDXL_UNION, union_without_softedge, "generation.controls needs softedge (mode 2)"),
        ([], no_vae_folder, "model_index.json names the component 'vae' but the repo has no vae/ folder"),
        ([], blip2_without_image_token, "config.json has no image_token_index"),
        ([], dinov3_of_another_kind, "is a vit_small_patch16_224, not a DINOv3 ViT"),
        ([], annotators_without_hed, "lacks ControlNetHED.pth"),
        ([], open_clip_without_config, "has no open_clip_config.json"),
    ],
    ids=["retired", "deleted", "gated", "gated-no-token", "cross-attention", "union-mode", "component", "blip2", "dinov3-type", "annotator", "open-clip"],
)
def test_each_fault_gives_its_line(hub: StandInHub, overrides: list[str], edit, expected: str) -> None:
    report = online(hub, base_config(*overrides), edit)
    expected = expected.format(url=hub.url)
    assert [line for line in report.problems if expected in line] and len(report.problems) == 1, report.problems


def test_bin_only_controlnet_is_a_warning(hub: StandInHub) -> None:
    def bin_only(repos: dict) -> None:
        repos["lllyasviel/control_v11f1p_sd15_depth"] = config_repo({"cross_attention_dim": 768}, "diffusion_pytorch_model.bin")

    report = online(hub, base_config(), bin_only)
    assert report.problems == [] and len(report.warnings) == 1 and "ships only a pickled .bin" in report.warnings[0]


def test_both_dinov3_forms_pass_and_the_gated_one_with_access(hub: StandInHub) -> None:
    def granted(repos: dict) -> None:
        repos[TRANSFORMERS_DINOV3] = {**config_repo({"model_type": "dinov3_vit"}), "gated": True, "access": True}

    assert online(hub, base_config(f"models.dinov3={TRANSFORMERS_DINOV3}"), granted).problems == []
    assert online(hub, base_config(*SDXL_UNION)).problems == []


def test_unreachable_external_weights_and_a_missing_local_file(hub: StandInHub, tmp_path: Path) -> None:
    hub.weights.discard("yolov8n.pt")
    report = online(hub, base_config())
    assert len(report.problems) == 1 and "models.yolo='yolov8n.pt'" in report.problems[0] and "HTTP 404" in report.problems[0]

    missing = tmp_path / "pt_inception.pth"
    report = online(hub, base_config(f"evaluation.inception_weights={missing}", "models.yolo=yolov8n.yaml"))
    assert len(report.problems) == 1 and f"evaluation.inception_weights='{missing}' is not a file" in report.problems[0]


def test_download_larger_than_the_free_space(hub: StandInHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_check.shutil, "disk_usage", lambda path: type("Usage", (), {"free": GB})())
    report = online(hub, base_config())
    assert len(report.problems) == 1 and "GB free: free space or point HF_HUB_CACHE" in report.problems[0]


def test_an_unreachable_hub_is_one_line(hub: StandInHub, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as closed:  # a port nobody listens on once closed
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    report = online(hub, base_config())
    assert len(report.problems) == 1 and "the remaining models were not checked" in report.problems[0], report.problems


def test_offline_mode_says_so_and_the_cli_exits_1(hub: StandInHub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code = main(["doctor", "--config", str(REPO / "configs" / "base.yaml"), "--online", *OVERRIDES])
    text = capsys.readouterr().err.replace("\n", "")
    assert code == 1 and "HF_HUB_OFFLINE=1 is set: the online checks need the hub" in text and hub.requests == 0


def test_weight_files_are_those_the_loaders_take() -> None:
    # File names as in stable-diffusion-v1-5's unet/, xinsir's union ControlNet and BLIP-2's sharded checkpoint.
    unet = {f"unet/{name}": 1 for name in (
        "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.non_ema.safetensors",
        "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin", "config.json",
    )}
    assert hub_check._weight_files(unet, "unet", "fp16") == ["unet/diffusion_pytorch_model.fp16.safetensors"]
    assert hub_check._weight_files(unet, "unet", None) == ["unet/diffusion_pytorch_model.safetensors"]
    union = {"diffusion_pytorch_model.safetensors": 1, "diffusion_pytorch_model_promax.safetensors": 1, "v1-5-pruned.safetensors": 1}
    assert hub_check._weight_files(union, "", "fp16") == ["diffusion_pytorch_model.safetensors"]
    shards = {"model-00001-of-00002.safetensors": 1, "model-00002-of-00002.safetensors": 1, "pytorch_model-00001-of-00002.bin": 1,
              "model.fp16-00001-of-00001.safetensors": 1}
    assert hub_check._weight_files(shards, "", None) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert hub_check._weight_files(shards, "", "fp16") == ["model.fp16-00001-of-00001.safetensors"]
    assert hub_check._weight_files({"diffusion_pytorch_model.bin": 1}, "", "fp16") == ["diffusion_pytorch_model.bin"]
