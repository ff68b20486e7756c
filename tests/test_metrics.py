"""Metric sanity on real sample images, the folder readers, `neu-det metrics` and its bad-input lines,
and the low-data protocol's Step 0 split."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_ROOT, SHARED_NEU_DET, SMOKE_CONFIG

from neu_det_pipeline.config import NEU_DET_CLASSES, load_config
from neu_det_pipeline.errors import DataError
from neu_det_pipeline.evaluation.features import load_extractor
from neu_det_pipeline.evaluation.fidelity import distribution_metrics, kernel_distance, precision_recall
from neu_det_pipeline.evaluation.images import ImageFolder, read_image_folder
from neu_det_pipeline.evaluation.perceptual import LPIPSDistance, edge_ssim, lbp_class_matrix, lbp_histogram
from neu_det_pipeline.evaluation.utility import gain_recovered, image_consistency, synthetic_subset
from neu_det_pipeline.testing.random_inception import random_inception_weights


@pytest.fixture(scope="module")
def sample() -> ImageFolder:
    return read_image_folder(SAMPLE_ROOT).load()


def _halves(folder: ImageFolder) -> tuple[ImageFolder, ImageFolder]:
    """Two disjoint real sets with the same class balance."""
    per_class = {name: folder.indices_of(name) for name in folder.classes}
    first = [i for indices in per_class.values() for i in indices[0::2]]
    second = [i for indices in per_class.values() for i in indices[1::2]]
    return folder.subset(first), folder.subset(second)


def test_kid_of_real_vs_real_is_below_real_vs_degraded(sample: ImageFolder, tmp_path: Path) -> None:
    per_class = [sample.indices_of(name) for name in sample.classes]
    real_a = sample.subset([i for indices in per_class for i in indices[0:2]])
    real_b = sample.subset([i for indices in per_class for i in indices[2:4]])
    # Noise, not blur: a random network is no blur detector (blurred images even land nearer the real ones),
    # but any conv stack responds to added high-frequency energy.
    noise = np.random.default_rng(0).normal(0, 40, real_b.pixels.shape)
    degraded = np.clip(real_b.pixels + noise, 0, 255).astype(np.uint8)
    weights = random_inception_weights(tmp_path / "inception.pth", sample.pixels[4::10])
    config = load_config(SMOKE_CONFIG, [f"evaluation.inception_weights={weights}", "evaluation.batch_size=12"])
    extractor = load_extractor("inception", config)
    features_a, features_b, features_degraded = extractor(real_a.pixels), extractor(real_b.pixels), extractor(degraded)
    assert features_a.shape == (12, 2048) and features_a.std() > 1e-2  # a properly initialised network
    kid_real, _ = kernel_distance(features_a, features_b, subsets=20, subset_size=6, seed=0)
    kid_degraded, _ = kernel_distance(features_a, features_degraded, subsets=20, subset_size=6, seed=0)
    assert kid_real < kid_degraded


def test_precision_recall_of_a_set_against_itself_is_one(sample: ImageFolder, make_config) -> None:
    features = load_extractor("dinov3", make_config())(sample.pixels)
    assert precision_recall(features, features, k=3) == (1.0, 1.0)
    result = distribution_metrics(features[:10], features[10:20], kid_subsets=5, kid_subset_size=100, k=3, seed=0)
    assert result["kid_subset_size"] == 5 and not result["fid_reliable"] and result["notes"]
    too_few = distribution_metrics(features[:1], features[1:5], kid_subsets=5, kid_subset_size=100, k=3, seed=0)
    assert too_few["kid_mean"] is None and too_few["fid"] is None and "at least 2" in too_few["notes"][0]


def test_dinov3_features_are_the_cls_token_of_either_weights_form(sample: ImageFolder, make_config, tiny_models_dir: Path) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor

    from neu_det_pipeline.dinov3 import load_dinov3

    pixels = sample.pixels[:3]
    timm_folder = tiny_models_dir / "dinov3-timm"
    features = load_extractor("dinov3", make_config(f"models.dinov3={timm_folder}"))(pixels)
    # timm form: bicubic resize to the checkpoint's input size, its pretrained_cfg mean/std, the CLS token.
    model = load_dinov3(str(timm_folder)).eval()
    config = model.pretrained_cfg
    side = config["input_size"][-1]
    resized = np.stack([np.asarray(Image.fromarray(p).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)) for p in pixels])
    mean, std = (torch.tensor(config[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
    normalised = ((torch.from_numpy(resized).permute(0, 3, 1, 2) / 255 - mean) / std).float()
    with torch.no_grad():
        torch.testing.assert_close(features, model.forward_features(normalised)[:, 0], atol=1e-4, rtol=1e-4)

    # transformers form: its image processor, the pooled (CLS) output.
    folder = tiny_models_dir / "dinov3"
    features = load_extractor("dinov3", make_config(f"models.dinov3={folder}"))(pixels)
    model = load_dinov3(str(folder)).eval()
    inputs = AutoImageProcessor.from_pretrained(folder)(images=[Image.fromarray(p).convert("RGB") for p in pixels], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(features, model(**inputs).pooler_output)
    assert features.shape == (3, model.config.hidden_size)


def test_lpips_of_an_image_with_itself_is_zero(sample: ImageFolder) -> None:
    lpips = LPIPSDistance("alex", pretrained_backbone=False, device=torch.device("cpu"), batch_size=4)
    assert np.all(lpips(sample.pixels[:4], sample.pixels[:4]) == 0)
    assert np.all(lpips(sample.pixels[:4], sample.pixels[4:8]) > 0)


def test_edge_ssim_of_an_image_with_itself_is_one(sample: ImageFolder) -> None:
    assert edge_ssim(sample.pixels[0], sample.pixels[0]) == pytest.approx(1.0, abs=1e-9)
    assert edge_ssim(sample.pixels[0], sample.pixels[1]) < 0.9


def _lbp_matrix(first: ImageFolder, second: ImageFolder) -> np.ndarray:
    hists = lambda folder: np.stack([lbp_histogram(p, [1, 2, 3]) for p in folder.pixels])  # noqa: E731
    return np.array(lbp_class_matrix(hists(first), first.labels, hists(second), second.labels, first.classes))


def test_lbp_matrix_of_a_real_set_against_itself_peaks_on_the_diagonal(sample: ImageFolder) -> None:
    matrix = _lbp_matrix(sample, sample)
    assert np.allclose(np.diag(matrix), 1.0) and list(matrix.argmax(axis=1)) == list(range(6))
    assert (matrix <= 1.0 + 1e-12).all() and (matrix >= 0).all()


@pytest.mark.skipif(not (SHARED_NEU_DET / "IMAGES").is_dir(), reason="../shared/neu-det is not present")
def test_lbp_matrix_of_disjoint_real_sets_peaks_on_the_diagonal() -> None:
    """With 40 images per class and side, every class's texture is nearest to its own class. (The 60-image
    sample's 5 per side are too few: pitted surface and inclusion then swap on some splits.)"""
    real = read_image_folder(SHARED_NEU_DET)
    per_class = [real.indices_of(name) for name in real.classes]
    first = real.subset([i for indices in per_class for i in indices[0:80:2]]).load()
    second = real.subset([i for indices in per_class for i in indices[1:80:2]]).load()
    assert list(_lbp_matrix(first, second).argmax(axis=1)) == list(range(6))


