"""Step 6 classifier parts: mask-guided pooling, losses as specified, backbones' feature grids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SMOKE_CONFIG
from safetensors.torch import load_file

from neu_det_pipeline.classifier.backbones import FeatureMapBackbone, TokenGridBackbone, backbone_from_spec, create_backbone
from neu_det_pipeline.classifier.losses import (
    DYNAMIC_EARLY,
    DYNAMIC_LATE,
    MultiTaskLoss,
    classification_loss,
    focal_loss,
    segmentation_loss,
)
from neu_det_pipeline.classifier.model import masked_average_pool
from neu_det_pipeline.config import ClassifierConfig, load_config
from neu_det_pipeline.errors import ConfigError, PipelineError

TINY_TIMM_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def classifier_config(**values) -> ClassifierConfig:
    return ClassifierConfig(**values)


def random_batch(seed: int = 0, batch: int = 4, classes: int = 6, side: int = 8):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    mask_logits = torch.randn(batch, 1, side, side, generator=generator)
    masks = (torch.rand(batch, 1, side, side, generator=generator) > 0.7).float()
    return logits, labels, mask_logits, masks


def test_masked_pooling_ignores_features_where_the_mask_is_zero() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 4, 4, generator=generator)
    weights = torch.rand(2, 1, 4, 4, generator=generator)
    weights[:, :, :2] = 0  # the top half of the grid is outside the mask
    changed = features.clone()
    changed[:, :, :2] = 1e3 * torch.randn(2, 5, 2, 4, generator=generator)

    pooled = masked_average_pool(features, weights)
    assert torch.equal(pooled, masked_average_pool(changed, weights))  # zero weight: no contribution at all
    expected = (features[:, :, 2:] * weights[:, :, 2:]).sum((2, 3)) / weights[:, :, 2:].sum((2, 3))
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(masked_average_pool(features, torch.zeros_like(weights)), torch.zeros(2, 5))


def test_dynamic_weights_switch_at_the_configured_epoch() -> None:
    loss = MultiTaskLoss(classifier_config(loss_weighting="dynamic", switch_epoch=3))
    assert [loss.weights(epoch) for epoch in range(5)] == [DYNAMIC_EARLY] * 3 + [DYNAMIC_LATE] * 2
    assert DYNAMIC_EARLY == (0.5, 1.0) and DYNAMIC_LATE == (1.0, 0.3)
    logits, labels, mask_logits, masks = random_batch()
    for epoch, (alpha, beta) in ((2, DYNAMIC_EARLY), (3, DYNAMIC_LATE)):
        parts = loss(logits, labels, mask_logits, masks, epoch)
        assert (parts.alpha, parts.beta) == (alpha, beta)
        torch.testing.assert_close(parts.total, alpha * parts.classification + beta * parts.segmentation)


def test_fixed_weights_and_the_plain_classifier() -> None:
    loss = MultiTaskLoss(classifier_config(loss_weighting="fixed", alpha=0.7, beta=2.0))
    logits, labels, mask_logits, masks = random_batch()
    parts = loss(logits, labels, mask_logits, masks, epoch=0)
    torch.testing.assert_close(parts.total, 0.7 * parts.classification + 2.0 * parts.segmentation)
    plain = loss(logits, labels, None, masks, epoch=0)  # no segmentation branch: classification alone
    assert torch.equal(plain.total, parts.classification) and plain.segmentation.item() == 0


def test_uncertainty_weighting_learns_log_variances() -> None:
    loss = MultiTaskLoss(classifier_config(loss_weighting="uncertainty"))
    with torch.no_grad():
        loss.log_vars.copy_(torch.tensor([0.3, -0.5]))
    logits, labels, mask_logits, masks = random_batch()
    parts = loss(logits, labels, mask_logits, masks, epoch=0)
    s = torch.tensor([0.3, -0.5])
    expected = torch.exp(-s[0]) * parts.classification + torch.exp(-s[1]) * parts.segmentation + s.sum()
    torch.testing.assert_close(parts.total, expected)
    parts.total.backward()
    # d/ds_i [exp(-s_i) L_i + s_i] = 1 - exp(-s_i) L_i
    task_losses = torch.stack([parts.classification, parts.segmentation]).detach()
    torch.testing.assert_close(loss.log_vars.grad, 1 - torch.exp(-s) * task_losses)
    assert (loss.log_vars.grad != 0).all()


def test_ls_focal_mix_equals_its_formula() -> None:
    logits, labels, _, _ = random_batch(seed=1, batch=16)
    eps, gamma, k = 0.1, 2.0, logits.shape[1]
    log_p = F.log_softmax(logits, dim=1)
    target = F.one_hot(labels, k).float() * (1 - eps) + eps / k
    smoothed_ce = -(target * log_p).sum(1).mean()
    log_pt = log_p.gather(1, labels[:, None]).squeeze(1)
    focal = (-((1 - log_pt.exp()) ** gamma) * log_pt).mean()

    config = classifier_config(classification_loss="ls_focal", label_smoothing=eps, focal_gamma=gamma)
    torch.testing.assert_close(classification_loss(logits, labels, config), smoothed_ce / 6 + 5 * focal / 6)
    torch.testing.assert_close(focal_loss(logits, labels, gamma), focal)
    # gamma = 0 is cross-entropy; label smoothing 0 is cross-entropy
    torch.testing.assert_close(focal_loss(logits, labels, 0.0), F.cross_entropy(logits, labels))
    ls = classifier_config(classification_loss="label_smoothing", label_smoothing=eps)
    torch.testing.assert_close(classification_loss(logits, labels, ls), smoothed_ce)


def test_segmentation_loss_is_bce_plus_dice() -> None:
    _, _, mask_logits, masks = random_batch(seed=2)
    p = torch.sigmoid(mask_logits).flatten(1)
    t = masks.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    expected = F.binary_cross_entropy(p, t) + dice.mean()
    torch.testing.assert_close(segmentation_loss(mask_logits, masks), expected, rtol=1e-5, atol=1e-5)
    # A perfect, confident prediction of an empty mask costs (almost) nothing: defect-free images are fine.
    empty = torch.zeros(1, 1, 8, 8)
    assert segmentation_loss(torch.full_like(empty, -20.0), empty).item() < 1e-6


def test_transformers_dinov3_grid_is_the_patch_tokens_after_cls_and_registers(tiny_models_dir: Path) -> None:
    backbone, spec = create_backbone("dinov3", str(tiny_models_dir / "dinov3"), True, {}, 64)
    assert isinstance(backbone, TokenGridBackbone) and spec["source"] == "transformers"
    config = backbone.model.config
    assert backbone.prefix_tokens == 1 + config.num_register_tokens and backbone.patch_size == 16
    pixels = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    grid, cls = backbone(pixels)
    tokens = backbone.model(pixel_values=pixels).last_hidden_state
    assert grid.shape == (2, config.hidden_size, 4, 6)
    # Row-major patch order: token prefix + r * 6 + c is grid cell (r, c).
    torch.testing.assert_close(grid[:, :, 1, 2], tokens[:, backbone.prefix_tokens + 1 * 6 + 2])
    torch.testing.assert_close(cls, tokens[:, 0])
    # Random init keeps the architecture and changes the weights.
    random_backbone, _ = create_backbone("dinov3", str(tiny_models_dir / "dinov3"), False, {}, 64)
    assert not torch.equal(random_backbone.model.embeddings.patch_embeddings.weight, backbone.model.embeddings.patch_embeddings.weight)


def test_timm_dinov3_weights_behind_models_dinov3(tiny_models_dir: Path) -> None:
    folder = tiny_models_dir / "dinov3-timm"
    backbone, spec = create_backbone("dinov3", str(folder), True, {}, 64)
    assert isinstance(backbone, TokenGridBackbone) and spec["source"] == "timm" and spec["name"] == "vit_small_patch16_dinov3"
    assert backbone.prefix_tokens == 5 and backbone.patch_size == 16  # CLS + 4 registers, like the transformers form
    saved = load_file(folder / "model.safetensors")
    assert all(torch.equal(backbone.model.state_dict()[name], tensor) for name, tensor in saved.items())
    pixels = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    grid, cls = backbone(pixels)
    tokens = backbone.model.forward_features(pixels)
    assert grid.shape == (2, 32, 4, 6)
    torch.testing.assert_close(grid[:, :, 1, 2], tokens[:, 5 + 1 * 6 + 2])
    torch.testing.assert_close(cls, tokens[:, 0])
    # The spec rebuilds the architecture without the folder; the trained weights then fit it exactly.
    rebuilt = backbone_from_spec(spec, 64)
    rebuilt.load_state_dict(backbone.state_dict())
    torch.testing.assert_close(rebuilt(pixels)[1], cls)
    random_backbone, random_spec = create_backbone("dinov3", str(folder), False, {}, 64)
    assert random_spec == spec
    assert not torch.equal(random_backbone.model.patch_embed.proj.weight, backbone.model.patch_embed.proj.weight)


def test_timm_vit_and_cnn_backbones() -> None:
    vit, spec = create_backbone("timm:vit_small_patch16_dinov3", "", False, TINY_TIMM_VIT, 64)
    assert isinstance(vit, TokenGridBackbone) and vit.prefix_tokens == 5  # CLS + 4 registers, like DINOv3
    grid, cls = vit(torch.rand(2, 3, 64, 64))
    assert grid.shape == (2, 32, 4, 4) and cls.shape == (2, 32)
    cnn, _ = create_backbone("timm:test_resnet", "", False, {"output_stride": 16}, 64)
    assert isinstance(cnn, FeatureMapBackbone)
    grid, pooled = cnn(torch.rand(2, 3, 64, 64))
    assert grid.shape == (2, 96, 4, 4)
    torch.testing.assert_close(pooled, grid.mean((2, 3)))


def test_backbone_errors_are_one_line() -> None:
    with pytest.raises(PipelineError, match=r"classifier.backbone=timm:no_such_net could not be built") as info:
        create_backbone("timm:no_such_net", "", False, {}, 64)
    assert "\n" not in str(info.value)
    with pytest.raises(PipelineError, match=r"could not be built .* in the Hugging Face cache or downloadable \(or set classifier.pretrained=false\)"):
        create_backbone("timm:vit_small_patch16_dinov3.lvd1689m", "", True, {}, 64)  # offline, not cached
    with pytest.raises(PipelineError, match=r"classifier.image_size=72 is not a multiple of the patch size 16"):
        create_backbone("timm:vit_small_patch16_dinov3", "", False, TINY_TIMM_VIT, 72)
    with pytest.raises(ConfigError, match=r"classifier.backbone='resnet18' must be `dinov3` or `timm:<model name>`"):
        load_config(SMOKE_CONFIG, ["classifier.backbone=resnet18"])
    with pytest.raises(ConfigError, match=r"synthetic_only=true needs classifier.synthetic"):
        load_config(SMOKE_CONFIG, ["classifier.synthetic_only=true"])


def test_timm_dinov3_hub_id_loads_through_timm_from_the_cache(tiny_models_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil

    import huggingface_hub

    from neu_det_pipeline.dinov3 import load_dinov3, timm_model_name

    # The hub cache layout of timm/vit_small_patch16_dinov3.lvd1689m, holding the tiny timm checkpoint (offline).
    repo = tmp_path / "models--timm--vit_small_patch16_dinov3.lvd1689m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny_models_dir / "dinov3-timm", repo / "snapshots" / ("0" * 40))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    hub_id = "timm/vit_small_patch16_dinov3.lvd1689m"
    assert timm_model_name(hub_id) == f"hf-hub:{hub_id}"
    assert timm_model_name(str(tiny_models_dir / "dinov3")) is None  # transformers' config.json: `architectures`
    model = load_dinov3(hub_id)
    saved = load_file(tiny_models_dir / "dinov3-timm" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in saved.items())
