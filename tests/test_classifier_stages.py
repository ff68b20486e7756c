"""Large datasets: DINOv3 size names, parameters per component, the three-stage schedule, results_summary.txt."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch

from neu_det_pipeline import cli
from neu_det_pipeline.classifier import training as training_module
from neu_det_pipeline.classifier.backbone_sizes import DINOV3_SIZES
from neu_det_pipeline.classifier.backbones import backbone_blocks, component_parameters, create_backbone
from neu_det_pipeline.classifier.checkpoints import BEST_FILE, LAST_FILE
from neu_det_pipeline.classifier.stages import staged_lr_lambdas, training_stages
from neu_det_pipeline.config import ClassifierConfig, load_config
from neu_det_pipeline.errors import ConfigError
from neu_det_pipeline.io import read_json
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step6_classifier import STEP

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
THREE_STAGES = (
    "classifier.stages=[{epochs: 1, train: head, learning_rate: 0.01}, "
    "{epochs: 1, train: last_blocks, last_blocks: 1, learning_rate: 0.004, backbone_learning_rate: 0.002}, "
    "{epochs: 1, train: all, learning_rate: 0.002, backbone_learning_rate: 0.001}]"
)


@pytest.mark.parametrize("size", ["dinov3-s", "dinov3-b"])
def test_size_names_build_the_named_timm_architecture(size: str) -> None:
    entry = DINOV3_SIZES[size]
    assert entry.timm_name.endswith("_dinov3.lvd1689m") and entry.transformers_id.startswith("facebook/dinov3-vit")
    with torch.device("meta"):  # the real architecture, no weights allocated or downloaded
        backbone, spec = create_backbone(size, "unused", False, {}, 224)
    assert spec == {"source": "timm", "name": entry.timm_name, "kwargs": {}}
    assert backbone.channels == entry.width and len(backbone_blocks(backbone)) == entry.blocks
    assert sum(p.numel() for p in backbone.parameters()) / 1e6 == pytest.approx(entry.parameters_millions, abs=0.05)
    assert ClassifierConfig(backbone=size).backbone == size


def test_unknown_size_and_inconsistent_stages_are_config_errors() -> None:
    base = REPO / "configs" / "smoke.yaml"
    with pytest.raises(ConfigError, match=r"or a DINOv3 size \(dinov3-s, dinov3-s\+, dinov3-b, dinov3-l, dinov3-h\+, dinov3-7b\)"):
        load_config(base, ["classifier.backbone=dinov3-xl"])
    with pytest.raises(ConfigError, match=r"classifier.stages last 3 epochs but classifier.epochs=2; set classifier.epochs=3"):
        load_config(base, [THREE_STAGES, "classifier.freeze_epochs=0"])
    with pytest.raises(ConfigError, match="replaces classifier.freeze_epochs"):
        load_config(base, [THREE_STAGES, "classifier.epochs=3"])
    with pytest.raises(ConfigError, match="last_blocks > 0 exactly when train=last_blocks"):
        load_config(base, ["classifier.stages=[{epochs: 2, train: last_blocks, learning_rate: 0.01, backbone_learning_rate: 0.01}]", "classifier.freeze_epochs=0"])


def test_staged_learning_rates_warm_up_and_decay_within_each_stage() -> None:
    section = ClassifierConfig(
        epochs=6, freeze_epochs=0, stages=[
            {"epochs": 2, "train": "head", "learning_rate": 1e-3},
            {"epochs": 4, "train": "all", "learning_rate": 5e-4, "backbone_learning_rate": 1e-4},
        ],
    )
    stages = training_stages(section)
    assert [(s.name, s.start_epoch, s.epochs) for s in stages] == [("1: frozen backbone", 0, 2), ("2: full", 2, 4)]
    base = [1e-3, 1e-4, 1e-3]  # initial group learning rates: head, backbone, loss weights
    head, backbone, _ = staged_lr_lambdas(stages, steps_per_epoch=10, warmup_epochs=1.0, base_lrs=base)
    lr = lambda factor, group, step: factor(step) * base[group]  # noqa: E731
    assert lr(head, 0, 0) == pytest.approx(1e-3 / 10) and lr(head, 0, 9) == pytest.approx(1e-3)  # 10 warm-up steps
    assert lr(head, 0, 19) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(0.9 * math.pi)))  # cosine, 0 at the stage's end
    assert lr(backbone, 1, 5) == 0  # frozen backbone
    assert lr(head, 0, 29) == pytest.approx(5e-4) and lr(backbone, 1, 29) == pytest.approx(1e-4)  # stage 2 peaks
    assert lr(backbone, 1, 20) == pytest.approx(1e-4 / 10)
    # Cosine half-way through stage 2's decay (steps 30 .. 60): half the peak.
    assert lr(backbone, 1, 45) == pytest.approx(1e-4 / 2)


def test_three_stages_train_head_then_last_blocks_then_everything(make_config, step0_sample_dir: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    shutil.copytree(step0_sample_dir / "step0_prepare", out / "step0_prepare")
    states = []
    save = training_module.save_checkpoint

    def keep_state(path: Path, model, **extra):
        if path.name == LAST_FILE:
            states.append({key: value.clone() for key, value in model.state_dict().items()})
        return save(path, model, **extra)

    monkeypatch.setattr(training_module, "save_checkpoint", keep_state)
    config = make_config(THREE_STAGES, "classifier.epochs=3", "classifier.freeze_epochs=0", output_dir=out)
    summary = run_step(STEP, config)

    counts = read_json(out / STEP.name / "summary.json")["parameters_by_component"]
    assert counts == summary["parameters_by_component"] and counts["total"] == summary["parameters"]
    assert counts["backbone"] + counts["decoder"] + counts["enhancer_head"] == counts["total"] and min(counts.values()) > 0

    def changed(before: dict, after: dict, prefix: str) -> bool:
        keys = [key for key in before if key.startswith(prefix)]
        assert keys, prefix
        return any(not torch.equal(before[key], after[key]) for key in keys)

    first, second, third = states
    last_block, early = "backbone.model.blocks.1.", ("backbone.model.patch_embed.", "backbone.model.blocks.0.")
    assert changed(first, second, last_block) and changed(first, second, "backbone.model.norm.")
    assert not any(changed(first, second, prefix) for prefix in early)  # stage 2: the last block (of 2) only
    assert all(changed(second, third, prefix) for prefix in early)  # stage 3: everything
    assert changed(first, second, "decoder.") and changed(second, third, "head.")
    with open(out / STEP.name / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["stage"] for row in rows] == ["1: frozen backbone", "2: last 1 blocks", "3: full"]
    # First step of each stage: half way through its 2-step warm-up (warmup_epochs 0.5 of 5 steps) to its own peaks.
    assert [float(row["lr"]) for row in rows] == pytest.approx([0.005, 0.002, 0.001])
    assert [float(row["backbone_lr"]) for row in rows] == pytest.approx([0.0, 0.001, 0.0005])

    images = tmp_path / "images"
    images.mkdir()
    for source in sorted((REPO / "data" / "neu-det-sample" / "IMAGES").glob("*.jpg"))[::20]:
        shutil.copy(source, images / source.name)
    cli.main(["predict", "--checkpoint", str(out / STEP.name / BEST_FILE), str(images), "--out", str(tmp_path / "pred")])
    with open(tmp_path / "pred" / "predictions.csv") as f:
        predictions = list(csv.DictReader(f))
    lines = (tmp_path / "pred" / "results_summary.txt").read_text().splitlines()
    assert len(lines) == len(predictions) == len(list(images.iterdir())) > 1
    for line, row in zip(lines, predictions):
        file, label, probability = line.split("\t")
        assert (file, label) == (row["file"], row["class"]) and float(probability) == pytest.approx(float(row[label]), abs=1e-4)
        assert float(probability) == pytest.approx(max(float(row[c]) for c in summary["classes"]), abs=1e-4)


def test_component_parameters_cover_every_module(tiny_models_dir: Path) -> None:
    from neu_det_pipeline.classifier.model import AttentionGuidedClassifier, ModelSpec

    backbone, spec = create_backbone("dinov3", str(tiny_models_dir / "dinov3-timm"), True, {}, 64)
    model = AttentionGuidedClassifier(backbone, ModelSpec(backbone=spec, classes=["a", "b"], image_size=64, multitask=True, decoder_channels=8, enhancer_dim=16, dropout=0.0))
    counts = component_parameters(model)
    assert counts == {
        "backbone": sum(p.numel() for p in model.backbone.parameters()),
        "decoder": sum(p.numel() for p in model.decoder.parameters()),
        "enhancer_head": sum(p.numel() for p in [*model.enhancer.parameters(), *model.head.parameters()]),
        "total": sum(p.numel() for p in model.parameters()),
    }