def test_label_consistency_and_gain_recovered() -> None:
    classes = list(NEU_DET_CLASSES)
    box = {"label": "crazing", "xmin": 10, "ymin": 10, "xmax": 50, "ymax": 50}
    hit = {"label": 0, "conf": 0.9, "xmin": 12, "ymin": 10, "xmax": 50, "ymax": 52}
    wrong_class = {**hit, "label": 1}
    assert image_consistency("crazing", [box], [hit], classes) == {"recall": 1.0, "agrees": True, "top": "crazing 0.90"}
    assert image_consistency("crazing", [box], [wrong_class], classes)["recall"] == 0.0
    assert not image_consistency("crazing", [box], [], classes)["agrees"]
    assert gain_recovered(0.4, 0.5, 0.6) == 0.5 and gain_recovered(0.4, 0.5, 0.4) is None
    names = [f"img{i}" for i in range(10)]
    assert set(synthetic_subset(names, 4, 0.5, 0)) < set(synthetic_subset(names, 4, 1.0, 0))
    assert len(synthetic_subset(names, 4, 5.0, 0)) == 10


# --------------------------------------------------------------------------- folders and `neu-det metrics`


def _class_folders(root: Path, per_class: int = 5, classes=NEU_DET_CLASSES) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True)
        for image in sorted((SAMPLE_ROOT / "IMAGES").glob(f"{name}_*.jpg"))[:per_class]:
            shutil.copy(image, root / name / image.name)
    return root


