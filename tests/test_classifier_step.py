"""Step 6 on real sample images with tiny backbones: training, exact resume, data sources, prediction, ONNX.

Step 4 and Step 5 outputs are fabricated here from real sample images, following their documented
contract, so these tests do not depend on those steps.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SMOKE_CONFIG, launch_two_cpu_ranks, skip_optimizer_step, smoke_overrides
from PIL import Image

from neu_det_pipeline import cli
from neu_det_pipeline.classifier import training as training_module
from neu_det_pipeline.classifier.checkpoints import BEST_FILE, LAST_FILE, load_classifier, read_checkpoint
from neu_det_pipeline.classifier.data import NORMAL, load_data
from neu_det_pipeline.classifier.inference import TorchPredictor, export_onnx, make_predictor
from neu_det_pipeline.classifier.training import ClassifierTraining
from neu_det_pipeline.config import PipelineConfig, load_config
from neu_det_pipeline.errors import DataError, MissingStepOutputError, PipelineError
from neu_det_pipeline.io import read_json, read_jsonl, write_json, write_jsonl
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step6_classifier import STEP

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEP0 = "step0_prepare"
# Loss falls: no augmentation, fixed weights, no frozen stage, a few epochs on the 36 training images.
LEARN = ("classifier.loss_weighting=fixed", "classifier.freeze_epochs=0", "classifier.epochs=12", "classifier.learning_rate=0.01", "classifier.dropout=0",
         "classifier.augmentation={hflip: false, vflip: false, rot90: false, max_rotation: 0, max_translate: 0, max_scale: 0, brightness: 0, contrast: 0}")
BACKBONES = {
    "dinov3-timm": (),  # the default form of models.dinov3 (smoke overrides: the tiny timm folder)
    "dinov3-transformers": ("models.dinov3=TINY_MODELS_DIR/dinov3",),
    "timm-cnn": ("classifier.backbone=timm:test_resnet", "classifier.pretrained=false", "classifier.backbone_kwargs={output_stride: 16}"),
}


@pytest.fixture
def step6_config(make_config, step0_sample_dir: Path, tmp_path: Path):
    """`step6_config(*overrides, output_dir=...)`: the smoke config with Step 0 (real sample) in place."""

    def make(*overrides: str, output_dir: Path | None = None, with_step0: bool = True) -> PipelineConfig:
        out = output_dir or tmp_path / "out"
        if with_step0 and not (out / STEP0).exists():
            shutil.copytree(step0_sample_dir / STEP0, out / STEP0)
        return make_config(*overrides, output_dir=out)

    return make


@pytest.fixture(scope="module")
def trained(tiny_models_dir: Path, step0_sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One smoke run of the step (tiny DINOv3, two stages); returns its output folder."""
    out = tmp_path_factory.mktemp("step6")
    shutil.copytree(step0_sample_dir / STEP0, out / STEP0)
    config = load_config(SMOKE_CONFIG, smoke_overrides(tiny_models_dir, out))
    run_step(STEP, config)
    return out / STEP.name


def fabricate_step4(out: Path, per_class: int = 2) -> list[dict]:
    """A Step 4 folder per the contract: synthetic images (here: real training copies in mode L), box masks,
    manifest rows sorted by name, and a complete summary."""
    step0, step4 = out / STEP0, out / "step4_generate"
    rows = []
    train = [row for row in read_jsonl(step0 / "manifest.jsonl") if row["split"] == "train"]
    for cls in sorted({row["class"] for row in train}):
        for i, row in enumerate([r for r in train if r["class"] == cls][:per_class]):
            name = f"{row['id']}-s{i:03d}"
            image_file, mask_file = f"images/{cls}/{name}.png", f"masks/{name}.png"
            (step4 / image_file).parent.mkdir(parents=True, exist_ok=True)
            (step4 / "masks").mkdir(parents=True, exist_ok=True)
            with Image.open(step0 / row["image"]) as image:
                image.convert("L").resize((row["width"], row["height"])).save(step4 / image_file)
            shutil.copy(step0 / row["mask"], step4 / mask_file)
            rows.append({"name": name, "file": image_file, "mask": mask_file, "label": f"labels/{name}.xml",
                         "source": row["id"], "class": cls, "width": row["width"], "height": row["height"], "boxes": row["boxes"]})
    rows.sort(key=lambda r: r["name"])
    write_jsonl(step4 / "manifest.jsonl", rows)
    write_json(step4 / "summary.json", {"status": "complete", "fingerprint": "fabricated-step4"})
    return rows


