"""DAFormer's ImageNet feature distance (FD; Hoyer et al., CVPR 2022), which CISS keeps from its DACS
base (the released code, SysCV/CISS).

The student's last encoder stage is held near that of a frozen ImageNet-initialised copy, on the
cells of the feature grid that the source label marks as a thing class:

    L_FD = mean over kept cells of || f_student - f_imagenet ||_2   (L2 norm over channels)

A cell is kept when its majority class covers at least ``min_ratio`` of it and is a thing class
(CISS: traffic light, traffic sign, person, rider, car, truck, bus, train, motorcycle, bicycle; 0.75).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lib.data.classes import IGNORE


def downscale_label(label: torch.Tensor, size: tuple[int, int], num_classes: int, min_ratio: float) -> torch.Tensor:
    """(N, H, W) train IDs -> (N, h, w): each cell's majority class, IGNORE where it covers less than
    ``min_ratio`` of the cell or is the ignore label itself.

    The one-hot maps (ignore as one more class) are average-pooled onto the (h, w) grid.  Our choice:
    adaptive pooling, so grids whose size is not the label's divided by an integer (DeepLabV2's
    ceil-mode layers: 9x17 from 64x128) work; DAFormer average-pools with the integer stride.
    """
    onehot_index = torch.where(label == IGNORE, num_classes, label).long()
    if onehot_index.max() > num_classes:
        raise ValueError(f"label holds class {int(onehot_index.max())}, beyond the {num_classes} classes")
    onehot = F.one_hot(onehot_index, num_classes + 1).permute(0, 3, 1, 2).float()
    share, cls = F.adaptive_avg_pool2d(onehot, size).max(dim=1)
    return torch.where((share < min_ratio) | (cls == num_classes), IGNORE, cls)


def thing_cells(label: torch.Tensor, size: tuple[int, int], num_classes: int, things: Sequence[int],
                min_ratio: float) -> torch.Tensor:
    """(N, h, w) bool: the cells of the (h, w) feature grid kept by the feature distance."""
    cells = downscale_label(label, size, num_classes, min_ratio)
    return torch.isin(cells, torch.as_tensor(list(things), device=label.device))


def feature_distance(student: torch.Tensor, imagenet: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean channel-L2 distance between (N, C, h, w) feature maps over the cells of ``mask`` (N, h, w).

    No kept cell gives 0 with a graph (our choice: DAFormer logs NaN with a zero gradient, and our
    engine stops on a NaN loss).  Computed in float32.
    """
    distance = torch.linalg.vector_norm(student.float() - imagenet.float(), dim=1)
    if not mask.any():
        return distance.sum() * 0.0
    return distance[mask].mean()
