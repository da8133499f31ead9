"""Projection heads for pixel contrast: BlindNet's pi_j, as in the released code (root0yang/BlindNet)."""
from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """1x1 conv d->d (bias) + ReLU + 1x1 conv d->dim (bias), then L2 normalisation over channels,
    x / (||x||_2 + 1e-7).  No BN.  Kaiming-normal (ReLU gain) weights, zero biases, as RobustNet's
    ``initialize_weights``.  The output is float32 (unit vectors for dot-product logits)."""

    def __init__(self, in_channels: int, dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, in_channels, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(in_channels, dim, 1))
        for conv in (self.net[0], self.net[2]):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x).float()
        return z / (z.norm(dim=1, keepdim=True) + 1e-7)
