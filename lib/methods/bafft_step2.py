"""BAFFT step 2 (Yuan et al., IEEE TIP 2022): self-training on the step-1 model's class-median
pseudo-labels, with every alignment term of step 1.

    L_G = L_seg(x_s) + λ_T CE(P_t↑, ŷ_t^pseudo) + λ_adv L_adv + λ_cls L_cls + λ_ins L_ins (+ ISIA / AIM)

- ŷ_t^pseudo: the ``class_median`` pseudo-labels of the stage's artifact (SIM's rule, Wang et al.,
  CVPR 2020: per-class median confidence capped at 0.9, 255 below), delivered by the loader as
  ``batch["target"]["pseudo"]``; λ_T = 1.
- The same discriminator, memories and step order as step 1 (lib/methods/bafft_step1.py); the
  memories start empty; all alignment weights are 0.001, as in the released code
  (HibiscusYB/BAFFT).
- The target class regions of the alignment terms (prototypes, instances, ISIA centroids) come
  from the pseudo-labels where they are valid instead of argmax P_t (our choice).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lib.config import positive
from lib.losses.category import resize_labels
from lib.losses.segmentation import cross_entropy
from lib.methods.parts.bafft import BafftAlignment, BafftParams
from lib.models.output import SegOutput


@dataclass(frozen=True)
class BafftStep2Params(BafftParams):
    adv_weight: float = 1e-3
    stuff_weight: float = 1e-3
    instance_weight: float = 1e-3
    isia_weight: float = 1e-3
    target_weight: float = 1.0     # λ_T, CE on the pseudo-labels

    def validate(self, where: str) -> None:
        super().validate(where)
        positive(self.target_weight, f"{where}.target_weight", allow_zero=True)


class BafftStep2(BafftAlignment):
    params_type = BafftStep2Params
    name = "bafft_step2"
    needs_pseudo = True

    def target_regions(self, target: SegOutput, target_batch: dict) -> torch.Tensor:
        """The pseudo-labels on the logits' grid (nearest); ignored pixels belong to no region."""
        return resize_labels(target_batch["pseudo"], tuple(target.logits.shape[-2:]))

    def target_supervision(self, target: SegOutput, target_batch: dict) -> dict[str, torch.Tensor]:
        return {"seg_target": self.params.target_weight * cross_entropy(target.logits, target_batch["pseudo"])}


METHOD = BafftStep2
