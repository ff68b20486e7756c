"""Config schema, layering, overrides and the one-line errors users see."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SMOKE_CONFIG

from neu_det_pipeline.config import PipelineConfig, config_hash, load_config
from neu_det_pipeline.errors import ConfigError

ALL_CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key not in ("initializer_words", "class_keywords", "per_class_guidance", "conditioning_scales"):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_validates(path: Path) -> None:
    assert isinstance(load_config(path), PipelineConfig)


def test_base_yaml_spells_out_every_default() -> None:
    base = yaml.safe_load((REPO / "configs" / "base.yaml").read_text())
    assert base == PipelineConfig().to_dict()


def test_base_yaml_comments_every_key() -> None:
    for line in (REPO / "configs" / "base.yaml").read_text().splitlines():
        if line.startswith(" ") and ":" in line:
            assert " # " in line, f"base.yaml key without a comment: {line.strip()}"


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_experiments_hold_only_their_differences(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    assert raw.pop("extends") == "../base.yaml"
    base = _leaves(PipelineConfig().to_dict())
    for key, value in _leaves(raw).items():
        assert key in base, f"{path.name}: {key} is not a config key"
        assert value != base[key], f"{path.name}: {key} repeats the base value {value!r}"


def test_experiment_plan() -> None:
    exp = {p.stem: load_config(p) for p in (REPO / "configs" / "experiments").glob("*.yaml")}
    assert exp["baseline"].captions.prompt_style == "plain" and exp["baseline"].models.pipeline == "sd15"
    assert exp["exp_a_blip2_unipc"].captions.prompt_style == "blip2"
    assert exp["exp_a_blip2_unipc"].generation.scheduler == "unipc"
    assert exp["exp_b_dora_8bit"].lora.use_dora and exp["exp_b_dora_8bit"].lora.optimizer == "adamw8bit"
    c = exp["exp_c_sdxl_all"]
    assert c.models.pipeline == "sdxl" and c.lora.use_dora and c.generation.scheduler == "unipc"

    # Step 4, the seed plan's A/B set: the baseline keeps DPM++ at 40 steps, guidance 7, soft-edge + depth.
    base = exp["baseline"].generation
    assert (base.scheduler, base.num_inference_steps, base.guidance_scale, base.controls) == ("dpmsolver++", 40, 7.0, ["softedge", "depth"])
    assert not base.layout_augmentations and base.guidance_rescale == 0
    per_class = {"crazing": 8.0, "inclusion": 7.5, "patches": 7.0, "pitted_surface": 8.5, "rolled-in_scale": 7.0, "scratches": 8.0}
    for name in ("exp_a_blip2_unipc", "exp_c_sdxl_all"):
        generation = exp[name].generation
        assert (generation.scheduler, generation.num_inference_steps, generation.guidance_rescale) == ("unipc", 20, 0.7), name
        assert {cls: generation.per_class_guidance.get(cls, generation.guidance_scale) for cls in per_class} == per_class, name
    assert "normal" in c.generation.controls and c.generation.union_controlnet
    assert len({str(cfg.run.output_dir) for cfg in exp.values()}) == len(exp), "experiments must not share outputs"


def test_extends_and_overrides_layer_in_order(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {SMOKE_CONFIG}\nrun:\n  seed: 5\nlora:\n  target_modules: [to_q]\n")
    config = load_config(child, ["run.seed=7", "data.split.val=0.2", "data.split.train=0.65", "captions.top_k=2"])
    assert config.run.seed == 7  # command line beats the file
    assert config.lora.target_modules == ["to_q"]  # lists are replaced, not merged
    assert config.prepare.resolution == 64  # from smoke.yaml
    assert config.models.clip == "openai/clip-vit-large-patch14" or config.models.clip.endswith("clip")
    assert config.data.split.val == 0.2


def test_typo_in_file_names_key_file_and_allowed_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {SMOKE_CONFIG}\ndata:\n  rooot: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    message = str(info.value)
    assert "unknown config key 'data.rooot'" in message and str(bad) in message
    assert "root" in message and "layout" in message and "strict" in message
    assert "\n" not in message


def test_wrong_type_on_command_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE_CONFIG, ["run.seed=abc"])
    assert "'run.seed'" in str(info.value) and "the command line" in str(info.value) and "integer" in str(info.value)


def test_wrong_choice_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE_CONFIG, ["models.pipeline=sd4"])
    assert "'models.pipeline'" in str(info.value) and "'sd15', 'sdxl' or 'sd3'" in str(info.value)


def test_wrong_type_in_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {SMOKE_CONFIG}\nprepare:\n  resolution: big\n")
    with pytest.raises(ConfigError, match=r"'prepare.resolution' in .*bad.yaml"):
        load_config(bad)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("run: [1, 2", "not valid YAML"),
        ("- a\n- b\n", "must hold a mapping"),
        ("extends: missing.yaml\n", "not found"),
        ("data:\n  split:\n    train: 0.9\n", "sum to 1"),
    ],
)
def test_broken_files(tmp_path: Path, content: str, expected: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    with pytest.raises(ConfigError, match=expected):
        load_config(bad)


def test_extends_cycle_is_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")


def test_override_without_equals_is_rejected() -> None:
    with pytest.raises(ConfigError, match="key.subkey=value"):
        load_config(SMOKE_CONFIG, ["run.seed"])


def test_hash_is_stable_and_sensitive() -> None:
    a, b = load_config(SMOKE_CONFIG), load_config(SMOKE_CONFIG)
    assert config_hash(a.to_dict()) == config_hash(b.to_dict())
    assert config_hash(load_config(SMOKE_CONFIG, ["run.seed=1"]).to_dict()) != config_hash(a.to_dict())


def test_cli_prints_one_line_not_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "neu_det_pipeline.step0_prepare", "--config", str(SMOKE_CONFIG), "data.rooot=x"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown config key 'data.rooot'" in lines[0], result.stderr


@pytest.mark.parametrize(
    "override, expected",
    [
        ("textual_inversion.templates=['a photo of {token}', 'a photo of steel']",
         r"textual_inversion\.templates\[1\]='a photo of steel' must contain \{token\} \(set in the command line\)"),
        ("captions.template=a photo of {tokn}", r"captions\.template='a photo of \{tokn\}' is not a valid template"),
        ("models.open_clip=ViT-H-14", r"models\.open_clip='ViT-H-14' must be `hf-hub:org/repo` or `local-dir:path`"),
    ],
)
def test_templates_and_model_sources_are_checked_when_the_config_loads(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(SMOKE_CONFIG, [override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "override, key",
    [("data.classes=[]", "data.classes"), ("generation.controls=[depth,depth]", "generation.controls"),
     ("generation.seeds=[3,3]", "generation.seeds"), ("evaluation.utility.seeds=[]", "evaluation.utility.seeds"),
     ("evaluation.features=[clip,clip]", "evaluation.features")],
)
def test_lists_that_count_each_entry_once_refuse_repeats_and_emptiness(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=\[.*\] must be a non-empty list of distinct "):
        load_config(SMOKE_CONFIG, [override])


def test_errors_name_the_layer_that_set_the_bad_value(tmp_path: Path) -> None:
    parent, child = tmp_path / "parent.yaml", tmp_path / "child.yaml"
    parent.write_text("prepare:\n  resolution: big\n")
    child.write_text("extends: parent.yaml\nprepare:\n  workers: 1\n")  # same section, another key
    with pytest.raises(ConfigError, match=r"'prepare.resolution' in .*parent\.yaml"):
        load_config(child)
    with pytest.raises(ConfigError, match=r"sum to 1.*\(set in the command line\)"):
        load_config(child, ["prepare.resolution=64", "data.split.train=0.9"])


BASE = REPO / "configs" / "base.yaml"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # No SDXL ControlNet is trained on HED/PiDiNet soft edges alone: the default is null, and the line says what to do.
        (["models.pipeline=sdxl"], r"generation\.controls has 'softedge' but models\.controlnet_sdxl\.softedge is null: set it to "
                                   r"a sdxl ControlNet trained on hed maps, .* or set generation\.union_controlnet=true"),
        # A ControlNet trained on maps no detector makes is not fed HED maps silently.
        (["models.pipeline=sdxl", "models.controlnet_sdxl.softedge=SargeZT/controlnet-sd-xl-1.0-softedge-dexined",
          "generation.detectors.softedge=pidinet"],
         r"models\.controlnet_sdxl\.softedge='SargeZT/controlnet-sd-xl-1\.0-softedge-dexined' was trained on DexiNed edges, "
         r"not the pidinet maps generation\.detectors\.softedge makes: .* generation\.union_controlnet=true"),
    ],
)
def test_sdxl_soft_edges_need_a_controlnet_trained_on_them(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(BASE, overrides)
    assert "\n" not in str(info.value)


def test_sdxl_soft_edges_run_on_the_union_controlnet_or_an_explicit_checkpoint() -> None:
    union = load_config(BASE, ["models.pipeline=sdxl", "generation.union_controlnet=true"])
    assert union.controlnet_ids() == {"union": ("models.controlnet_union_sdxl", "xinsir/controlnet-union-sdxl-1.0")}
    own = load_config(BASE, ["models.pipeline=sdxl", "models.controlnet_sdxl.softedge=/models/my-sdxl-hed-controlnet"])
    assert own.controlnet_ids()["softedge"] == ("models.controlnet_sdxl.softedge", "/models/my-sdxl-hed-controlnet")
    experiment = load_config(REPO / "configs" / "experiments" / "exp_c_sdxl_all.yaml")
    assert experiment.generation.union_controlnet and "softedge" in experiment.generation.controls
