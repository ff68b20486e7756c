"""Which precision runs where: `run.mixed_precision` on GPU and CPU, DINOv3 never in fp16, bf16 really used on CPU.

The whole pipeline in bf16 is `test_run_all.py`'s smoke run; these are the unit-level checks around it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neu_det_pipeline.classifier.training import is_dinov3
from neu_det_pipeline.evaluation import features
from neu_det_pipeline.models import cpu_supports_bf16, inference_dtype, precision_for, select_precision
from neu_det_pipeline.training.loop import make_accelerator, weight_dtype

pytestmark = pytest.mark.usefixtures("one_torch_thread")

needs_cpu_bf16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no bf16 kernels")


@pytest.mark.parametrize(
    ("device", "configured", "bf16_ok", "fp16_safe", "expected"),
    [
        # CPU: fp16 (the default) falls back to fp32, an explicit bf16 runs where the CPU has bf16 kernels.
        ("cpu", "no", True, True, "no"),
        ("cpu", "fp16", True, True, "no"),
        ("cpu", "bf16", True, True, "bf16"),
        ("cpu", "bf16", False, True, "no"),
        ("cpu", "fp16", True, False, "no"),
        ("cpu", "bf16", True, False, "bf16"),
        # GPU: as configured ...
        ("cuda", "no", True, True, "no"),
        ("cuda", "fp16", True, True, "fp16"),
        ("cuda", "bf16", True, True, "bf16"),
        # ... except a model that is not fp16-safe (DINOv3): bf16 where the GPU has it, else fp32.
        ("cuda", "no", True, False, "no"),
        ("cuda", "fp16", True, False, "bf16"),
        ("cuda", "fp16", False, False, "no"),
        ("cuda", "bf16", True, False, "bf16"),
    ],
)
def test_select_precision(device: str, configured: str, bf16_ok: bool, fp16_safe: bool, expected: str) -> None:
    assert select_precision(device, configured, bf16_ok, fp16_safe) == expected


def test_dinov3_features_never_run_in_fp16(make_config, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring of Step 5's dtype choice, on a GPU as `select_precision` sees it (no GPU needed)."""
    config = make_config("run.mixed_precision=fp16")
    monkeypatch.setattr(features, "resolve_device", lambda name: torch.device("cuda"))
    for bf16_ok, dinov3 in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr("neu_det_pipeline.models.bf16_supported", lambda device, ok=bf16_ok: ok)
        assert features.extractor_dtype("dinov3", config) == dinov3
        assert features.extractor_dtype("clip", config) == torch.float16
        assert features.extractor_dtype("inception", config) == torch.float32
    assert precision_for(torch.device("cuda"), "fp16", "DINOv3") == "no"


def test_dinov3_backbones_are_recognised() -> None:
    for name in ("dinov3", "timm:vit_small_patch16_dinov3.lvd1689m", "timm:convnext_tiny.dinov3_lvd1689m"):
        assert is_dinov3(name), name
    assert not is_dinov3("timm:resnet18")


def test_fp16_on_cpu_runs_in_fp32(make_config) -> None:
    config = make_config("run.mixed_precision=fp16", "run.device=cpu")
    accelerator = make_accelerator(config)
    assert accelerator.mixed_precision == "no" and weight_dtype(accelerator) == torch.float32
    assert inference_dtype(torch.device("cpu"), "fp16") == torch.float32


@needs_cpu_bf16
def test_bf16_on_cpu_autocasts_like_a_gpu(make_config) -> None:
    accelerator = make_accelerator(make_config("run.mixed_precision=bf16", "run.device=cpu"))
    assert accelerator.mixed_precision == "bf16" and weight_dtype(accelerator) == torch.bfloat16
    with accelerator.autocast():
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16
    # accelerate keeps one precision per process: a later step in another precision still gets it.
    assert make_accelerator(make_config("run.mixed_precision=no", "run.device=cpu")).mixed_precision == "no"
    assert make_accelerator(make_config("run.mixed_precision=bf16", "run.device=cpu")).mixed_precision == "bf16"


@needs_cpu_bf16
@pytest.mark.parametrize("name", ["clip", "dinov3"])
def test_step5_extractors_run_in_bf16(make_config, name: str) -> None:
    """bf16 features are float32 on the way out, finite, and differ from fp32 ones only by bf16 rounding."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(4, 64, 64), dtype=np.uint8)
    bf16 = make_config("run.mixed_precision=bf16", "run.device=cpu")
    assert features.extractor_dtype(name, bf16) == torch.bfloat16
    half = features.load_extractor(name, bf16)(pixels)
    full = features.load_extractor(name, make_config("run.mixed_precision=no", "run.device=cpu"))(pixels)
    assert half.dtype == torch.float32 and half.shape == full.shape and torch.isfinite(half).all()
    assert not torch.equal(half, full)  # it really ran in bf16
    cosine = torch.nn.functional.cosine_similarity(half, full, dim=1)
    assert (cosine > 0.98).all(), cosine


def test_unquoted_yaml_no_means_no(make_config) -> None:
    assert make_config("run.mixed_precision=no").run.mixed_precision == "no"  # YAML 1.1 reads it as false
