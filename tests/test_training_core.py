"""The shared training core on its own: checkpoints, LR schedules, data order."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from neu_det_pipeline.config import LoraConfigSection, TextualInversionConfig
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.training.data import SeededOrderSampler
from neu_det_pipeline.training.diffusion import denoising_loss, encode_prompts, load_components
from neu_det_pipeline.training.loop import (
    Checkpoints,
    make_lr_scheduler,
    training_config_keys,
)
from neu_det_pipeline.training.reporting import save_validation_grid


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1.0)


def test_checkpoints_keep_the_newest_and_restore_everything(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path / "checkpoints", limit=2)
    optimizer = _optimizer()
    scheduler = make_lr_scheduler("constant_with_warmup", optimizer, warmup_steps=4, total_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=1234.0)
    for step in (1, 2, 3):
        optimizer.step()
        scheduler.step()
        checkpoints.save(step, {"w": torch.full((3,), float(step))}, optimizer, scheduler, [0.5] * step, scaler)
    assert [p.name for p in checkpoints.all()] == ["checkpoint-2", "checkpoint-3"]
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))

    fresh_optimizer = _optimizer()
    fresh_scheduler = make_lr_scheduler("constant_with_warmup", fresh_optimizer, warmup_steps=4, total_steps=10)
    fresh_scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    step, tensors, losses = Checkpoints.load(checkpoints.find("latest"), fresh_optimizer, fresh_scheduler, fresh_scaler)
    assert step == 3 and losses == [0.5] * 3 and torch.equal(tensors["w"], torch.full((3,), 3.0))
    assert fresh_scheduler.state_dict()["last_epoch"] == 3
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(0.75)  # 3 of 4 warm-up steps
    assert fresh_scaler.get_scale() == 1234.0


def test_a_checkpoint_written_on_a_gpu_resumes_on_this_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.load puts each tensor back on the device it was saved from unless told otherwise: without a
    `map_location`, optimizer state written on `cuda:0` cannot load on a CPU (and lands on `cuda:0` on every rank)."""
    optimizer = _optimizer()
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
    optimizer.step()  # Adam moments now exist
    scheduler = make_lr_scheduler("constant", optimizer, warmup_steps=0, total_steps=10)
    with monkeypatch.context() as patch:
        # What torch.save writes for tensors on the first GPU.
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        saved = Checkpoints(tmp_path, limit=1).save(1, {"w": torch.ones(3)}, optimizer, scheduler, [0.5])
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(saved / "optimizer.pt", weights_only=True)

    fresh = _optimizer()
    Checkpoints.load(saved, fresh, make_lr_scheduler("constant", fresh, warmup_steps=0, total_steps=10), device="cpu")
    moments = fresh.state[fresh.param_groups[0]["params"][0]]
    assert moments["exp_avg"].device.type == "cpu"
    assert torch.equal(moments["exp_avg"], optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"])


def test_resume_names_are_checked(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path, limit=1)
    assert checkpoints.find(None) is None and checkpoints.find("latest") is None
    with pytest.raises(PipelineError, match="no such checkpoint .* use resume=latest"):
        checkpoints.find("checkpoint-7")


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "cosine_with_warmup", "onecycle"])
def test_every_configured_schedule_builds_and_warms_up(name: str) -> None:
    optimizer = _optimizer()
    scheduler = make_lr_scheduler(name, optimizer, warmup_steps=5, total_steps=20)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    if name == "constant":
        assert rates == [1.0] * 20
    else:
        assert rates[0] < rates[5] and max(rates) == pytest.approx(1.0, rel=1e-3)
    if name in ("cosine_with_warmup", "onecycle"):
        assert rates[-1] < 0.1


def test_data_order_depends_only_on_seed_and_position() -> None:
    full = list(SeededOrderSampler(dataset_size=5, num_samples=12, seed=3))
    assert [position for _, position in full] == list(range(12))
    assert sorted(index for index, _ in full[:5]) == list(range(5))  # each epoch is a permutation
    assert full == list(SeededOrderSampler(5, 12, 3))
    assert full != list(SeededOrderSampler(5, 12, 4))


def test_fingerprint_keys_leave_out_resume_and_checkpoint_cadence() -> None:
    for section, section_type in (("lora", LoraConfigSection), ("textual_inversion", TextualInversionConfig)):
        keys = training_config_keys(section)
        assert f"{section}.resume" not in keys and f"{section}.checkpointing_steps" not in keys
        assert f"{section}.learning_rate" in keys and "models.sd15" in keys
        assert f"{section}.num_workers" not in keys and f"{section}.gradient_checkpointing" not in keys
        assert len([k for k in keys if k.startswith(section)]) == len(section_type.model_fields) - len(section_type.RESUME_ONLY)


def test_the_vae_runs_outside_autocast_in_its_own_dtype(make_config, tmp_path: Path) -> None:
    """Training's latents and validation's images under the half-precision autocast a GPU run uses: the SDXL VAE,
    kept in fp32 because it overflows in fp16, must really compute in fp32 (bf16 here: CPU autocast's dtype)."""
    config = make_config("models.pipeline=sdxl")
    components = load_components(config)
    components.place(torch.device("cpu"), torch.bfloat16)
    assert components.vae.dtype == torch.float32
    seen: list[tuple[str, torch.dtype, torch.dtype]] = []
    for name, conv in (("encode", components.vae.encoder.conv_in), ("decode", components.vae.decoder.conv_out)):
        conv.register_forward_hook(lambda module, args, output, name=name: seen.append((name, args[0].dtype, output.dtype)))
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731  (what accelerate's autocast enters)

    with torch.no_grad(), autocast():
        hidden, added = encode_prompts(components, ["a photo of scratches"], 32, torch.device("cpu"))
        loss = denoising_loss(components, torch.rand(1, 3, 32, 32) * 2 - 1, hidden, added)
    assert torch.isfinite(loss)
    save_validation_grid(
        components, SimpleNamespace(autocast=autocast), ["a photo of scratches"], config.textual_inversion, 0, tmp_path, 1
    )
    assert {name for name, _, _ in seen} == {"encode", "decode"}
    assert all(inputs == outputs == torch.float32 for _, inputs, outputs in seen), seen