def test_trains_evaluates_and_is_up_to_date_on_rerun(trained: Path, tiny_models_dir: Path) -> None:
    summary = read_json(trained / "summary.json")
    assert summary["status"] == "complete" and summary["epochs_trained"] == 2 and summary["training_data"] == "real"
    assert summary["images"] == {"train": {"real": 36}, "val": {"real": 12}, "test": {"real": 12}}
    test = read_json(trained / "test_metrics.json")
    assert test["images"] == 12 and set(test["per_class"]) == set(summary["classes"])
    assert sum(row["support"] for row in test["per_class"].values()) == 12
    assert sum(map(sum, test["confusion_matrix"])) == 12
    assert test["accuracy"] == pytest.approx(sum(test["confusion_matrix"][i][i] for i in range(6)) / 12)
    assert 0 <= test["mask_iou"] <= test["mask_dice"] <= 1  # Dice >= IoU for every image
    with open(trained / "metrics.csv") as f:
        history = list(csv.DictReader(f))
    assert [row["stage"] for row in history] == ["frozen backbone", "full"]
    assert float(history[0]["backbone_lr"]) == 0 < float(history[1]["backbone_lr"])
    assert [float(row["alpha"]) for row in history] == [0.5, 1.0]  # dynamic weights, switch_epoch=1 in smoke.yaml
    for plot in ("curves.png", "confusion_matrix.png"):
        with Image.open(trained / plot) as image:
            assert image.width > 300
    rerun = run_step(STEP, load_config(SMOKE_CONFIG, smoke_overrides(tiny_models_dir, trained.parent)))
    assert rerun["up_to_date"]


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_loss_falls_on_real_images(step6_config, tiny_models_dir: Path, backbone: str) -> None:
    config = step6_config(*LEARN, *(override.replace("TINY_MODELS_DIR", str(tiny_models_dir)) for override in BACKBONES[backbone]))
    out_dir = Path(config.run.output_dir) / STEP.name
    out_dir.mkdir()
    data = load_data(config, Path(config.run.output_dir) / STEP0, None)
    result = ClassifierTraining(config, data, out_dir).run()
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.8 * losses[0], losses
    assert (out_dir / BEST_FILE).is_file() and (out_dir / LAST_FILE).is_file()


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(step6_config, tmp_path: Path, monkeypatch) -> None:
    overrides = ("classifier.epochs=3", "classifier.loss_weighting=uncertainty", "classifier.gradient_accumulation_steps=2",
                 "classifier.class_balanced=true")
    straight = run_step(STEP, step6_config(*overrides, output_dir=tmp_path / "straight"))
    assert straight["resumed_from_epoch"] is None

    save = training_module.save_checkpoint

    def crash_after_first_epoch(path: Path, model, **extra):
        written = save(path, model, **extra)
        if path.name == LAST_FILE and extra["epoch"] == 1:
            raise RuntimeError("simulated crash")
        return written

    monkeypatch.setattr(training_module, "save_checkpoint", crash_after_first_epoch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_step(STEP, step6_config(*overrides, output_dir=tmp_path / "resumed"))
    monkeypatch.setattr(training_module, "save_checkpoint", save)

    interrupted = read_checkpoint(tmp_path / "resumed" / STEP.name / LAST_FILE)
    initial = ClassifierTraining(step6_config(*overrides, output_dir=tmp_path / "fresh"), load_data(
        step6_config(output_dir=tmp_path / "fresh"), tmp_path / "fresh" / STEP0, None), tmp_path / "fresh").model.state_dict()
    frozen = [key for key in initial if key.startswith("backbone.")]
    assert all(torch.equal(interrupted["model"][key], initial[key]) for key in frozen)  # stage 1 left the backbone alone

    resumed = run_step(STEP, step6_config(*overrides, "classifier.resume=latest", output_dir=tmp_path / "resumed"))
    assert resumed["resumed"] and resumed["resumed_from_epoch"] == 1
    a = read_checkpoint(tmp_path / "straight" / STEP.name / LAST_FILE)
    b = read_checkpoint(tmp_path / "resumed" / STEP.name / LAST_FILE)
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    assert torch.equal(a["loss"]["log_vars"], b["loss"]["log_vars"])
    strip = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])


