"""Step 6 options from the guides: box-crop samples and `predict --boxes`, SGD and warm restarts, the wrapper head,
albumentations presets seeded per sample."""

from __future__ import annotations

import csv
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_ROOT
from PIL import Image
from torch.utils.data import DataLoader

from neu_det_pipeline import cli
from neu_det_pipeline.classifier.backbones import create_backbone
from neu_det_pipeline.classifier.checkpoints import BEST_FILE, save_checkpoint
from neu_det_pipeline.classifier.data import (
    ClassifierDataset,
    EpochSampler,
    Example,
    JointAugmentation,
    crop_box,
    evaluation_margins,
    load_data,
    training_margins,
)
from neu_det_pipeline.classifier.inference import read_boxes
from neu_det_pipeline.classifier.model import (
    WRAPPER_HIDDEN,
    AttentionGuidedClassifier,
    ModelSpec,
)
from neu_det_pipeline.classifier.training import make_lr_scheduler, make_optimizer
from neu_det_pipeline.config import ClassifierAugmentationConfig, ClassifierConfig
from neu_det_pipeline.data.export import yolo_label_lines
from neu_det_pipeline.data.neu_det import Box
from neu_det_pipeline.errors import ConfigError, DataError
from neu_det_pipeline.io import read_json, read_jsonl
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step6_classifier import STEP

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEP0 = "step0_prepare"
TINY_CNN = ("classifier.backbone=timm:test_resnet", "classifier.pretrained=false", "classifier.backbone_kwargs={output_stride: 16}")
GEOMETRY_ONLY = ClassifierAugmentationConfig(max_rotation=0, max_translate=0, max_scale=0, brightness=0, contrast=0)


@pytest.fixture
def with_step0(make_config, step0_sample_dir: Path, tmp_path: Path):
    def make(*overrides: str):
        shutil.copytree(step0_sample_dir / STEP0, tmp_path / "out" / STEP0, dirs_exist_ok=True)
        return make_config(*overrides)

    return make


# ------------------------------------------------------------------------------------------ box crops


