"""`evaluation`: Step 5's metrics, curation and detector utility."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from neu_det_pipeline.config.base import Section, check_distinct


class CurationConfig(Section):
    memorised_similarity: float = Field(0.95, gt=0, le=1)
    """Reject a synthetic image whose correlation with a real training image (or one of its flips and 90-degree
    rotations), both as `memorised_size` px grayscale thumbnails, reaches this value."""
    memorised_size: int = Field(32, ge=8)
    """Side of the grayscale thumbnails compared for memorisation."""
    min_std: float = Field(4.0, ge=0)
    """Reject as degenerate (blank, near-constant, black) below this pixel standard deviation (0-255 levels)."""
    max_saturated_fraction: float = Field(0.5, gt=0, le=1)
    """Reject as degenerate (saturated) when more than this fraction of pixels is 0 or 255."""
    label_consistency: bool = True
    """Reject off-class or label-inconsistent images: the real-data YOLO finds no box of the image's class."""
    min_detector_map50: float = Field(0.3, ge=0, le=1)
    """The label-consistency rule applies only when the real-only detector reaches this test mAP50 (a weak
    detector would reject good images); otherwise it is skipped and the summary says why."""
    score: Literal["mahalanobis", "knn"] = "mahalanobis"
    """Each synthetic image's distance to the real training images of its class in feature space: `mahalanobis`
    (to the class mean, Ledoit-Wolf shrunk covariance) or `knn` (mean Euclidean distance to the `score_neighbours`
    nearest real images). Always computed and reported; `keep` decides whether it drops images."""
    score_features: Literal["inception", "clip", "dinov3"] | None = None
    """Feature space of the score; null: the first of `evaluation.features`."""
    score_neighbours: int = Field(5, ge=1)
    """k of the `knn` score."""
    keep: Literal["all", "top_k", "top_p"] = "all"
    """After the rules, per class: `all` keeps every image, `top_k` the `top_k` nearest to the real class,
    `top_p` the nearest `top_p` fraction (rounded up)."""
    top_k: int = Field(100, ge=1)
    """Images kept per class under `keep: top_k`."""
    top_p: float = Field(0.9, gt=0, le=1)
    """Fraction of each class kept under `keep: top_p`."""


UtilityArm = Literal["real", "real+synthetic", "oracle", "real+classical", "real+copy_paste"]
UTILITY_ARMS: tuple[str, ...] = get_args(UtilityArm)


class UtilityConfig(Section):
    enabled: bool = True
    """Train YOLO on real and on real + curated synthetic data (the headline result); false: image metrics only."""
    arms: list[UtilityArm] = Field(default_factory=lambda: list(UTILITY_ARMS))
    """Training sets, each tested on the real test split: `real` (the baseline, always trained), `real+synthetic`
    (curated Step 4 images at each ratio), `oracle` (kept + held-back real images, with `data.train_fraction` < 1),
    `real+classical` (albumentations transforms of real training images) and `real+copy_paste` (real defect boxes
    pasted into other real images of their class): the two control arms add as many images as the synthetic arm."""
    synthetic_ratios: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0])
    """Curated synthetic images added per real training image (0 = real only); the control arms follow them."""
    mode: Literal["add", "replace"] = "add"
    """`add`: added images come on top of the real training images; `replace`: as many real training images
    (seeded) make room for them, so every arm keeps the real-only training-set size."""
    budget: Literal["epochs", "iterations"] = "epochs"
    """`epochs`: every run trains `epochs` epochs (more data means more steps); `iterations`: every run trains the
    same number of batches, as the whole number of epochs closest to `iterations` batches (ultralytics counts epochs)."""
    iterations: int | None = Field(None, ge=1)
    """Training batches per run under `budget: iterations`; null: `epochs` times the real-only set's batches per epoch."""
    seeds: list[int] = Field(default_factory=lambda: [0])
    """Training seeds of every run; with several, mean and spread are reported (generation seeds: `generation.seeds`)."""
    bootstrap_resamples: int = Field(1000, ge=10)
    """Paired bootstrap resamples of the test images for the confidence interval of each arm's mAP50 minus real's."""
    epochs: int = Field(100, ge=1)
    """YOLO training epochs (the same for every run under `budget: epochs`)."""
    imgsz: int = Field(224, ge=32)
    """YOLO training and evaluation image size (NEU-DET images are 200 px)."""
    batch: int = Field(16, ge=1)
    """YOLO batch size."""
    workers: int = Field(2, ge=0)
    """YOLO data-loader workers."""
    conf: float = Field(0.25, gt=0, lt=1)
    """Detection confidence threshold for label consistency."""

    @field_validator("synthetic_ratios")
    @classmethod
    def _ratios(cls, ratios: list[float]) -> list[float]:
        if not ratios or any(r < 0 for r in ratios) or len(set(ratios)) != len(ratios):
            raise ValueError(f"evaluation.utility.synthetic_ratios={ratios} must be distinct numbers >= 0")
        return ratios

    @field_validator("arms")
    @classmethod
    def _arms(cls, arms: list[str]) -> list[str]:
        if "real" not in arms or len(set(arms)) != len(arms):
            raise ValueError(f"evaluation.utility.arms={arms} must list `real` (the baseline every arm is compared with) and no arm twice")
        return arms

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        return check_distinct("evaluation.utility.seeds", seeds, "seeds")


