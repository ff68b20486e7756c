"""Step 5's metrics comparable with the literature and its own cost: IC-LPIPS, in-box crops, the provenance in
metrics.json, the feature cache, and `neu-det metrics` offline with the default config."""

from __future__ import annotations

import json
import shutil
import socket
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_ROOT, SMOKE_CONFIG

from neu_det_pipeline.evaluation.features import FeatureCache, FeatureExtractor
from neu_det_pipeline.evaluation.images import ImageFolder, read_image_folder
from neu_det_pipeline.evaluation.perceptual import LPIPSDistance, intra_cluster_lpips, nearest_by_lpips

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sample() -> ImageFolder:
    return read_image_folder(SAMPLE_ROOT).load()


@pytest.fixture(scope="module")
def patches(sample: ImageFolder) -> np.ndarray:
    """64 px corners of real images: LPIPS is cheap at that size."""
    return np.ascontiguousarray(sample.pixels[::6, :64, :64])


@pytest.fixture(scope="module")
def lpips() -> LPIPSDistance:
    return LPIPSDistance("alex", pretrained_backbone=False, device=torch.device("cpu"), batch_size=8)


def test_ic_lpips_is_the_mean_over_clusters_of_mean_pairwise_lpips(patches: np.ndarray, lpips: LPIPSDistance) -> None:
    synth = patches[:6]
    # Cluster 0 holds images 0-2, cluster 1 images 3-4, cluster 2 image 5 alone (no pair: left out, as in Ojha et al.).
    assigned = np.array([0, 0, 0, 1, 1, 2])
    pair = lambda i, j: float(lpips(synth[[i]], synth[[j]])[0])  # noqa: E731
    expected = np.mean([np.mean([pair(i, j) for i, j in combinations(range(3), 2)]), pair(3, 4)])
    result = intra_cluster_lpips(lpips, synth, assigned, cluster_size=50, seed=0)
    assert result["clusters"] == 3 and result["clusters_scored"] == 2
    assert result["ic_lpips"] == pytest.approx(expected, abs=1e-5)


def test_copies_of_real_images_join_their_own_cluster_and_score_zero(patches: np.ndarray, lpips: LPIPSDistance) -> None:
    centres = patches[:4]
    synth = centres[[2, 0, 2, 0]]  # two copies each of real images 2 and 0
    distances, assigned = nearest_by_lpips(lpips, synth, centres, np.tile(np.arange(4), (4, 1)))
    assert assigned.tolist() == [2, 0, 2, 0] and np.all(distances == 0)
    assert intra_cluster_lpips(lpips, synth, assigned, 50, 0)["ic_lpips"] == 0


def test_box_crops_cut_each_box_at_the_evaluation_size(tmp_path: Path) -> None:
    folder = read_image_folder(SAMPLE_ROOT)
    folder = folder.subset(folder.indices_of("scratches")[:2]).load()
    crops, labels, owners = folder.box_crops(32)
    assert crops.shape == (sum(len(i.boxes) for i in folder.images), 32, 32)
    assert labels == [box.label for image in folder.images for box in image.boxes]
    box = folder.images[0].boxes[0]
    x0, y0, x1, y1 = (round(v * 200) for v in box[1:])
    from PIL import Image

    expected = np.asarray(Image.fromarray(folder.pixels[0][y0:y1, x0:x1]).resize((32, 32), Image.Resampling.BICUBIC))
    assert owners[0] == 0 and np.array_equal(crops[0], expected)


def test_feature_cache_computes_each_image_once_per_extractor_and_weights(tmp_path: Path, sample: ImageFolder) -> None:
    calls = []

    def encode(batch: np.ndarray) -> torch.Tensor:
        calls.append(len(batch))
        return torch.from_numpy(batch.reshape(len(batch), -1)[:, :4].astype(np.float32))

    extractor = FeatureExtractor("toy", 4, encode, batch_size=16, weights="sha256:aaa")
    cache = FeatureCache(tmp_path / "cache")
    first, computed = cache.features(extractor, sample.pixels[:20])
    assert computed == 20 and sum(calls) == 20
    # The same real images beside new ones: only the new ones are computed, the cached ones read back unchanged.
    second, computed = cache.features(extractor, np.concatenate([sample.pixels[:20], sample.pixels[20:25]]))
    assert computed == 5 and sum(calls) == 25 and torch.equal(second[:20], first)
    other_weights = FeatureExtractor("toy", 4, encode, batch_size=16, weights="sha256:bbb")
    assert cache.features(other_weights, sample.pixels[:20])[1] == 20
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".npy")]  # no temp files left


