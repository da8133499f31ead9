"""CISS's feature invariance loss (Sakaridis et al., arXiv 2305.17349), as the released code (SysCV/CISS)
computes it: the student's encoder features of an image and of its stylized copy are pulled together.

    L_inv(a, b) = sum_l w_l * mean[(E_l(a) - E_l(b))^2]

over the chosen encoder stages l, each mean over all B*C*H*W elements (``F.mse_loss``), with no
feature normalisation, projection or temperature.  There is no stop-gradient: both feature maps are
live activations of the student, so the gradient reaches the encoder through both views.
CISS's released model weights MiT stage 1 by 0.9 and stage 2 by 0.1 (the "faithful" preset).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def feature_invariance(features: Mapping[str, torch.Tensor], stylized: Mapping[str, torch.Tensor],
                       weights: Mapping[str, float]) -> torch.Tensor:
    """sum_l w_l * MSE(features[l], stylized[l]), in float32 whatever the autocast dtype.

    ``weights`` maps a feature name (an encoder stage: ``layer1``, ...) to its weight; every named
    stage must be in both feature dicts with the same shape.
    """
    missing = sorted(name for name in weights if name not in features or name not in stylized)
    if missing:
        raise KeyError(f"feature invariance: no feature map {missing[0]!r} "
                       f"(the model returns {', '.join(sorted(features))})")
    if not weights:
        raise ValueError("feature invariance needs at least one feature map")
    return sum(weight * F.mse_loss(features[name].float(), stylized[name].float())
               for name, weight in weights.items())
