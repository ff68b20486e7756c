"""The README's main job: `neu-det run-all --config configs/smoke.yaml`, offline, on CPU."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from conftest import REPO, SMOKE_CONFIG, smoke_overrides

from neu_det_pipeline.cli import STEP_MODULES
from neu_det_pipeline.io import read_json
from neu_det_pipeline.models import quiet_library_progress

# What third-party libraries print when nothing is wrong: tqdm bars ("Loading weights: 100%|...| 36/36 [...it/s]")
# and transformers' notices ("[transformers] The new embeddings will be initialized ...").
THIRD_PARTY_NOISE = ("it/s]", "s/it]", "[transformers]", "Loading weights", "Writing model shards", "Loading pipeline components")


def assert_no_third_party_noise(output: str) -> None:
    found = [marker for marker in THIRD_PARTY_NOISE if marker in output]
    assert not found, f"third-party noise {found} in:\n{output[-3000:]}"


def neu_det(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neu_det_pipeline.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_run_all_smoke_then_rerun_is_up_to_date(tiny_models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    args = ["run-all", "--config", str(SMOKE_CONFIG), *smoke_overrides(tiny_models_dir, out)]
    first = neu_det(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    for name in STEP_MODULES:
        summary = read_json(out / name / "summary.json")
        assert summary["status"] == "complete" and summary["config_hash"]
        assert (out / name / "config.yaml").is_file()
        assert f"{out / name}/summary.json" in first.stderr.replace("\n", "")
    assert f"all outputs in {out}" in first.stderr.replace("\n", "")
    assert_no_third_party_noise(first.stdout + first.stderr)

    second = neu_det(*args)
    assert second.returncode == 0
    assert second.stderr.count("up to date") >= len(STEP_MODULES)


def test_list_steps_names_launchers() -> None:
    result = neu_det("list-steps")
    lines = result.stdout.split("\n")
    assert result.returncode == 0 and [line.split()[0] for line in lines if line] == list(STEP_MODULES)
    launchers = dict(line.split() for line in lines if line)
    assert launchers["step1_textual_inversion"] == launchers["step3_lora"] == "accelerate"
    assert launchers["step0_prepare"] == launchers["step2_captions"] == "python"


def test_run_step_script_rejects_unknown_step(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(REPO / "steps" / "run_step.sh"), "step9_nothing", str(SMOKE_CONFIG)],
        capture_output=True, text=True, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
    )
    assert result.returncode == 2 and "unknown step 'step9_nothing'" in result.stderr


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = neu_det("run-all", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr


def test_tiny_models_command_builds_hub_layout_folders(tmp_path: Path) -> None:
    result = neu_det("tiny-models", str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "tiny" / "sd15" / "model_index.json").is_file()
    assert (tmp_path / "tiny" / "clip" / "config.json").is_file()
    assert str(tmp_path / "tiny" / "sd15") in result.stderr
    assert_no_third_party_noise(result.stdout + result.stderr)


def test_quieting_drops_only_the_known_notice() -> None:
    quiet_library_progress()
    logger = logging.getLogger("transformers.modeling_utils")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("The new embeddings will be initialized from a multivariate normal distribution ...")
        logger.warning("Some weights of CLIPTextModel were not initialized from the model checkpoint")
    finally:
        logger.removeHandler(handler)
    assert [record.getMessage() for record in records] == ["Some weights of CLIPTextModel were not initialized from the model checkpoint"]
