"""Discriminators of output-space alignment.

``FCDiscriminator`` is ADVENT's ``get_fc_discriminator`` (= AdaptSegNet's ``FCDiscriminator``; the
released code: valeoai/ADVENT, wasidennis/AdaptSegNet): five 4x4 stride-2 convolutions
C -> 64 -> 128 -> 256 -> 512 -> 1, LeakyReLU 0.2 after the first four, no normalisation, a raw logit
map (16x32 for a 512x1024 input).

``PixelDiscriminator`` is OUR RECONSTRUCTION of the Global-Local "local" discriminator (R3 of
lib.methods.globallocal; the original code was never released): 1x1 convolutions
K -> 64 -> 128 -> 256 -> K with LeakyReLU 0.2, giving per pixel one domain logit per class
(class-conditional).
"""
from __future__ import annotations

import torch
from torch import nn


def _stack(channels: list[int], kernel: int, stride: int, padding: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
        layers.append(nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding))
        if i < len(channels) - 2:
            layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


class FCDiscriminator(nn.Module):
    def __init__(self, in_channels: int, ndf: int = 64):
        super().__init__()
        self.net = _stack([in_channels, ndf, ndf * 2, ndf * 4, ndf * 8, 1], kernel=4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PixelDiscriminator(nn.Module):
    def __init__(self, num_classes: int, widths: tuple[int, ...] = (64, 128, 256)):
        super().__init__()
        self.net = _stack([num_classes, *widths, num_classes], kernel=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