def test_the_lr_schedule_waits_for_a_step_the_grad_scaler_skipped(step6_config, monkeypatch) -> None:
    calls = skip_optimizer_step(monkeypatch, skipped_call=2)
    config = step6_config("classifier.epochs=1", "classifier.freeze_epochs=0")
    out_dir = Path(config.run.output_dir) / STEP.name
    out_dir.mkdir()
    training = ClassifierTraining(config, load_data(config, Path(config.run.output_dir) / STEP0, None), out_dir)
    progress: list[int] = []
    training.run(lambda step, loss: progress.append(step))
    assert len(calls) == training.steps_per_epoch > 2
    assert training.lr_scheduler.last_epoch == training.steps_per_epoch - 1  # one step fewer on the schedule
    assert progress == list(range(1, training.steps_per_epoch + 1))  # the progress counts the skipped step too


def test_two_data_parallel_ranks_stay_in_sync_through_both_stages(step6_config, tiny_models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    step6_config(output_dir=out)  # Step 0 in place
    overrides = [*smoke_overrides(tiny_models_dir, out), "classifier.loss_weighting=uncertainty"]
    ranks = launch_two_cpu_ranks(f"neu_det_pipeline.{STEP.name}", "neu_det_pipeline.classifier.training.ClassifierTraining",
                                 ["--config", str(SMOKE_CONFIG), *overrides], tmp_path)
    assert read_json(out / STEP.name / "summary.json")["processes"] == 2
    assert ranks[0].keys() == ranks[1].keys() and any(key.endswith("log_vars") for key in ranks[0])
    assert all(torch.equal(ranks[0][key], ranks[1][key]) for key in ranks[0])


def test_synthetic_images_from_step4_and_the_curated_step5_set(step6_config, tmp_path: Path) -> None:
    config = step6_config("classifier.synthetic=step4", "classifier.synthetic_ratio=0.5")
    out = Path(config.run.output_dir)
    with pytest.raises(MissingStepOutputError, match=r"needs the outputs of step4_generate .*python -m neu_det_pipeline\.step4_generate"):
        run_step(STEP, config)
    rows = fabricate_step4(out, per_class=2)

    for ratio, per_class in ((0.5, 2), (0.17, 1)):  # 6 real training images per class: 3 wanted but 2 exist; 1
        data = load_data(step6_config(f"classifier.synthetic_ratio={ratio}", "classifier.synthetic=step4"), out / STEP0, out / "step4_generate")
        synthetic = [e for e in data.splits["train"] if e.origin == "synthetic"]
        assert len(synthetic) == 6 * per_class and len(data.splits["train"]) == 36 + 6 * per_class
    assert all(e.origin == "real" for split in ("val", "test") for e in data.splits[split])

    curated = out / "step5_evaluate" / "curated"
    curated.mkdir(parents=True)
    write_jsonl(curated / "manifest.jsonl", rows[::3])
    write_json(out / "step5_evaluate" / "summary.json", {"status": "complete", "fingerprint": "fabricated-step5"})
    summary = run_step(STEP, step6_config("classifier.synthetic=step5", "classifier.synthetic_only=true", "classifier.epochs=2"))
    assert summary["training_data"] == "step5 synthetic only"
    assert summary["images"]["train"] == {"synthetic": len(rows[::3])} and summary["images"]["test"] == {"real": 12}

    write_jsonl(curated / "manifest.jsonl", [{**rows[0], "file": "../../escape.png"}])
    with pytest.raises(DataError, match="points outside"):
        load_data(step6_config("classifier.synthetic=step5"), out / STEP0, out / "step5_evaluate")


def test_own_data_layout_without_step0(step6_config, step0_sample_dir: Path, tmp_path: Path) -> None:
    own = tmp_path / "own"
    (own / "images").mkdir(parents=True)
    (own / "masks").mkdir()
    manifest = [row for row in read_jsonl(step0_sample_dir / STEP0 / "manifest.jsonl") if row["class"] in ("crazing", "scratches")]
    lines = {"train": [], "val": []}
    for i, row in enumerate(manifest):
        shutil.copy(step0_sample_dir / STEP0 / row["image"], own / "images" / f"{row['id']}.png")
        if i % 2 == 0:  # every other image without a mask: defect-free
            shutil.copy(step0_sample_dir / STEP0 / row["mask"], own / "masks" / f"{row['id']}.png")
        lines["val" if i % 5 == 0 else "train"].append(f"{row['id']}.png,{row['class']}")
    for split, rows in lines.items():
        (own / f"{split}_labels.txt").write_text("\n".join(rows) + "\n")

    # Defect images without masks: Step 6's own-data check accepts them only when no masks are needed.
    config = step6_config(f"classifier.own_data={own}", "classifier.epochs=2", "classifier.mask_source=none", output_dir=tmp_path / "own-run", with_step0=False)
    data = load_data(config, tmp_path / "nowhere", None)
    assert data.classes == ["crazing", "scratches"] and data.splits["test"] == data.splits["val"]
    assert sum(e.mask is None for e in data.splits["train"] + data.splits["val"]) == len(manifest) // 2
    summary = run_step(STEP, config)  # no Step 0 in this run folder: own data replaces it
    assert summary["classes"] == ["crazing", "scratches"] and summary["images"]["train"] == {"real": len(lines["train"])}

    shutil.rmtree(own / "masks")
    with pytest.raises(DataError, match=r"own/masks is missing; classifier.own_data needs images/, masks/"):
        load_data(config, tmp_path / "nowhere", None)


def test_missing_step0_mask_and_normal_images(step6_config, tmp_path: Path) -> None:
    config = step6_config()
    step0 = Path(config.run.output_dir) / STEP0
    normal = tmp_path / "normal"
    normal.mkdir()
    for i, row in enumerate(read_jsonl(step0 / "manifest.jsonl")[:20]):
        shutil.copy(step0 / row["image"], normal / f"ok_{i}.png")
    binary = load_data(step6_config(f"classifier.normal_dir={normal}"), step0, None)
    assert binary.classes == [NORMAL, "defect"]
    assert sum(len(split) for split in binary.splits.values()) == 60 + 20
    assert all((e.label == 0) == (e.origin == "normal") and (e.mask is None) == (e.origin == "normal")
               for split in binary.splits.values() for e in split)

    victim = step0 / read_jsonl(step0 / "manifest.jsonl")[0]["mask"]
    victim.unlink()
    with pytest.raises(MissingStepOutputError, match=rf"{victim.name} \(listed in .*manifest.jsonl\) is missing; re-run .*step0_prepare"):
        run_step(STEP, config)


def test_predict_writes_overlays_and_csv_and_skips_unreadable_images(trained: Path, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    sources = sorted((Path(__file__).parents[1] / "data" / "neu-det-sample" / "IMAGES").glob("*_1*.jpg"))[:4]
    for source in sources:
        shutil.copy(source, images / source.name)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    cli.main(["predict", "--checkpoint", str(trained / BEST_FILE), str(images), "--out", str(tmp_path / "pred")])
    err = capsys.readouterr().err
    assert err.count("broken.jpg") == 1 and "unreadable image" in err and "predicted 4 image(s)" in err

    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    classes = TorchPredictor(trained / BEST_FILE).classes
    assert [row["file"] for row in rows] == [p.name for p in sources]
    for row in rows:
        probabilities = [float(row[c]) for c in classes]
        assert sum(probabilities) == pytest.approx(1, abs=1e-4) and row["class"] == classes[probabilities.index(max(probabilities))]
    overlays = sorted((tmp_path / "pred" / "overlays").iterdir())
    assert [p.stem for p in overlays] == [p.stem for p in sources]
    with Image.open(overlays[0]) as overlay:
        assert overlay.width == 3 * 256  # image, predicted mask, attention


def test_onnx_export_matches_torch_and_predicts_the_same(trained: Path, tmp_path: Path) -> None:
    result = export_onnx(trained / BEST_FILE, tmp_path / "model.onnx")
    assert result["outputs"] == ["logits", "mask_logits", "attention"]
    assert max(result["max_abs_difference"].values()) < 1e-4
    pixels = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(1)).numpy()  # batch 5: dynamic axis
    onnx_out, torch_out = make_predictor(tmp_path / "model.onnx")(pixels), make_predictor(trained / BEST_FILE)(pixels)
    assert make_predictor(tmp_path / "model.onnx").classes == TorchPredictor(trained / BEST_FILE).classes
    torch.testing.assert_close(torch.from_numpy(onnx_out.probabilities), torch.from_numpy(torch_out.probabilities), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(onnx_out.masks), torch.from_numpy(torch_out.masks), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("content", [b"garbage", "foreign"], ids=["corrupt", "not-a-classifier"])
def test_bad_checkpoints_give_one_line(trained: Path, tmp_path: Path, capsys, content) -> None:
    bad = tmp_path / "model.pt"
    if content == "foreign":
        torch.save({"weights": torch.zeros(2)}, bad)
    else:
        bad.write_bytes(content)
    with pytest.raises(PipelineError, match=rf"checkpoint {bad} is (corrupt|not a classifier checkpoint)"):
        load_classifier(bad)
    for command in (["predict", "--checkpoint", str(bad), str(tmp_path), "--out", str(tmp_path / "o")],
                    ["export-onnx", "--checkpoint", str(bad), "--out", str(tmp_path / "m.onnx")]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(command)
        assert exit_info.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in lines[0]
    assert not (tmp_path / "m.onnx").exists()