def test_lpips_diversity_is_cached_per_class_by_contents_pairs_and_weights(tmp_path: Path, sample: ImageFolder, patches: np.ndarray,
                                                                          lpips: LPIPSDistance) -> None:
    from neu_det_pipeline.config import load_config
    from neu_det_pipeline.evaluation.suite import MetricSuite

    labels = [sample.labels[i] for i in range(0, len(sample.labels), 6)]
    classes = sorted(set(labels))
    config = load_config(SMOKE_CONFIG, ["evaluation.lpips_pairs=4"])
    suite = MetricSuite(config, lambda items, total, description: iter(items), tmp_path / "cache")
    first = suite.diversity(lpips, patches, labels, classes)
    assert suite.diversity_counts == {"computed": len(classes), "reused": 0}
    seeds = {name: config.run.seed + i for i, name in enumerate(classes)}
    members = lambda pixels, name: pixels[np.asarray(labels) == name]  # noqa: E731
    assert all(first[name] == lpips.diversity(members(patches, name), 4, seeds[name]) for name in classes)
    assert suite.diversity(lpips, patches, labels, classes) == first  # read back: a run over the same real images
    assert suite.diversity_counts == {"computed": len(classes), "reused": len(classes)}

    changed = patches.copy()
    changed[labels.index(classes[0])] ^= 1  # one image of the first class changes by one grey level
    suite.diversity(lpips, changed, labels, classes)
    assert suite.diversity_counts == {"computed": len(classes) + 1, "reused": 2 * len(classes) - 1}

    # A random backbone is drawn from a fixed seed: another one is the same network; other weights are another.
    assert LPIPSDistance("alex", pretrained_backbone=False, device=torch.device("cpu"), batch_size=8).identity == lpips.identity
    other = LPIPSDistance("alex", pretrained_backbone=False, device=torch.device("cpu"), batch_size=8)
    with torch.no_grad():
        next(other.model.parameters()).add_(0.5)
    assert other.identity != lpips.identity
    suite.diversity(other, patches, labels, classes)
    assert suite.diversity_counts["computed"] == 2 * len(classes) + 1


def test_metrics_offline_with_the_default_config_names_what_it_could_not_compute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """No network and no cached weights: Inception, DINOv3 and the LPIPS backbone cannot load; the LBP class
    matrix still comes out, every missing metric is named with why and the fix, and the command exits 0."""
    from neu_det_pipeline.cli import main

    def blocked(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", blocked)
    monkeypatch.setattr(socket, "create_connection", blocked)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    halves = {}
    for half, start in (("first", 0), ("second", 1)):  # two folders of real NEU-DET images, 5 per class each
        root = tmp_path / half
        for sub in ("IMAGES", "ANNOTATIONS"):
            (root / sub).mkdir(parents=True)
        for image in sorted((SAMPLE_ROOT / "IMAGES").glob("*.jpg"))[start::2]:
            shutil.copy(image, root / "IMAGES" / image.name)
            shutil.copy(SAMPLE_ROOT / "ANNOTATIONS" / f"{image.stem}.xml", root / "ANNOTATIONS" / f"{image.stem}.xml")
        halves[half] = root
    out = tmp_path / "out"
    assert main(["metrics", str(halves["first"]), str(halves["second"]), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    missing = {entry["metric"]: entry["why"] for entry in metrics["not_computed"]}
    assert "evaluation.inception_weights" in missing["KID, FID, precision/recall in inception space"]
    assert "models.dinov3" in missing["KID, FID, precision/recall in dinov3 space"]
    for metric in ("LPIPS diversity", "LPIPS to nearest real", "IC-LPIPS", "in-box LPIPS"):
        assert "evaluation.lpips_pretrained_backbone" in missing[metric]
    assert metrics["fidelity"] == {} and metrics["lpips"]["diversity"] is None
    matrix = np.array(metrics["lbp"]["synthetic_vs_real"])
    assert matrix.shape == (6, 6) and np.isfinite(matrix).all()
    assert metrics["sample_sizes"]["real"] == {name: 5 for name in metrics["lbp"]["classes"]}
    assert metrics["provenance"]["versions"]["torch-fidelity"] and metrics["provenance"]["lpips"]["net"] == "alex"
    assert metrics["provenance"]["lpips"]["dtype"] == "fp32"
    console = capsys.readouterr()
    printed = [line for line in (console.out + console.err).splitlines() if line.startswith("not computed: ")]
    assert len(printed) == len(missing) and all(any(m in line for line in printed) for m in missing)
    report = (out / "report.html").read_text()
    assert "Metrics not computed" in report and all(m in report for m in missing) and "IC-LPIPS" in report


def test_inception_features_are_torch_fidelitys(sample: ImageFolder, tmp_path: Path) -> None:
    """The FID feature space must be the published one: torch-fidelity's network and its TF1-style resize to 299 px
    (torchmetrics' default antialiased resize gives other features)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from neu_det_pipeline.config import load_config
    from neu_det_pipeline.evaluation.features import load_extractor
    from neu_det_pipeline.testing.random_inception import random_inception_weights

    weights = random_inception_weights(tmp_path / "inception.pth", sample.pixels[::20])
    ours = load_extractor("inception", load_config(SMOKE_CONFIG, [f"evaluation.inception_weights={weights}"]))(sample.pixels[:2])
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)).eval()
    with torch.no_grad():
        expected = reference(torch.from_numpy(sample.pixels[:2]).unsqueeze(1).expand(-1, 3, -1, -1).contiguous())[0]
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("n_real, n_synth", [(12, 20), (150, 90)])  # fewer and more images than the 64 dimensions
def test_frechet_distance_equals_torchmetrics(n_real: int, n_synth: int) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    from neu_det_pipeline.evaluation.fidelity import PrecomputedFeatures, frechet_distance

    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(64, 64, generator=generator, dtype=torch.float64)
    real = torch.randn(n_real, 64, generator=generator, dtype=torch.float64) @ mixing
    synth = torch.randn(n_synth, 64, generator=generator, dtype=torch.float64) @ mixing * 1.3 + 0.5
    reference = FrechetInceptionDistance(feature=PrecomputedFeatures(64))
    reference.update(real, real=True)
    reference.update(synth, real=False)
    assert frechet_distance(real, synth) == pytest.approx(float(reference.compute()), rel=1e-6)
    assert frechet_distance(real, real) == pytest.approx(0, abs=1e-6)
