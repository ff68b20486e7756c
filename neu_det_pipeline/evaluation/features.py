"""Image feature extractors by name, for FID, KID, precision/recall and nearest neighbours.

    inception   Inception-v3 pool features (2048-d) with the torch-fidelity weights every published FID uses,
                through torchmetrics' `NoTrainInceptionV3`
    clip        CLIP image embeddings (`models.clip`), the space recent evaluation papers recommend
    dinov3      DINOv3 pooled (CLS) features (`models.dinov3`: timm or transformers weights, see `dinov3`)

Every extractor maps (N, H, W) uint8 grayscale arrays to an (N, D) float32 tensor on the CPU, and says which
weights it runs (`weights`: a file's sha256, or a hub id with its cached commit) and the side of the square image
its network is fed (`input_size`): what a reader needs to compare the numbers with published ones.

`FeatureCache` keeps features on disk per (image content, extractor, weights, dtype), so the real images' features
are computed once per machine when runs share `evaluation.feature_cache_dir`.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from neu_det_pipeline.config import PipelineConfig
from neu_det_pipeline.dinov3 import load_dinov3, preprocessor, vit_tokens, width
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.evaluation.images import gray_to_rgb
from neu_det_pipeline.io import atomic_write_bytes, sha256_of_files
from neu_det_pipeline.models import DTYPE_NAMES, inference_dtype, local_folder, resolve_device

INCEPTION_INPUT = 299
"""torch-fidelity's Inception-v3 resizes every image to 299 px (bilinear) inside the network."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


class FeatureExtractor:
    """A named image encoder run in batches."""

    def __init__(self, name: str, dim: int, encode: Callable[[np.ndarray], torch.Tensor], batch_size: int,
                 model: str = "", weights: str = "", input_size: int = 0, dtype: str = "fp32") -> None:
        self.name, self.dim, self._encode, self.batch_size = name, dim, encode, batch_size
        self.model, self.weights, self.input_size, self.dtype = model, weights, input_size, dtype

    def describe(self) -> dict[str, object]:
        """What metrics.json records of this feature space."""
        return {"model": self.model, "weights": self.weights, "input_size": self.input_size, "dim": self.dim, "dtype": self.dtype}

    @property
    def cache_key(self) -> str:
        """Folder name in the feature cache: features of other weights or another dtype never mix."""
        return f"{self.name}-{hashlib.sha256(f'{self.weights}|{self.dtype}'.encode()).hexdigest()[:16]}"

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
        # antialias=False: torch-fidelity's TF1-style bilinear resize to 299 px, as in the original FID code;
        # torchmetrics' default (torch's antialiased resize) gives other features, so other FIDs.
        network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                     feature_extractor_weights_path=str(weights) if weights else None, antialias=False)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        raise PipelineError(
            f"Inception weights could not be loaded ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            f"set evaluation.inception_weights=FILE, or remove inception from evaluation.features"
        ) from None
    network = network.to(device)

    def encode(batch: np.ndarray) -> torch.Tensor:
        # uint8 RGB at any size: the network resizes to 299 px itself.
        return network(torch.from_numpy(batch).to(device).unsqueeze(1).expand(-1, 3, -1, -1))

    if weights is not None:
        model, identity = str(weights), f"sha256:{sha256_of_files([Path(weights)])}"
    else:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        model, identity = URL_INCEPTION_V3, f"torch-fidelity:{Path(URL_INCEPTION_V3).name}"
    return FeatureExtractor("inception", 2048, encode, config.evaluation.batch_size, model, identity, INCEPTION_INPUT, DTYPE_NAMES[dtype])


def _clip(config: PipelineConfig, device: torch.device, dtype: torch.dtype) -> FeatureExtractor:
    from neu_det_pipeline.captions.scorers import CLIPScorer

    scorer = CLIPScorer.from_pretrained(config.models.clip, device, dtype)
    fed = scorer.processor(images=gray_to_rgb(np.zeros((1, 8, 8), np.uint8)), return_tensors="pt")["pixel_values"].shape[-1]
    return FeatureExtractor("clip", scorer.model.config.projection_dim, lambda batch: scorer.encode_images(gray_to_rgb(batch)),
                            config.evaluation.batch_size, config.models.clip, weights_identity(config.models.clip), fed, DTYPE_NAMES[dtype])


