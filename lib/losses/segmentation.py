"""Supervised segmentation losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lib.data.classes import IGNORE
from lib.models.output import upsample


def cross_entropy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Pixel-wise CE of logits (any stride) against a full-resolution label, 255 ignored.

    The logits are upsampled to the label (bilinear, align_corners=True), as ADVENT and CPSL
    compute their segmentation loss.  Computed in float32 so bf16 autocast never rounds the loss.
    A batch whose pixels are all ignored gives 0 (not NaN), so it cannot trip the NaN guard.
    """
    logits = upsample(logits, tuple(label.shape[-2:])).float()
    if not (label != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, label, ignore_index=IGNORE)
