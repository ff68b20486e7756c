"""Image feature extractors by name, for FID, KID, precision/recall and nearest neighbours.

    inception   Inception-v3 pool features (2048-d) with the torch-fidelity weights every published FID uses,
                through torchmetrics' `NoTrainInceptionV3`
    clip        CLIP image embeddings (`models.clip`), the space recent evaluation papers recommend
    dinov3      DINOv3 pooled (CLS) features (`models.dinov3`: timm or transformers weights, see `dinov3`)

Every extractor maps (N, H, W) uint8 grayscale arrays to an (N, D) float32 tensor on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.dinov3 import load_dinov3, preprocessor, vit_tokens, width
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.evaluation.images import gray_to_rgb
from neu_det_pipeline.models import inference_dtype, resolve_device


class FeatureExtractor:
    """A named image encoder run in batches."""

    def __init__(self, name: str, dim: int, encode: Callable[[np.ndarray], torch.Tensor], batch_size: int) -> None:
        self.name, self.dim, self._encode, self.batch_size = name, dim, encode, batch_size

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        chunks = []
        for start in range(0, len(pixels), self.batch_size):
            batch = pixels[start : start + self.batch_size]
            chunks.append(self._encode(batch).float().cpu())
            if progress:
                progress(len(batch))
        return torch.cat(chunks) if chunks else torch.zeros(0, self.dim)


def _inception(config: PipelineConfig, device: torch.device, dtype: torch.dtype) -> FeatureExtractor:
    from torchmetrics.image.fid import NoTrainInceptionV3

    weights = config.evaluation.inception_weights
    if weights is not None:
        if not Path(weights).is_file():
            raise PipelineError(f"evaluation.inception_weights: {weights} is not a file; set it to the torch-fidelity "
                                f"Inception weights (.pth) or to null to download them")
        # torch-fidelity unpickles the file without weights_only; only accept plain tensors.
        try:
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure means the file is not a plain state dict
            raise PipelineError(f"evaluation.inception_weights: {weights} is not a plain state dict ({type(exc).__name__}); "
                                f"use the torch-fidelity weights file") from None
    try:
        network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                     feature_extractor_weights_path=str(weights) if weights else None)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        raise PipelineError(
            f"Inception weights could not be loaded ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            f"set evaluation.inception_weights=FILE, or remove inception from evaluation.features"
        ) from None
    network = network.to(device)

    def encode(batch: np.ndarray) -> torch.Tensor:
        # uint8 RGB at any size: the network resizes to 299 px itself.
        return network(torch.from_numpy(batch).to(device).unsqueeze(1).expand(-1, 3, -1, -1))

    return FeatureExtractor("inception", 2048, encode, config.evaluation.batch_size)


def _clip(config: PipelineConfig, device: torch.device, dtype: torch.dtype) -> FeatureExtractor:
    from neu_det_pipeline.captions.scorers import CLIPScorer

    scorer = CLIPScorer.from_pretrained(config.models.clip, device, dtype)
    return FeatureExtractor("clip", scorer.model.config.projection_dim,
                            lambda batch: scorer.encode_images(gray_to_rgb(batch)), config.evaluation.batch_size)


def _dinov3(config: PipelineConfig, device: torch.device, dtype: torch.dtype) -> FeatureExtractor:
    model_id = config.models.dinov3
    model = load_dinov3(model_id).to(device, dtype).eval()
    preprocess = preprocessor(model_id, model)

    def encode(batch: np.ndarray) -> torch.Tensor:
        return vit_tokens(model, preprocess(gray_to_rgb(batch)).to(device, dtype))[:, 0]  # CLS

    return FeatureExtractor("dinov3", width(model), encode, config.evaluation.batch_size)


EXTRACTORS: dict[str, Callable[[PipelineConfig, torch.device, torch.dtype], FeatureExtractor]] = {
    "inception": _inception,
    "clip": _clip,
    "dinov3": _dinov3,
}


def extractor_dtype(name: str, config: PipelineConfig) -> torch.dtype:
    """The dtype the `name` extractor runs in on `run.device`."""
    if name == "inception":
        # Its features feed covariance estimates, where half precision loses digits.
        return torch.float32
    device = resolve_device(config.run.device)
    return inference_dtype(device, config.run.mixed_precision, "DINOv3" if name == "dinov3" else None)  # bf16 or fp32


def load_extractor(name: str, config: PipelineConfig) -> FeatureExtractor:
    """The extractor for an `evaluation.features` entry, on `run.device`."""
    return EXTRACTORS[name](config, resolve_device(config.run.device), extractor_dtype(name, config))