def _dinov3(config: PipelineConfig, device: torch.device, dtype: torch.dtype) -> FeatureExtractor:
    model_id = config.models.dinov3
    model = load_dinov3(model_id).to(device, dtype).eval()
    preprocess = preprocessor(model_id, model)

    def encode(batch: np.ndarray) -> torch.Tensor:
        return vit_tokens(model, preprocess(gray_to_rgb(batch)).to(device, dtype))[:, 0]  # CLS

    fed = preprocess(gray_to_rgb(np.zeros((1, 8, 8), np.uint8))).shape[-1]
    return FeatureExtractor("dinov3", width(model), encode, config.evaluation.batch_size, model_id, weights_identity(model_id),
                            fed, DTYPE_NAMES[dtype])


def weights_identity(model_id: str) -> str:
    """`sha256:...` of a local folder's weight files; for a hub id, `hub:<id>@<commit>` of the copy in the Hugging
    Face cache (the one just loaded), or `hub:<id>` when the cache does not say."""
    folder = local_folder(model_id)
    if folder is not None:
        return f"sha256:{sha256_of_files([p for p in folder.rglob('*') if p.is_file() and p.suffix in WEIGHT_SUFFIXES])}"
    from huggingface_hub import try_to_load_from_cache

    repo = model_id.removeprefix("hf-hub:")
    cached = try_to_load_from_cache(repo, "config.json")
    commit = Path(cached).parent.name if isinstance(cached, str) else None
    return f"hub:{repo}@{commit}" if commit else f"hub:{repo}"


class FeatureCache:
    """Per-image features on disk: `<root>/<extractor key>/<sha256[:2]>/<sha256 of the 200 px pixels>.npy`, and
    numbers computed from a set of images (a class's LPIPS diversity): `<root>/<namespace>/<sha256[:2]>/<sha256 of
    what the number depends on>.json`.

    Writes are atomic (temporary file + rename), so runs sharing the folder never read half a file."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def content_keys(pixels: np.ndarray) -> list[str]:
        return [hashlib.sha256(np.ascontiguousarray(p).tobytes()).hexdigest() for p in pixels]

    def _path(self, extractor_key: str, content: str) -> Path:
        return self.root / extractor_key / content[:2] / f"{content}.npy"

    def features(self, extractor: FeatureExtractor, pixels: np.ndarray, progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, int]:
        """The (N, D) features of `pixels`, cached ones read and missing ones computed and stored; also how many
        were computed now."""
        keys = self.content_keys(pixels)
        out = np.zeros((len(pixels), extractor.dim), np.float32)
        missing = []
        for i, key in enumerate(keys):
            path = self._path(extractor.cache_key, key)
            if path.is_file():
                out[i] = np.load(path)
                if progress:
                    progress(1)
            else:
                missing.append(i)
        if missing:
            computed = extractor(pixels[missing], progress).numpy()
            for i, vector in zip(missing, computed):
                buffer = io.BytesIO()
                np.save(buffer, vector)
                atomic_write_bytes(self._path(extractor.cache_key, keys[i]), buffer.getvalue())
                out[i] = vector
        return torch.from_numpy(out), len(missing)

    def value(self, namespace: str, identity: str, compute: Callable[[], float | None]) -> tuple[float | None, bool]:
        """The number `identity` names (it must spell out everything the number depends on, image contents
        included), read from the cache or computed and stored; and whether it was computed now."""
        digest = hashlib.sha256(identity.encode()).hexdigest()
        path = self.root / namespace / digest[:2] / f"{digest}.json"
        if path.is_file():
            return json.loads(path.read_text())["value"], False
        value = compute()
        atomic_write_bytes(path, json.dumps({"value": value}).encode())
        return value, True


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
