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


def weighted_cross_entropy(logits: torch.Tensor, label: torch.Tensor,
                           weight: torch.Tensor | float = 1.0) -> torch.Tensor:
    """mmseg 0.16's CE, as DACS, DAFormer and CISS train with it (the released code, SysCV/CISS): the
    per-pixel CE times ``weight`` (a scalar or an (N, H, W) map), averaged over ALL pixels, ignored
    ones counting 0.

    The logits are upsampled to the label as in :func:`cross_entropy`; float32 throughout.
    """
    logits = upsample(logits, tuple(label.shape[-2:])).float()
    per_pixel = F.cross_entropy(logits, label, ignore_index=IGNORE, reduction="none")
    return (per_pixel * weight).mean()


def cross_entropy_on_grid(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """CE at the logits' own resolution against the label brought there by nearest neighbour:
    RobustNet's and BlindNet's auxiliary loss on the stride-16 ``dsn`` head (the released code,
    root0yang/BlindNet)."""
    size = tuple(logits.shape[-2:])
    if tuple(label.shape[-2:]) != size:
        label = F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return cross_entropy(logits, label)
