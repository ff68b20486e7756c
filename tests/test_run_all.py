"""The README's main job, `neu-det run-all --config configs/smoke.yaml`, and the commands around it."""

from __future__ import annotations

import csv
import gc
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
from conftest import REPO, SMOKE_CONFIG, smoke_overrides

from neu_det_pipeline.cli import COMMANDS, parse
from neu_det_pipeline.config import PipelineConfig, load_config
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.io import read_json
from neu_det_pipeline.models import quiet_library_progress
from neu_det_pipeline import runner
from neu_det_pipeline.recipe import StepBusyError, run_step, step_lock
from neu_det_pipeline.runner import STEP_MODULES, StepFailed, select_steps
from neu_det_pipeline.training.diffusion import DiffusionComponents

# What third-party libraries print when nothing is wrong: tqdm bars ("Loading weights: 100%|...| 36/36 [...it/s]"),
# transformers' notices ("[transformers] The new embeddings will be initialized ..."), ultralytics' banners and
# library warnings about their own deprecations.
THIRD_PARTY_NOISE = (
    "it/s", "s/it", "[transformers]", "Loading weights", "Writing model shards", "Loading pipeline components", "Ultralytics ",
    "UserWarning", "FutureWarning", "publisher trust check",
)


def assert_no_third_party_noise(output: str) -> None:
    found = [marker for marker in THIRD_PARTY_NOISE if marker in output]
    assert not found, f"third-party noise {found} in:\n{output[-3000:]}"


