"""Source-only training: supervised cross-entropy on the labelled source, nothing else.

    L = CE(up(P_main), y_s) + lambda_aux * CE(up(P_aux), y_s)

The warm-up of every recipe and the lower bound every adaptation number is read against.
lambda_aux is ADVENT's LAMBDA_SEG_AUX (0.1) for the multi-level DeepLabV2; BlindNet's DeepLabV3+
weights its auxiliary head with 0.4.  Training on a stylized source is the same method on another
prepared dataset (the params' ``source``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lib.config import positive
from lib.losses.segmentation import cross_entropy
from lib.methods.base import Batch, Method


@dataclass(frozen=True)
class SourceOnlyParams:
    aux_weight: float = 0.1

    def validate(self, where: str) -> None:
        positive(self.aux_weight, f"{where}.aux_weight", allow_zero=True)


class SourceOnly(Method):
    streams = ("source",)
    params_type = SourceOnlyParams

    def training_step(self, batch: Batch, it: int) -> dict[str, torch.Tensor]:
        source = batch["source"]
        out = self.model(source["image"])
        losses = {"seg": cross_entropy(out.logits, source["label"])}
        if out.aux_logits is not None and self.params.aux_weight > 0:
            losses["seg_aux"] = self.params.aux_weight * cross_entropy(out.aux_logits, source["label"])
        sum(losses.values()).backward()
        return {name: value.detach() for name, value in losses.items()}


METHOD = SourceOnly
