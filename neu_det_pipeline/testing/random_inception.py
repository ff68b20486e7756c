"""A stand-in for the FID Inception weights (torch-fidelity downloads the real ones from GitHub on first use).

The architecture and its compute are the real ones, so the file serves offline tests of the metrics' behaviour
and timings of the metric pass; the numbers it gives are not comparable with published FIDs.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import torch


def random_inception_weights(path: Path, calibration: np.ndarray) -> Path:
    """Inception-v3 (torch-fidelity's architecture) with random, properly initialised weights: He-normal
    convolutions and batch-norm statistics measured on real images. The default init gives ~1e-7 features."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
        network = FeatureExtractorInceptionV3("random-inception", ["2048"])
    torch.manual_seed(0)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration pass
    network.train()
    with torch.no_grad():
        network(torch.from_numpy(calibration).unsqueeze(1).expand(-1, 3, -1, -1).contiguous())
    torch.save(network.state_dict(), path)
    return path
