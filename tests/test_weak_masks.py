"""Weak supervision (`classifier.mask_source`): attention and Grad-CAM maps, thresholds, `none`, one tiny Step 6 run (cam)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.filters import threshold_otsu

from neu_det_pipeline.classifier.backbones import create_backbone
from neu_det_pipeline.classifier.checkpoints import load_classifier
from neu_det_pipeline.classifier.data import load_data
from neu_det_pipeline.classifier.losses import MultiTaskLoss
from neu_det_pipeline.classifier.model import AttentionGuidedClassifier, ModelSpec
from neu_det_pipeline.classifier.training import _TrainingModule
from neu_det_pipeline.classifier.weak_masks import apply_mask_source, cls_attention, grad_cam, masks_from_maps, normalise, otsu_threshold, threshold_map
from neu_det_pipeline.config import ClassifierConfig
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.io import read_json
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step6_classifier import STEP

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def plain_classifier(backbone_name: str, model_id: str = "", multitask: bool = False) -> AttentionGuidedClassifier:
    torch.manual_seed(0)
    kwargs = {} if backbone_name == "dinov3" else {"output_stride": 16}
    backbone, spec = create_backbone(backbone_name, model_id, backbone_name == "dinov3", kwargs, 64)
    return AttentionGuidedClassifier(backbone, ModelSpec(
        backbone=spec, classes=["a", "b", "c"], image_size=64, multitask=multitask, decoder_channels=8, enhancer_dim=16, dropout=0.0
    )).eval()


@pytest.mark.parametrize("form", ["dinov3-timm", "dinov3"])
def test_cls_attention_is_the_last_blocks_softmax_row_of_the_cls_token(tiny_models_dir: Path, form: str) -> None:
    backbone, _ = create_backbone("dinov3", str(tiny_models_dir / form), True, {}, 64)
    backbone.eval()
    pixels = normalise(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    before = backbone(pixels)[0]
    attention = cls_attention(backbone, pixels)
    assert attention.shape == (2, 4, 4)  # 64 px / 16 px patches; the CLS and 4 register tokens are left out
    # A softmax row over CLS + 4 registers + 16 patches: the patches take part of it, never more than all.
    total = attention.sum(dim=(1, 2))
    assert ((total > 0) & (total < 1)).all()
    assert torch.equal(backbone(pixels)[0], before)  # fused / sdpa attention restored
    if form == "dinov3":
        assert backbone.model.config._attn_implementation == "sdpa"
    else:
        assert backbone.model.blocks[-1].attn.fused_attn


def test_attention_needs_a_vit() -> None:
    cnn = plain_classifier("timm:test_resnet").backbone
    with pytest.raises(PipelineError, match="mask_source=attention needs a ViT backbone"):
        cls_attention(cnn, torch.zeros(1, 3, 64, 64))


def test_grad_cam_of_a_cnn_equals_its_formula() -> None:
    model = plain_classifier("timm:test_resnet")
    pixels, labels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 2, 1])
    cam = grad_cam(model, pixels, labels)
    # Independently, without hooks: the class score as a function of the last feature map A (global = mean of A).
    grid = model.backbone(normalise(pixels))[0].detach().requires_grad_(True)
    score = model.head(model.enhancer(grid.mean(dim=(2, 3)))).gather(1, labels[:, None]).sum()
    (gradient,) = torch.autograd.grad(score, grid)
    expected = (grid.detach() * gradient.mean(dim=(2, 3), keepdim=True)).sum(1).relu()
    assert cam.shape == (3, 4, 4) and expected.abs().sum() > 0
    torch.testing.assert_close(cam, expected)


def test_grad_cam_of_a_vit_reaches_the_patch_tokens(tiny_models_dir: Path) -> None:
    model = plain_classifier("dinov3", str(tiny_models_dir / "dinov3-timm"))
    cam = grad_cam(model, torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)), torch.tensor([1, 2]))
    # The last block's patch outputs never reach the CLS output: only the tokens entering it give a gradient.
    assert cam.shape == (2, 4, 4) and (cam.flatten(1).max(1).values > 0).all()


def test_thresholds_otsu_quantile_and_flat_maps() -> None:
    rng = np.random.default_rng(0)
    bimodal = np.concatenate([rng.normal(0.2, 0.02, (8, 4)), rng.normal(0.8, 0.02, (8, 4))], axis=1)
    assert (threshold_map(bimodal, "otsu") == (np.arange(8) >= 4)[None].repeat(8, 0)).all()
    mixture = np.concatenate([rng.normal(0.3, 0.1, 500), rng.normal(0.7, 0.05, 300)])
    scaled = (mixture - mixture.min()) / np.ptp(mixture)
    assert abs(otsu_threshold(scaled) - threshold_otsu(scaled, nbins=256)) <= 1 / 256  # skimage's: a bin centre
    ramp = np.arange(100, dtype=np.float64).reshape(10, 10)
    assert threshold_map(ramp, 0.75).sum() == 25  # the top quarter
    assert not threshold_map(np.full((4, 4), 0.3), "otsu").any()
    masks = masks_from_maps(torch.tensor(bimodal, dtype=torch.float32)[None], 32, "otsu")
    assert masks[0].shape == (32, 32) and set(np.unique(masks[0])) == {0, 255}


def test_mask_source_none_leaves_the_classification_loss_alone() -> None:
    model = plain_classifier("timm:test_resnet", multitask=True)
    config = ClassifierConfig(mask_source="none", loss_weighting="fixed", alpha=1.0, beta=0.5)
    pixels, masks, labels = torch.rand(2, 3, 64, 64), torch.ones(2, 1, 64, 64), torch.tensor([0, 1])
    without = _TrainingModule(model, MultiTaskLoss(config), supervise_masks=False)(pixels, masks, labels, 0)
    with_masks = _TrainingModule(model, MultiTaskLoss(config), supervise_masks=True)(pixels, masks, labels, 0)
    assert without.total == without.classification == with_masks.classification and with_masks.total > without.total


def test_attention_pseudo_masks_replace_the_training_masks(make_config, step0_sample_dir: Path, tmp_path: Path) -> None:
    config = make_config("classifier.mask_source=attention", "classifier.pseudo_mask_threshold=0.75")
    data = load_data(config, step0_sample_dir / "step0_prepare", None)
    weak, made = apply_mask_source(config, data, tmp_path)
    assert made == 36 and weak.splits["val"] == data.splits["val"] and weak.splits["test"] == data.splits["test"]
    for before, after in zip(data.splits["train"], weak.splits["train"]):
        assert after.image == before.image and after.mask.parent == tmp_path / "pseudo_masks"
    with Image.open(weak.splits["train"][0].mask) as mask:
        values = np.asarray(mask)
    # About the top quarter of a bilinear upsampling of a 4 x 4 map (its border bands repeat values: ties).
    assert values.shape == (64, 64) and 0.2 < (values == 255).mean() <= 0.3


def test_step6_trains_on_grad_cam_pseudo_masks_and_says_so(make_config, step0_sample_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(step0_sample_dir / "step0_prepare", out / "step0_prepare")
    summary = run_step(STEP, make_config("classifier.mask_source=cam", "classifier.cam_epochs=1", "classifier.epochs=1", "classifier.freeze_epochs=0", output_dir=out))
    assert summary["mask_source"] == "cam" and summary["pseudo_masks"] == summary["images"]["train"]["real"] == 36
    assert read_json(out / STEP.name / "summary.json")["mask_source"] == read_json(out / STEP.name / "test_metrics.json")["mask_source"] == "cam"
    assert (out / STEP.name / "cam_stage" / "best.pt").is_file() and len(list((out / STEP.name / "pseudo_masks").iterdir())) == 36
    plain, _ = load_classifier(out / STEP.name / "cam_stage" / "best.pt")
    assert not plain.spec.multitask  # the first stage is the plain classifier


@pytest.mark.parametrize("source", ["attention", "cam"])
def test_pseudo_masks_are_refused_for_box_crops(source: str) -> None:
    """Pseudo-masks are whole-image masks; box-crop samples would read them as the masks of their crops."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=f"mask_source={source} makes whole-image masks .* use mask_source=boxes"):
        ClassifierConfig(input="box_crops", mask_source=source)
    assert ClassifierConfig(input="box_crops", mask_source="none").mask_source == "none"