def test_readers_label_every_layout(tmp_path: Path, step0_sample_dir: Path) -> None:
    neu = read_image_folder(SAMPLE_ROOT)
    assert neu.layout == "neu-det" and neu.counts() == {name: 10 for name in NEU_DET_CLASSES}
    yolo = read_image_folder(step0_sample_dir / "step0_prepare" / "yolo")
    assert yolo.layout == "yolo" and len(yolo) == 60 and yolo.classes == list(NEU_DET_CLASSES)
    # NEU-DET images are named after their class; most boxes carry it (a few carry another class).
    assert sum(Path(i.path).stem.startswith(i.image_class) for i in yolo.images) >= 55
    folders = read_image_folder(_class_folders(tmp_path / "cf"))
    assert folders.layout == "class-folders" and folders.counts() == {name: 5 for name in NEU_DET_CLASSES}


def neu_det(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neu_det_pipeline.cli", *args], capture_output=True, text=True)


def test_metrics_command_scores_two_folders(tmp_path: Path, tiny_models_dir: Path) -> None:
    synth = _class_folders(tmp_path / "synth")
    out = tmp_path / "report"
    result = neu_det("metrics", str(SAMPLE_ROOT), str(synth), "--out", str(out), "evaluation.features=[clip]",
                     f"models.clip={tiny_models_dir / 'clip'}", "evaluation.lpips_pretrained_backbone=false",
                     "evaluation.kid_subsets=5", "run.device=cpu")
    assert result.returncode == 0, result.stderr
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    overall = metrics["fidelity"]["clip"]["synthetic"]["all"]
    assert overall["n_real"] == 60 and overall["n_synth"] == 30
    assert overall["recall"] <= 1 and overall["precision"] == 1.0  # every synthetic image is one of the real ones
    assert metrics["layouts"] == {"real": "neu-det", "synthetic": "class-folders"}
    assert (out / "report.html").is_file() and "KID" in result.stderr


def _unreadable(root: Path) -> Path:
    folder = _class_folders(root)
    (folder / "crazing" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return folder


BAD_FOLDERS = {
    # name: (make the synthetic folder, text the error line must hold)
    "empty": (lambda root: root.mkdir() or root, "holds no labelled images"),
    "unreadable": (_unreadable, "unreadable image"),
    "mismatched_classes": (lambda root: _class_folders(root).joinpath("crazing").rename(root / "rust").parent, "class names differ"),
    "too_few": (lambda root: _class_folders(root, per_class=1, classes=["crazing", "patches"]), "need at least 4"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_metrics_command_bad_input_is_one_line(tmp_path: Path, case: str) -> None:
    make, expected = BAD_FOLDERS[case]
    synth = make(tmp_path / "synth")
    out = tmp_path / "out"
    result = neu_det("metrics", str(SAMPLE_ROOT), str(synth), "--out", str(out), "evaluation.features=[clip]",
                     "evaluation.lpips_pretrained_backbone=false", "models.clip=/nowhere/clip")
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_reader_rejects_paths_escaping_a_step4_folder(tmp_path: Path) -> None:
    (tmp_path / "manifest.jsonl").write_text('{"name": "x", "file": "../../etc/passwd", "class": "crazing"}\n')
    with pytest.raises(DataError, match="points outside"):
        read_image_folder(tmp_path)


# --------------------------------------------------------------------------- low-data protocol (Step 0)


def test_train_fraction_holds_back_a_nested_stratified_part(tmp_path: Path) -> None:
    from neu_det_pipeline.artifacts import train_rows
    from neu_det_pipeline.recipe import run_step
    from neu_det_pipeline.step0_prepare import STEP

    kept = {}
    for fraction in (1.0, 0.5, 0.34):
        out = tmp_path / str(fraction)
        config = load_config(SMOKE_CONFIG, [f"data.root={SAMPLE_ROOT}", f"run.output_dir={out}", "run.tiny_models_dir=null",
                                            f"data.train_fraction={fraction}"])
        summary = run_step(STEP, config)
        step0 = out / "step0_prepare"
        kept[fraction] = {row["id"] for row in train_rows(step0)}
        held_out = set((step0 / "splits" / "train_heldout.txt").read_text().split()) if fraction < 1 else set()
        assert len(kept[fraction]) + len(held_out) == 36 and not kept[fraction] & held_out
        assert summary["split_sizes"]["val"] == summary["split_sizes"]["test"] == 12
        for image_id in held_out:
            assert (step0 / "yolo" / "images" / "train_heldout" / f"{image_id}.jpg").is_file()
    assert len(kept[0.5]) == 18 and len(kept[0.34]) == 12  # per class: round(6 * fraction)
    assert kept[0.34] < kept[0.5] < kept[1.0]