def coordinate_image(width: int = 200, height: int = 100) -> Image.Image:
    """Red = x, green = y: a crop's pixels tell where they came from."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8))


def crop_extent(crop: Image.Image) -> tuple[int, int, int, int]:
    pixels = np.asarray(crop)
    return int(pixels[..., 0].min()), int(pixels[..., 1].min()), int(pixels[..., 0].max()) + 1, int(pixels[..., 1].max()) + 1


def test_crop_box_widens_by_the_margin_fraction_of_the_box_and_clips_to_the_image() -> None:
    image = coordinate_image()
    box = (0.25, 0.2, 0.5, 0.6)  # x 50..100, y 20..60: 50 x 40 pixels
    assert crop_extent(crop_box(image, box, (0.0, 0.0, 0.0, 0.0))) == (50, 20, 100, 60)
    assert crop_extent(crop_box(image, box, (0.1, 0.1, 0.2, 0.5))) == (45, 16, 110, 80)
    assert crop_extent(crop_box(image, (0.0, 0.0, 1.0, 0.1), (0.1,) * 4)) == (0, 0, 200, 11)  # clipped, 10 + 1 rows


def test_box_crops_are_one_sample_per_object_labelled_by_the_object(with_step0) -> None:
    config = with_step0("classifier.input=box_crops")
    step0 = Path(config.run.output_dir) / STEP0
    data = load_data(config, step0, None)
    rows = read_jsonl(step0 / "manifest.jsonl")
    for split, examples in data.splits.items():
        boxes = [box for row in rows if row["split"] == split for box in row["boxes"]]
        assert [data.classes[e.label] for e in examples] == [box["label"] for box in boxes]
    assert sum(map(len, data.splits.values())) > len(rows)  # the sample has images with several boxes

    dataset = ClassifierDataset(data.splits["train"][:4], 32, seed=0, augmentation=None, crop_margin=0.1)
    example = dataset.examples[0]
    expected = crop_box(Image.open(example.image).convert("RGB"), example.box, (0.05,) * 4).resize((32, 32), Image.Resampling.BICUBIC)
    assert torch.equal(dataset[0]["pixels"], torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 255)
    assert dataset[0]["masks"].mean() > 0.5  # a crop around a box is mostly defect
    epoch0, again, epoch1 = dataset[(0, 0)]["pixels"], dataset[(0, 0)]["pixels"], dataset[(0, 1)]["pixels"]
    assert torch.equal(epoch0, again) and not torch.equal(epoch0, epoch1)  # random margin, seeded by (seed, epoch, index)

    with pytest.raises(ConfigError, match=r"classifier.input=box_crops needs VOC boxes .*classifier.own_data has none"):
        with_step0("classifier.input=box_crops", "classifier.own_data=/tmp")


def test_training_crops_draw_margins_up_to_the_limit_and_evaluation_uses_half(tmp_path: Path) -> None:
    source = tmp_path / "coords.png"
    coordinate_image().save(source)
    box = (0.25, 0.2, 0.5, 0.6)  # 50 x 40 pixels
    dataset = ClassifierDataset([Example(source, None, 0, "real", box)], 16, seed=3, crop_margin=0.1)
    margins = [training_margins(3, epoch, 0, 0.1) for epoch in range(40)]
    assert all(0 <= m <= 0.1 for drawn in margins for m in drawn) and len(set(margins)) == 40
    assert max(max(drawn) for drawn in margins) > 0.09 and min(min(drawn) for drawn in margins) < 0.01
    for epoch in (0, 1):
        crop = crop_box(Image.open(source).convert("RGB"), box, margins[epoch]).resize((16, 16), Image.Resampling.BICUBIC)
        assert torch.equal(dataset[(0, epoch)]["pixels"], torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255)
    assert evaluation_margins(0.1) == (0.05,) * 4


# ------------------------------------------------------------------------------------- end to end, predict --boxes


def test_box_crop_run_with_the_guides_options_then_predict_boxes(with_step0, tmp_path: Path, capsys) -> None:
    """One tiny run with every option of this module: box crops, SGD, warm restarts, the wrapper head, the guide's
    augmentation; then `neu-det predict --boxes` on VOC and YOLO label folders."""
    config = with_step0(*TINY_CNN, "classifier.input=box_crops", "classifier.optimizer=sgd", "classifier.lr_schedule=cosine_restarts",
                        "classifier.head=wrapper", "classifier.augmentation.preset=guide", "classifier.freeze_epochs=0", "classifier.epochs=2")
    summary = run_step(STEP, config)
    out = Path(config.run.output_dir) / STEP.name
    test = read_json(out / "test_metrics.json")
    assert summary["input"] == test["input"] == "box_crops"
    assert summary["images"]["test"] == {"real": 12} and test["objects"] == summary["objects"]["test"]["real"] > 12
    assert sum(row["support"] for row in test["per_class"].values()) == test["objects"]
    assert "images" not in test and f"{test['objects']} objects: per-object accuracy" in capsys.readouterr().err

    images = tmp_path / "images"
    images.mkdir()
    sources = sorted((SAMPLE_ROOT / "IMAGES").glob("*_1*.jpg"))[:3]
    for source in sources:
        shutil.copy(source, images / source.name)
    voc, yolo = tmp_path / "voc", tmp_path / "yolo"
    yolo.mkdir()
    shutil.copytree(SAMPLE_ROOT / "ANNOTATIONS", voc)
    xml_boxes = {source.name: read_boxes(voc / f"{source.stem}.xml", 200, 200) for source in sources}
    for source in sources[:2]:  # the third image: no detections, no label file
        boxes = [Box("crazing", *box) for box in xml_boxes[source.name]]
        (yolo / f"{source.stem}.txt").write_text(yolo_label_lines(boxes, 200, 200, ["crazing"]))

    checkpoint = str(out / BEST_FILE)
    cli.main(["predict", "--checkpoint", checkpoint, str(images), "--out", str(tmp_path / "by-voc"), "--boxes", str(voc)])
    with open(tmp_path / "by-voc" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["file"], tuple(float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax"))) for row in rows] == [
        (name, box) for name, boxes in xml_boxes.items() for box in boxes]
    assert all(row["class"] in summary["classes"] and float(row["probability"]) == max(float(row[c]) for c in summary["classes"]) for row in rows)
    assert len(list((tmp_path / "by-voc" / "overlays").glob("*.png"))) == 3

    cli.main(["predict", "--checkpoint", checkpoint, str(images), "--out", str(tmp_path / "by-yolo"), "--boxes", str(yolo)])
    assert "1 image(s) without a label file" in capsys.readouterr().err
    with open(tmp_path / "by-yolo" / "predictions.csv") as f:
        by_yolo = list(csv.DictReader(f))
    assert len(by_yolo) == sum(len(xml_boxes[s.name]) for s in sources[:2])
    for a, b in zip(by_yolo, rows):  # YOLO's 6 decimals give the same boxes to 0.1 px, hence the same crops and classes
        assert a["file"] == b["file"] and all(abs(float(a[k]) - float(b[k])) <= 0.1 for k in ("xmin", "ymin", "xmax", "ymax"))

    for argv, message in (
        ([], r"trained on box crops \(classifier.input=box_crops\); pass --boxes LABEL_DIR"),
        (["--boxes", str(tmp_path / "nowhere")], r"--boxes .*nowhere is not a folder"),
    ):
        with pytest.raises(SystemExit):
            cli.main(["predict", "--checkpoint", checkpoint, str(images), "--out", str(tmp_path / "x"), *argv])
        assert len(err := capsys.readouterr().err.strip().splitlines()) == 1 and re.search(message, err[0]), err
    (yolo / f"{sources[0].stem}.txt").write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(DataError, match=r"line 1: '0 0.5 0.5 0.2' is not a YOLO line"):
        read_boxes(yolo / f"{sources[0].stem}.txt", 200, 200)


def test_predict_boxes_refuses_a_whole_image_model(tmp_path: Path, capsys) -> None:
    backbone, backbone_spec = create_backbone("timm:test_resnet", "", False, {"output_stride": 16}, 32)
    spec = ModelSpec(backbone_spec, ["a", "b"], 32, True, 4, 8, 0.0)
    save_checkpoint(tmp_path / "image.pt", AttentionGuidedClassifier(backbone, spec))
    with pytest.raises(SystemExit):
        cli.main(["predict", "--checkpoint", str(tmp_path / "image.pt"), str(SAMPLE_ROOT / "IMAGES"), "--out", str(tmp_path / "o"),
                  "--boxes", str(SAMPLE_ROOT / "ANNOTATIONS")])
    assert "--boxes needs a model trained with classifier.input=box_crops" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- head, optimiser, schedule


def test_wrapper_head_is_relu_linear_128_relu_linear_and_old_specs_load() -> None:
    backbone, backbone_spec = create_backbone("timm:test_resnet", "", False, {"output_stride": 16}, 32)
    spec = ModelSpec(backbone_spec, ["a", "b", "c"], 32, False, 4, 8, 0.3, head="wrapper")
    model = AttentionGuidedClassifier(backbone, spec).eval()
    layers = [*model.enhancer, model.head]
    assert [type(layer).__name__ for layer in layers] == ["ReLU", "Linear", "ReLU", "Linear"]
    assert (layers[1].in_features, layers[1].out_features, layers[3].out_features) == (backbone.channels, WRAPPER_HIDDEN, 3)
    pixels = torch.rand(2, 3, 32, 32)
    _, feature = backbone((pixels - model.mean) / model.std)
    expected = layers[3](torch.relu(layers[1](torch.relu(feature))))
    torch.testing.assert_close(model(pixels).logits, expected)
    old = {key: value for key, value in spec.to_dict().items() if key not in ("head", "input", "crop_margin")}
    assert ModelSpec(**old).head == "attention_guided" and ModelSpec(**old).input == "image"  # checkpoints from before


def groups() -> list[dict]:
    return [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1}, {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.01}]


def test_sgd_is_the_guides_and_adamw_keeps_its_decay() -> None:
    sgd = make_optimizer(ClassifierConfig(optimizer="sgd"), groups())
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 1e-3
    adamw = make_optimizer(ClassifierConfig(), groups())
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.05
    assert make_optimizer(ClassifierConfig(optimizer="sgd", weight_decay=0.0), groups()).defaults["weight_decay"] == 0.0


def learning_rates(scheduler, optimizer, steps: int) -> list[list[float]]:
    seen = []
    for _ in range(steps):
        seen.append(scheduler.get_last_lr())
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("restart_epochs", [None, 2.0])
def test_cosine_restarts_is_torchs_schedule_after_a_linear_warm_up(restart_epochs) -> None:
    section = ClassifierConfig(optimizer="sgd", lr_schedule="cosine_restarts", restart_epochs=restart_epochs, epochs=6, freeze_epochs=1)
    optimizer = make_optimizer(section, groups())
    warmup, total, per_epoch = 3, 18, 3
    scheduler = make_lr_scheduler(section, optimizer, warmup, total, unfreeze=3, steps_per_epoch=per_epoch)
    cycle = total - warmup if restart_epochs is None else 6
    expected = [(step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * ((step - warmup) % cycle) / cycle))
                for step in range(total)]
    got = learning_rates(scheduler, optimizer, total)
    for step, (head, backbone) in enumerate(got):
        assert head == pytest.approx(0.1 * expected[step]) and backbone == pytest.approx(0.01 * expected[step]), step
    assert (restart_epochs is not None) == any(b > a for a, b in zip(expected[warmup:], expected[warmup + 1 :]))

    resumed_optimizer = make_optimizer(section, groups())
    resumed = make_lr_scheduler(section, resumed_optimizer, warmup, total, unfreeze=3, steps_per_epoch=per_epoch)
    fresh_optimizer = make_optimizer(section, groups())
    fresh = make_lr_scheduler(section, fresh_optimizer, warmup, total, unfreeze=3, steps_per_epoch=per_epoch)
    learning_rates(fresh, fresh_optimizer, 7)
    resumed.load_state_dict(fresh.state_dict())  # what last.pt carries
    torch.testing.assert_close(torch.tensor(learning_rates(resumed, resumed_optimizer, 5)), torch.tensor(got[7:12]))


# ------------------------------------------------------------------------------------------ augmentation


def test_augmentation_is_seeded_per_sample_and_moves_image_and_mask_together() -> None:
    generator = torch.Generator().manual_seed(0)
    mask = (torch.rand(1, 32, 32, generator=generator) > 0.8).to(torch.uint8)
    pixels = (mask * 200 + 20).expand(3, -1, -1).contiguous()
    geometric = JointAugmentation(GEOMETRY_ONLY, 32)
    outputs = [geometric(pixels, mask, seed) for seed in range(24)]
    assert all(torch.equal(image[0], (m[0] * 200 + 20)) for image, m in outputs)  # flips and turns: the same for both
    assert len({bytes(m.numpy()) for _, m in outputs}) == 8  # the square's 8 symmetries, all reached
    assert all(torch.equal(a, b) for a, b in zip(geometric(pixels, mask, 5), outputs[5]))  # another call order, same result

    # Compose(seed=...) in albumentations 2.0.8 seeds every transform alike: both flips would always fire together.
    flips = JointAugmentation(ClassifierAugmentationConfig(rot90=False, max_rotation=0, max_translate=0, max_scale=0, brightness=0, contrast=0), 32)
    asymmetric = torch.arange(32 * 32, dtype=torch.uint8).view(1, 32, 32)
    kinds = {(torch.equal(m, asymmetric.flip(-1)), torch.equal(m, asymmetric.flip(-2))) for m in (flips(pixels, asymmetric, s)[1] for s in range(32))}
    assert (True, False) in kinds and (False, True) in kinds

    for preset in ("default", "guide"):
        augmentation = JointAugmentation(ClassifierAugmentationConfig(preset=preset), 32)
        image, augmented_mask = augmentation(pixels, mask, 1)
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and augmented_mask.shape == (1, 32, 32)
        assert set(augmented_mask.unique().tolist()) <= {0, 1}
        assert all(torch.equal(a, b) for a, b in zip(augmentation(pixels, mask, 1), (image, augmented_mask)))

    rotated = JointAugmentation(ClassifierAugmentationConfig(hflip=False, vflip=False, rot90=False, max_rotation=45, max_translate=0,
                                                             max_scale=0, brightness=0, contrast=0), 32)
    flat = torch.full((3, 32, 32), 90, dtype=torch.uint8)
    corners = torch.stack([rotated(flat, mask, seed)[0][:, 0, 0] for seed in range(8)])
    assert (corners == 90).all()  # uncovered corners take the mean grey, not black


def test_loader_workers_do_not_change_the_augmented_batches(with_step0) -> None:
    config = with_step0()
    data = load_data(config, Path(config.run.output_dir) / STEP0, None)
    dataset = ClassifierDataset(data.splits["train"][:8], 32, seed=0, augmentation=ClassifierAugmentationConfig(preset="guide"))
    batches = {}
    for workers in (0, 2):
        sampler = EpochSampler(dataset.labels(), seed=0, epoch=1, class_balanced=False)
        batches[workers] = [batch["pixels"] for batch in DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers)]
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))


def test_synthetic_images_give_box_crops_too(with_step0) -> None:
    from test_classifier_step import fabricate_step4

    config = with_step0("classifier.input=box_crops", "classifier.synthetic=step4", "classifier.synthetic_only=true")
    out = Path(config.run.output_dir)
    rows = fabricate_step4(out, per_class=1)
    train = load_data(config, out / STEP0, out / "step4_generate").splits["train"]
    assert [(e.origin, e.image.name, e.label) for e in train] == [
        ("synthetic", Path(row["file"]).name, config.data.classes.index(box["label"])) for row in rows for box in row["boxes"]]
    assert all(e.box is not None and 0 <= e.box[0] < e.box[2] <= 1 for e in train)
