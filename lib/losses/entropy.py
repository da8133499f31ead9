"""Entropy of the output distribution, as ADVENT (Vu et al., CVPR 2019) computes it in the released
code (valeoai/ADVENT)."""
from __future__ import annotations

import math

import torch

EPS = 1e-30   # ADVENT's log2(P + 1e-30)


def self_information(prob: torch.Tensor) -> torch.Tensor:
    """Weighted self-information map I = -P log2(P) / log2(C), all C channels kept (N, C, H, W).

    Its channel sum is the normalised entropy, in [0, 1]; it is AdvEnt's discriminator input.
    """
    return -prob * torch.log2(prob + EPS) / math.log2(prob.shape[1])


def entropy_loss(prob: torch.Tensor) -> torch.Tensor:
    """MinEnt: the mean normalised entropy over all pixels of the batch."""
    return self_information(prob.float()).sum(dim=1).mean()
