"""Box-weighted diffusion losses of Steps 1 and 3 (`loss_weighting`: uniform, box, box_weighted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from test_step3_lora import step3_config  # noqa: F401  (fixture: a smoke config with Steps 0-2 in place)

from neu_det_pipeline.io import read_json
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.training import diffusion
from neu_det_pipeline.training.data import DefectImageDataset, box_area_map, collate
from neu_det_pipeline.training.diffusion import (
    box_loss_weights,
    denoising_loss,
    encode_prompts,
    load_components,
    weighted_mse,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quarter_box_areas(batch: int, size: int) -> torch.Tensor:
    """Box-area maps (batch, 1, size, size) of one box over the top-left quarter (area 0.25)."""
    areas = torch.zeros(batch, 1, size, size)
    areas[:, :, : size // 2, : size // 2] = 0.25
    return areas


def test_box_weights_by_hand() -> None:
    areas = quarter_box_areas(1, 8)  # latent 4x4: the 2x2 top-left latent pixels are inside, 12 outside
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[:2, :2] = True

    box = box_loss_weights(areas, (4, 4), "box")[0, 0]
    # 1 inside, 0 outside, mean 4/16: divided by it, 4 inside.
    assert torch.equal(box, torch.where(inside, 4.0, 0.0))

    weighted = box_loss_weights(areas, (4, 4), "box_weighted", foreground_weight=3.0)[0, 0]
    # 3 inside, 1 outside, mean (4*3 + 12) / 16 = 1.5.
    torch.testing.assert_close(weighted, torch.where(inside, 2.0, 1 / 1.5))

    area = box_loss_weights(areas, (4, 4), "box_weighted", foreground_weight=3.0, foreground_area_exponent=0.5)[0, 0]
    # GeoDiffusion's area mode: 3 / 0.25^0.5 = 6 inside, 1 outside, mean (4*6 + 12) / 16 = 2.25.
    torch.testing.assert_close(area, torch.where(inside, 6 / 2.25, 1 / 2.25))
    for weights in (box, weighted, area):
        torch.testing.assert_close(weights.mean(), torch.tensor(1.0))


def test_a_latent_pixel_partly_covered_gets_the_mean_of_its_pixels() -> None:
    areas = torch.zeros(1, 1, 4, 4)
    areas[0, 0, :3, :3] = 9 / 16  # a 3x3 box; latent 2x2 cells cover 4, 2, 2 and 1 of its pixels
    weights = box_loss_weights(areas, (2, 2), "box")[0, 0]
    coverage = torch.tensor([[1.0, 0.5], [0.5, 0.25]])
    torch.testing.assert_close(weights, coverage / coverage.mean())


def test_an_image_without_boxes_keeps_uniform_weights() -> None:
    assert torch.equal(box_loss_weights(torch.zeros(2, 1, 8, 8), (4, 4), "box"), torch.ones(2, 1, 4, 4))


def test_weighted_mse_is_the_hand_computed_weighted_mean_and_box_leaves_the_background_without_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(2, 4, 4, 4, generator=generator, requires_grad=True)
    target = torch.randn(2, 4, 4, 4, generator=generator)
    weights = box_loss_weights(quarter_box_areas(2, 8), (4, 4), "box")
    snr = torch.tensor([0.5, 2.0])

    loss = weighted_mse(prediction, target, weights, snr)
    p, t, w = prediction.detach().numpy(), target.numpy(), weights.numpy()
    by_hand = np.mean([snr[b].item() * np.mean([w[b, 0, y, x] * (p[b, c, y, x] - t[b, c, y, x]) ** 2
                                                for c in range(4) for y in range(4) for x in range(4)])
                       for b in range(2)])
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # `box` is the mean squared error over the box's latent pixels alone.
    inside_mean = ((prediction - target)[:, :, :2, :2] ** 2).mean(dim=(1, 2, 3))
    assert loss.item() == pytest.approx((inside_mean * snr).mean().item(), rel=1e-6)

    loss.backward()
    assert torch.all(prediction.grad[:, :, 2:, :] == 0) and torch.all(prediction.grad[:, :, :, 2:] == 0)
    assert torch.all(prediction.grad[:, :, :2, :2] != 0)


@pytest.mark.parametrize(
    ("pipeline", "prediction_type", "snr_gamma"), [("sd15", "epsilon", None), ("sdxl", "v_prediction", 5.0)]
)
def test_the_training_loss_weights_the_unet_error_by_the_boxes(
    make_config, pipeline: str, prediction_type: str, snr_gamma: float | None
) -> None:
    """The real loss on tiny models: the UNet's error weighted by the box weights (and Min-SNR), and no gradient
    reaches the prediction outside the box, with epsilon (SD 1.5) and v-prediction (SDXL) targets."""
    components = load_components(make_config(f"models.pipeline={pipeline}"))
    scheduler = DDPMScheduler.from_config(components.noise_scheduler.config, prediction_type=prediction_type)
    components.noise_scheduler = scheduler
    seen: dict[str, torch.Tensor] = {}
    add_noise = scheduler.add_noise

    def record_noise(latents, noise, timesteps):
        seen.update(latents=latents, noise=noise, timesteps=timesteps)
        return add_noise(latents, noise, timesteps)

    def keep_prediction(module, args, kwargs, output):
        output.sample.retain_grad()
        seen["prediction"] = output.sample

    scheduler.add_noise = record_noise
    components.unet.conv_out.requires_grad_(True)  # something trained, so that gradients reach the prediction
    components.unet.register_forward_hook(keep_prediction, with_kwargs=True)
    hidden, added = encode_prompts(components, ["scratches", "patches"], 32, torch.device("cpu"))
    torch.manual_seed(0)
    loss = denoising_loss(
        components, torch.rand(2, 3, 32, 32) * 2 - 1, hidden, added, snr_gamma=snr_gamma,
        box_areas=quarter_box_areas(2, 32), loss_weighting="box_weighted", foreground_weight=3.0,
    )
    loss.backward()

    latents, noise, timesteps, prediction = seen["latents"], seen["noise"], seen["timesteps"], seen["prediction"]
    size = latents.shape[-1]
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[: size // 2, : size // 2] = True
    weights = torch.where(inside, 2.0, 1 / 1.5)  # 3 inside, 1 outside, a quarter inside: mean 1.5
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    if prediction_type == "epsilon":
        target = noise
    else:
        target = alpha_bar.sqrt().view(-1, 1, 1, 1) * noise - (1 - alpha_bar).sqrt().view(-1, 1, 1, 1) * latents
    per_image = (weights * (prediction.detach().float() - target) ** 2).mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        snr = alpha_bar / (1 - alpha_bar)
        per_image = per_image * torch.clamp(snr, max=snr_gamma) / (snr + 1)
    assert loss.item() == pytest.approx(per_image.mean().item(), rel=1e-5)

    # Under `box`, the same batch gives no gradient to any latent pixel outside the box.
    prediction.grad = None
    seen.clear()
    denoising_loss(
        components, torch.rand(2, 3, 32, 32) * 2 - 1, hidden, added, snr_gamma=snr_gamma, box_areas=quarter_box_areas(2, 32), loss_weighting="box",
    ).backward()
    grad = seen["prediction"].grad
    assert torch.all(grad[..., ~inside] == 0) and torch.all(grad[..., inside] != 0)


def test_box_area_map_scales_the_boxes_and_keeps_the_smallest_area() -> None:
    boxes = [
        {"label": "patches", "xmin": 0, "ymin": 0, "xmax": 100, "ymax": 100},
        {"label": "patches", "xmin": 50, "ymin": 50, "xmax": 75, "ymax": 75},
    ]
    areas = box_area_map(boxes, 200, 200, 8)  # scale 1/25: boxes [0, 4) and [2, 3) (rounded) on an 8 px grid
    assert areas[0, 0] == pytest.approx(16 / 64)
    assert areas[2, 2] == pytest.approx(1 / 64)  # inside both: the smaller box's area
    assert areas[5, 5] == 0 and (areas > 0).sum() == 16


def test_box_areas_move_with_every_flip_and_rotation(tmp_path: Path) -> None:
    """The image is white exactly inside its (asymmetric) box: after any augmentation the box-area channel must
    still cover exactly the white pixels."""
    pixels = np.zeros((32, 32), dtype=np.uint8)
    pixels[4:20, 2:10] = 255
    Image.fromarray(pixels).save(tmp_path / "a.png")
    row = {"id": "a", "class": "patches", "image": "a.png", "width": 32, "height": 32,
           "boxes": [{"label": "patches", "xmin": 2, "ymin": 4, "xmax": 10, "ymax": 20}]}
    dataset = DefectImageDataset(tmp_path, [row], 32, lambda row, rng: "p", seed=0, box_areas=True)
    layouts = set()
    for position in range(24):
        sample = collate([dataset[0, position]])
        white = sample["pixel_values"][0, 0] > 0
        areas = sample["box_areas"][0, 0]
        assert torch.equal(white, areas > 0)
        torch.testing.assert_close(areas[white], torch.full((int(white.sum()),), 128 / 1024))
        layouts.add(white.numpy().tobytes())
    assert len(layouts) == 8  # every flip / quarter-turn combination occurred
    assert "box_areas" not in DefectImageDataset(tmp_path, [row], 32, lambda row, rng: "p", seed=0)[0, 0]


def spy_on_box_weights(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Record the weights every training loss used."""
    used: list[torch.Tensor] = []
    real = diffusion.box_loss_weights

    def spy(*args, **kwargs):
        used.append(real(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr(diffusion, "box_loss_weights", spy)
    return used


def test_step1_trains_with_box_weighted_loss(
    tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_step1_textual_inversion import STEP, config_for, with_step0

    used = spy_on_box_weights(monkeypatch)
    out = with_step0(step0_sample_dir, tmp_path / "out")
    run_step(STEP, config_for(
        tiny_models_dir, out, "textual_inversion.max_train_steps=1", "textual_inversion.loss_weighting=box_weighted",
        "textual_inversion.foreground_weight=4",
    ))
    summary = read_json(out / STEP.name / "summary.json")
    assert summary["loss_weighting"] == "box_weighted" and np.isfinite(summary["final_loss"])
    assert used and all(w.max() > w.min() for w in used)  # the boxes really weighted the loss


def test_step3_trains_with_box_weighted_loss(step3_config, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from neu_det_pipeline.step3_lora import STEP

    used = spy_on_box_weights(monkeypatch)
    config = step3_config("lora.max_train_steps=1", "lora.loss_weighting=box_weighted", "lora.snr_gamma=5")
    run_step(STEP, config)
    summary = read_json(Path(config.run.output_dir) / STEP.name / "summary.json")
    assert summary["loss_weighting"] == "box_weighted" and np.isfinite(summary["final_loss"])
    assert used and all(w.max() > w.min() for w in used)


def test_unknown_weighting_is_refused() -> None:
    with pytest.raises(ValueError, match="loss weighting"):
        box_loss_weights(torch.zeros(1, 1, 4, 4), (2, 2), "boxes")
