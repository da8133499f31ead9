"""Adversarial losses of output-space alignment (AdaptSegNet: Tsai et al., CVPR 2018; AdvEnt: Vu et al.,
CVPR 2019).

Domain labels follow ADVENT's code: source 0, target 1.  The generator "fools" a discriminator by
asking it to call target outputs source.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

SOURCE, TARGET = 0.0, 1.0
GanLoss = Literal["bce", "ls"]


def gan_loss(logits: torch.Tensor, domain: float, kind: GanLoss = "bce",
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """BCE-with-logits (or least squares, AdaptSegNet ``--gan LS``) against a constant domain label,
    averaged over every position of the discriminator's map, or over ``mask`` when given
    (an empty mask gives 0, not NaN)."""
    logits = logits.float()
    target = torch.full_like(logits, domain)
    if kind == "bce":
        per_position = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    else:
        per_position = (logits - target) ** 2
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1.0)


@contextlib.contextmanager
def frozen(modules: Iterable[nn.Module]) -> Iterator[None]:
    """requires_grad=False on every parameter while the generator's losses are back-propagated
    (ADVENT step 2), restored afterwards (step 5)."""
    params = [p for m in modules for p in m.parameters()]
    states = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, state in zip(params, states):
            p.requires_grad_(state)
