"""`best.pt` and `last.pt`: written atomically, read back with `torch.load(weights_only=True)`.

Both hold the model spec (architecture, classes, image size) and weights, so `neu-det predict` and
`neu-det export-onnx` need nothing else. `last.pt` adds what an exact resume needs: optimizer, LR
schedule, gradient scaler, loss-weighting parameters, the epoch reached and the history.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from neu_det_pipeline.classifier.model import AttentionGuidedClassifier, ModelSpec
from neu_det_pipeline.errors import PipelineError
from neu_det_pipeline.io import atomic_write_bytes

BEST_FILE, LAST_FILE = "best.pt", "last.pt"
FORMAT = "neu-det-classifier/1"


def save_checkpoint(path: Path, model: AttentionGuidedClassifier, **extra: Any) -> Path:
    """Model spec + weights (+ `extra` state); tensors are moved to the CPU so any machine can read the file."""
    payload = {"format": FORMAT, "spec": model.spec.to_dict(), "model": _cpu(model.state_dict()), **_cpu(extra)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents, loaded weights-only; one clear line for a missing, corrupt or foreign file."""
    fix = "pass a best.pt / last.pt written by step6_classifier (re-run the step to rewrite it)"
    if not path.is_file():
        raise PipelineError(f"checkpoint {path} does not exist; {fix}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"checkpoint {path} is corrupt or not a weights-only torch file ({reason}); {fix}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PipelineError(f"checkpoint {path} is not a classifier checkpoint (no '{FORMAT}' marker); {fix}")
    return payload


def load_classifier(path: Path) -> tuple[AttentionGuidedClassifier, dict[str, Any]]:
    """The trained model in eval mode, and the checkpoint's contents."""
    payload = read_checkpoint(path)
    model = AttentionGuidedClassifier.from_spec(ModelSpec(**payload["spec"]))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise PipelineError(f"checkpoint {path} does not match its own model spec ({str(exc).splitlines()[0]}); re-run step6_classifier") from None
    return model.eval(), payload


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_cpu(item) for item in value]
    return value