class EvaluationConfig(Section):
    features: list[Literal["inception", "clip", "dinov3"]] = Field(default_factory=lambda: ["inception", "dinov3"])
    """Feature spaces of FID, KID and precision/recall: `inception` (torch-fidelity weights), `clip`
    (`models.clip`), `dinov3` (`models.dinov3`); the first one also picks LPIPS nearest-neighbour candidates."""
    inception_weights: Path | None = None
    """Local torch-fidelity Inception-v3 weights file; null downloads them on first use."""
    batch_size: int = Field(32, ge=1)
    """Images per feature-extractor and LPIPS forward pass."""
    kid_subsets: int = Field(100, ge=2)
    """KID subsets (mean and std over them)."""
    kid_subset_size: int = Field(1000, ge=2)
    """Images per KID subset, capped at half the smaller side so that subsets differ (the size used is reported)."""
    pr_neighbourhood: int = Field(3, ge=1)
    """k of the k-NN manifolds of precision and recall (Kynkäänniemi et al. 2019)."""
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    """LPIPS backbone."""
    lpips_pretrained_backbone: bool = True
    """ImageNet weights for the LPIPS backbone (torchvision downloads them once); false only for offline tests."""
    lpips_pairs: int = Field(200, ge=1)
    """Random image pairs per class for intra-class LPIPS diversity."""
    lpips_candidates: int = Field(5, ge=1)
    """Nearest real training images (in the first feature space) among which LPIPS picks the nearest one."""
    lbp_radii: list[int] = Field(default_factory=lambda: [1, 2, 3])
    """Uniform-LBP radii (8 * radius points each); their histograms are concatenated."""
    ic_lpips_cluster_size: int = Field(50, ge=2)
    """IC-LPIPS: at most this many random members of each cluster enter its mean pairwise LPIPS (Ojha et al. 2021
    use 50)."""
    in_box: bool = True
    """Also compute KID (first feature space) and LPIPS inside the boxes, on box crops resized to `box_crop_size`."""
    box_crop_size: int = Field(64, ge=16)
    """Side (px) the box crops are resized to for the in-box metrics."""
    feature_cache_dir: Path | None = None
    """Folder of cached per-image features keyed by (image content, extractor, weights) and per-class LPIPS
    diversities keyed by (the class's images, pairs, LPIPS weights); null: `feature_cache/` in the step folder
    (Step 5) or the `--out` folder (`neu-det metrics`). Point runs at one folder to share them."""
    clip_score: bool = True
    """CLIP score of each synthetic image against its prompt (`models.clip`)."""
    report_samples: int = Field(6, ge=1)
    """Images per class in the report's real-vs-synthetic contact sheets."""
    curation: CurationConfig = Field(default_factory=CurationConfig)
    """Which synthetic images enter the curated training set."""
    utility: UtilityConfig = Field(default_factory=UtilityConfig)
    """YOLO trained on real vs real + curated synthetic, tested on the real test split."""

    @field_validator("features")
    @classmethod
    def _distinct_features(cls, features: list[str]) -> list[str]:
        return check_distinct("evaluation.features", features, "feature spaces")

    @field_validator("lbp_radii")
    @classmethod
    def _positive_radii(cls, radii: list[int]) -> list[int]:
        if not radii or any(r < 1 for r in radii):
            raise ValueError(f"evaluation.lbp_radii={radii} must be a non-empty list of radii >= 1")
        return radii

    @model_validator(mode="after")
    def _score_space_is_extracted(self) -> EvaluationConfig:
        space = self.curation.score_features
        if space is not None and space not in self.features:
            raise ValueError(f"evaluation.curation.score_features={space} is not in evaluation.features={self.features}; "
                             f"add it there or set score_features to null (the first feature space)")
        return self