def neu_det(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neu_det_pipeline.cli", *args], capture_output=True, text=True, cwd=cwd)


def one_line(text: str) -> str:
    return text.replace("\n", "")


def test_run_all_in_bf16_interrupted_resumed_then_up_to_date(tiny_models_dir: Path, tmp_path: Path) -> None:
    """The smoke pipeline in bf16 (weights and autocast as on a GPU), killed, resumed while a second run on the same
    folder is turned away, then up to date."""
    out = tmp_path / "smoke"
    args = ["run-all", "--config", str(SMOKE_CONFIG), *smoke_overrides(tiny_models_dir, out), "run.mixed_precision=bf16"]
    command = [sys.executable, "-m", "neu_det_pipeline.cli", *args]

    # Killed as soon as Step 2 has finished, like a job whose node went away: its step locks stay behind.
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (out / "step2_captions" / "summary.json").is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (out / "step2_captions" / "summary.json").is_file()

    resumed = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    step0_lock = out / ".locks" / "step0_prepare.lock"
    while f'"pid": {resumed.pid},' not in step0_lock.read_text() and resumed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    second = neu_det(*args)  # the resumed run holds Step 0 to its end
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 2 and len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert f"step0_prepare: {out}/step0_prepare is in use by pid {resumed.pid}" in errors[0]
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"taking over the lock of pid {first.pid}" in one_line(stderr)
    for name in STEP_MODULES:
        summary = read_json(out / name / "summary.json")
        assert summary["status"] == "complete" and summary["config_hash"], name
        assert (out / name / "config.yaml").is_file() and (out / "logs" / f"{name}.log").is_file(), name
        # Measured on the models where a step has them: the frozen UNet, the generation pipeline, autocast.
        expected = None if name == "step0_prepare" else {"clip": "bf16", "dinov3": "bf16"} if name == "step5_evaluate" else "bf16"
        assert summary["dtype"] == expected, name
    for name in ("step1_textual_inversion", "step3_lora"):
        assert math.isfinite(read_json(out / name / "summary.json")["final_loss"]), name
    history = list(csv.DictReader((out / "step6_classifier" / "metrics.csv").open()))
    assert history and all(math.isfinite(float(row["train_loss"])) for row in history)
    for name in ("step0_prepare", "step1_textual_inversion", "step2_captions"):
        assert f"{name}: up to date" in one_line(stderr)
    assert "step3_lora: up to date" not in one_line(stderr)
    # One table, the dtype and a key figure per step, the report's path.
    assert re.search(r"step4_generate +│ +complete +│ +[\d.]+ +│ +bf16 +│ +36 synthetic images", stderr), stderr[-3000:]
    assert f"report: {out}/step5_evaluate/report.html" in one_line(stderr)
    # Every arm is shown: the smoke split keeps the whole training split, so the oracle says why it did not run.
    assert list(read_json(out / "step5_evaluate" / "metrics.json")["utility"]["arms_not_run"]) == ["oracle"]
    assert "Not run: oracle: no held-back real images" in (out / "step5_evaluate" / "report.html").read_text()
    assert re.search(r"cost of the run \(every finished step, see `neu-det compare`\): [\d.]+ (s|min) over 7 steps, 0\.0000 GPU-h, peak RAM", one_line(stderr))
    log = (out / "logs" / "step3_lora.log").read_text()
    assert "step3_lora summary" in log and "final_loss" in log  # the step's own output, recorded
    assert_no_third_party_noise(stdout + stderr)

    again = neu_det(*args)
    assert again.returncode == 0
    assert one_line(again.stderr).count(": up to date in") == len(STEP_MODULES)
    assert "taking over" not in again.stderr  # the resumed run released its locks

    forced = neu_det(*args, "--only", "step2_captions", "--force", "step2_captions")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "step2_captions: up to date" not in one_line(forced.stderr) and "step0_prepare" not in forced.stderr
    assert not read_json(out / "step2_captions" / "summary.json").get("up_to_date")


def test_run_all_frees_the_previous_steps_models(make_config, step0_sample_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Step 1's UNet and text encoder are gone when Step 2 starts, although accelerate's wrapped forward makes a
    reference cycle (automatic collection is off here, so only the runner's own freeing can free them)."""
    out = tmp_path / "run"
    shutil.copytree(step0_sample_dir, out)
    config = make_config(output_dir=out)
    models: list[weakref.ref] = []
    place = DiffusionComponents.place

    def recording_place(self, *args, **kwargs):
        models.extend(weakref.ref(module) for module in (self.unet, *self.text_encoders))
        return place(self, *args, **kwargs)

    alive_at_step2: list[bool] = []

    def check_then_stop(step, *args):
        if step.name != "step2_captions":
            return run_step(step, *args)
        alive_at_step2.extend(ref() is not None for ref in models)
        raise RuntimeError("checked")

    monkeypatch.setattr(DiffusionComponents, "place", recording_place)
    monkeypatch.setattr(runner, "run_step", check_then_stop)
    gc.disable()
    try:
        with pytest.raises(StepFailed, match="checked"):
            runner.run_all(config, ["step0_prepare", "step1_textual_inversion", "step2_captions"])
    finally:
        gc.enable()
    assert alive_at_step2 == [False] * len(models) and len(models) == 2


def test_step_selection() -> None:
    assert select_steps() == list(STEP_MODULES)
    assert select_steps(from_step="step4_generate") == ["step4_generate", "step5_evaluate", "step6_classifier"]
    assert select_steps(only="step6_classifier,step2_captions") == ["step2_captions", "step6_classifier"]  # run order
    with pytest.raises(PipelineError, match="unknown step step9"):
        select_steps(only="step9")
    with pytest.raises(PipelineError, match="exclude each other"):
        select_steps(from_step="step1_textual_inversion", only="step2_captions")


def test_failing_step_stops_with_its_name_error_and_log(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = neu_det("run-all", "--config", str(SMOKE_CONFIG), f"run.output_dir={out}", f"data.root={tmp_path / 'missing'}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    log = out / "logs" / "step0_prepare.log"
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "step0_prepare failed" in errors[0] and "data.root" in one_line(result.stderr) and str(log) in one_line(result.stderr)
    assert "DataError" in log.read_text() and not (out / "step1_textual_inversion").exists()


def test_run_all_script_stops_at_the_failing_step_with_its_log(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(REPO / "steps" / "run_all.sh"), str(SMOKE_CONFIG), f"run.output_dir={out}", f"data.root={tmp_path / 'missing'}"],
        capture_output=True, text=True, cwd=REPO, env=env,
    )
    log = out / "logs" / "step0_prepare.log"
    assert result.returncode == 1 and f"error: step0_prepare failed; its output is in {log}" in result.stderr, result.stderr
    assert "does not exist" in log.read_text() and "=== step1" not in result.stdout


def test_list_steps_names_launchers() -> None:
    result = neu_det("list-steps")
    lines = result.stdout.split("\n")
    assert result.returncode == 0 and [line.split()[0] for line in lines if line] == list(STEP_MODULES)
    launchers = dict(line.split() for line in lines if line)
    assert launchers["step1_textual_inversion"] == launchers["step3_lora"] == launchers["step4_generate"] == "accelerate"
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


# ------------------------------------------------------------------------------------ doctor, reuse


def test_doctor_offline(tiny_models_dir: Path, tmp_path: Path) -> None:
    smoke = neu_det("doctor", "--config", str(SMOKE_CONFIG), *smoke_overrides(tiny_models_dir, tmp_path))
    assert smoke.returncode == 0 and "no problem found" in smoke.stderr, smoke.stderr[-3000:]
    assert "offline mode (HF_HUB_OFFLINE=1)" in one_line(smoke.stderr) and "local folder" in smoke.stderr

    # Gated with manual approval: the transformers DINOv3 repos (timm's are not: tests/test_doctor_online.py).
    base = neu_det("doctor", "--config", str(REPO / "configs" / "base.yaml"), "models.dinov3=facebook/dinov3-vits16-pretrain-lvd1689m")
    problems = [line for line in base.stderr.splitlines() if line.startswith("problem:")]
    assert base.returncode == 1 and problems, base.stderr[-3000:]
    assert any("models.sd15='stable-diffusion-v1-5/stable-diffusion-v1-5'" in line and "hf download" in line for line in problems)
    assert any("models.dinov3" in line and "gated" in line for line in problems)


@pytest.mark.parametrize(
    ("backbone", "repo", "fix"),
    [("dinov3-b", "timm/vit_base_patch16_dinov3.lvd1689m", "set classifier.backbone=dinov3 and models.dinov3 to its folder"),
     ("timm:resnet10t", "timm/resnet10t.c3_in1k", "set classifier.pretrained=false")],
)
def test_doctor_names_the_fix_for_a_missing_classifier_backbone(
    backbone: str, repo: str, fix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    from neu_det_pipeline import doctor

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    config = load_config(REPO / "configs" / "base.yaml", [f"classifier.backbone={backbone}", "classifier.pretrained=true"])
    [need] = [need for need in doctor.model_needs(config) if need.key == "classifier.backbone"]
    doctor.locate(need, downloads=False)
    assert need.model_id == repo and f"`hf download {repo}`" in need.problem
    assert need.problem.endswith(f"or {fix}"), need.problem


def test_reuse_links_only_steps_with_the_same_fingerprint(step0_sample_dir: Path, tmp_path: Path) -> None:
    common = ["--config", str(SMOKE_CONFIG), f"data.root={REPO / 'data' / 'neu-det-sample'}", "run.tiny_models_dir=null"]
    same = neu_det("reuse", *common, str(step0_sample_dir), f"run.output_dir={tmp_path / 'same'}")
    assert same.returncode == 0 and "reused step0_prepare" in same.stderr, same.stderr
    summary = read_json(tmp_path / "same" / "step0_prepare" / "summary.json")
    assert summary["reused_from"] == str(step0_sample_dir / "step0_prepare")
    assert load_config(tmp_path / "same" / "step0_prepare" / "config.yaml").run.output_dir == tmp_path / "same"
    assert read_json(step0_sample_dir / "step0_prepare" / "summary.json").get("reused_from") is None  # source untouched

    other = neu_det("reuse", *common, str(step0_sample_dir), f"run.output_dir={tmp_path / 'other'}", "prepare.resolution=32")
    assert other.returncode == 0 and "nothing to reuse" in other.stderr and not (tmp_path / "other" / "step0_prepare").exists()


def test_force_and_reuse_leave_a_step_another_process_runs_alone(step0_sample_dir: Path, tmp_path: Path) -> None:
    """`--force` forgets and `neu-det reuse` replaces a step's outputs only under its lock (a second open file
    description of the lock file conflicts with the first within one process too, as a second process's would)."""
    def config(out: Path) -> PipelineConfig:
        return load_config(SMOKE_CONFIG, [f"data.root={REPO / 'data' / 'neu-det-sample'}", "run.tiny_models_dir=null", f"run.output_dir={out}"])

    finished = tmp_path / "finished"
    shutil.copytree(step0_sample_dir, finished)
    busy = config(finished)
    with step_lock(busy, "step0_prepare"), pytest.raises(StepBusyError, match="step0_prepare: .* is in use by pid"):
        runner.run_all(busy, ["step0_prepare"], force=["step0_prepare"])
    assert read_json(finished / "step0_prepare" / "summary.json")["status"] == "complete"  # not forgotten

    other = config(tmp_path / "other")
    with step_lock(other, "step0_prepare"), pytest.raises(StepBusyError):
        runner.reuse_finished_steps(other, [finished])
    assert not (tmp_path / "other" / "step0_prepare" / "summary.json").exists()
    assert runner.reuse_finished_steps(other, [finished]) == ["step0_prepare"]  # once the lock is free


# ------------------------------------------------------------------------------------------ docs

COMMAND_PATTERN = re.compile(r"^(?:[A-Z_]+=\S+ )*(neu-det|python -m neu_det_pipeline\.\w+|accelerate launch(?: [-\w]+)* -m neu_det_pipeline\.\w+|steps/\w+\.sh|python benchmarks/\w+\.py)(.*)$")


def documented_commands() -> list[tuple[str, str]]:
    """(file, command line) for every pipeline command in the README's and TRAINING_INSTRUCTIONS' code blocks."""
    commands = []
    for name in ("README.md", "TRAINING_INSTRUCTIONS.md"):
        blocks = re.findall(r"```bash\n(.*?)```", (REPO / name).read_text(), re.DOTALL)
        for line in (line.split("  #")[0].strip() for block in blocks for line in block.splitlines()):
            for part in line.split("&&"):
                if COMMAND_PATTERN.match(part.strip()):
                    commands.append((name, part.strip()))
    return commands


@pytest.mark.parametrize(("doc", "line"), documented_commands(), ids=lambda value: value if len(value) < 60 else value[:60])
def test_documented_command_parses(doc: str, line: str) -> None:
    words = shlex.split(line)
    while "=" in words[0]:  # VAR=value prefixes
        words.pop(0)
    program, rest = COMMAND_PATTERN.match(" ".join(words)).groups()
    args = shlex.split(rest)
    if program.startswith("python benchmarks/"):
        assert (REPO / program.split()[1]).is_file(), f"{doc}: {line}"
        return
    if program == "neu-det":
        parsed = parse(args)
        assert parsed.command in COMMANDS
        config, overrides = getattr(parsed, "config", None), getattr(parsed, "overrides", [])
    elif program.startswith("steps/"):
        assert (REPO / program).is_file(), f"{doc}: {line}"
        script_args = args[1:] if program.endswith("run_step.sh") else args
        if program.endswith("run_step.sh"):
            assert args[0] in STEP_MODULES, f"{doc}: {line}"
        config = None if program.endswith("run_ab.sh") else Path(script_args[0])
        overrides = script_args if program.endswith("run_ab.sh") else script_args[1:]
    else:  # python -m / accelerate launch -m neu_det_pipeline.<step>
        step = program.rsplit(".", 1)[1]
        assert step in STEP_MODULES or step == "cli", f"{doc}: {line}"
        assert args[0] == "--config", f"{doc}: {line}"
        config, overrides = Path(args[1]), args[2:]
    if config is not None:
        assert (REPO / config).is_file(), f"{doc}: {line}: no config {config}"
        load_config(REPO / config, [o for o in overrides if "=" in o])
    elif overrides:
        load_config(REPO / "configs" / "base.yaml", overrides)


def test_docs_show_the_commands_that_matter() -> None:
    shown = " ".join(line for _, line in documented_commands())
    for command in ("neu-det run-all", "neu-det doctor", "steps/run_all.sh", "steps/run_ab.sh", "neu-det compare", "neu-det predict"):
        assert command in shown, command


def test_sd3_configs_skip_the_training_steps_unless_named(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    sd3 = REPO / "configs" / "experiments" / "exp_e_sd3.yaml"
    listed = neu_det("list-steps", "--config", str(sd3))
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [
        name for name in STEP_MODULES if name not in ("step1_textual_inversion", "step3_lora")]
    assert runner.inapplicable_steps(load_config(SMOKE_CONFIG)) == {}  # SD 1.5: every step has work

    ran: list[list[str]] = []
    monkeypatch.setattr(runner, "run_all", lambda config, steps, force: ran.append(steps))
    COMMANDS["run-all"].run(parse(["run-all", "--config", str(sd3)]))
    assert "skipping step1_textual_inversion, step3_lora: models.pipeline=sd3 is Step 4 only" in capsys.readouterr().err
    COMMANDS["run-all"].run(parse(["run-all", "--config", str(sd3), "--only", "step3_lora"]))  # asked for: runs, and refuses itself
    assert ran == [["step0_prepare", "step2_captions", "step4_generate", "step5_evaluate", "step6_classifier"], ["step3_lora"]]


def test_offline_configs_put_the_hub_in_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/smoke.yaml (`run.offline: true`): no hub request from any library, including those that ask at
    import; huggingface_hub reads the variable when imported, so an already imported one gets its flag set too."""
    import argparse

    from huggingface_hub import constants

    from neu_det_pipeline.cli import setup

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    setup(argparse.Namespace(config=REPO / "configs" / "base.yaml", overrides=[]))
    assert "HF_HUB_OFFLINE" not in os.environ and not constants.HF_HUB_OFFLINE
    setup(argparse.Namespace(config=SMOKE_CONFIG, overrides=["run.tiny_models_dir=null"]))
    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE
