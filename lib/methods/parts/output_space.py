"""The output-space alignment of AdaptSegNet (Tsai et al., CVPR 2018) and ADVENT (Vu et al., CVPR 2019)
that AdaptSegNet, AdvEnt, MinEnt, the Global-Local reconstruction and BAFFT build on.

``AdversarialOutputSpace``: one fully convolutional discriminator per output level (main, aux)
judges a map of that level's upsampled softmax, source label 0, target 1 (the step order of
lib.methods.base.OutputSpaceMethod).  ``entropy_losses``: MinEnt's direct entropy minimisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lib.config import positive
from lib.losses.adversarial import SOURCE, TARGET, GanLoss, gan_loss
from lib.losses.entropy import entropy_loss
from lib.methods.base import OutputSpaceMethod
from lib.models.discriminator import FCDiscriminator
from lib.models.output import SegOutput, upsample


@dataclass(frozen=True)
class AdversarialParams:
    aux_weight: float = 0.1       # lambda_seg of the aux head
    adv_main: float = 1e-3        # lambda_adv, main head
    adv_aux: float = 2e-4         # lambda_adv, aux head (0 = single-level)
    gan: GanLoss = "bce"          # bce | ls (least squares)
    ndf: int = 64                 # discriminator width

    def validate(self, where: str) -> None:
        for name in ("aux_weight", "adv_main", "adv_aux"):
            positive(getattr(self, name), f"{where}.{name}", allow_zero=True)
        positive(self.ndf, f"{where}.ndf")


def levels(out: SegOutput) -> dict[str, torch.Tensor]:
    return {"main": out.logits} if out.aux_logits is None else {"main": out.logits, "aux": out.aux_logits}


class AdversarialOutputSpace(OutputSpaceMethod):
    """AdaptSegNet's multi-level discriminators on a map of each level's softmax: the softmax itself
    (AdaptSegNet) or its weighted self-information (AdvEnt), ``discriminator_input``."""

    params_type = AdversarialParams

    def __init__(self, model: nn.Module, params: AdversarialParams):
        super().__init__(model, params)
        weights = {"main": params.adv_main, "aux": params.adv_aux if model.params.aux else 0.0}
        self.weights = {level: w for level, w in weights.items() if w > 0}
        self.d = nn.ModuleDict({level: FCDiscriminator(model.num_classes, params.ndf) for level in self.weights})

    def discriminators(self) -> dict[str, nn.Module]:
        # with both weights at 0 the method is source CE plus target forward passes (BN statistics): a control
        return {"discriminator": self.d} if self.weights else {}

    def discriminator_input(self, prob: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def maps(self, out: SegOutput, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        logits = levels(out)
        return {level: self.discriminator_input(upsample(logits[level], size).float().softmax(dim=1))
                for level in self.weights}

    def target_losses(self, target, size, it):
        return {f"adv_{level}": self.weights[level] * gan_loss(self.d[level](m), SOURCE, self.params.gan)
                for level, m in self.maps(target, size).items()}

    def discriminator_losses(self, source, source_label, target, target_size, it):
        src, tgt = self.maps(source, tuple(source_label.shape[-2:])), self.maps(target, target_size)
        return {f"d_{level}": 0.5 * (gan_loss(self.d[level](src[level]), SOURCE, self.params.gan)
                                     + gan_loss(self.d[level](tgt[level]), TARGET, self.params.gan))
                for level in self.weights}


@dataclass(frozen=True)
class MinEntParams:
    aux_weight: float = 0.1       # lambda_seg of the aux head
    ent_main: float = 1e-3
    ent_aux: float = 2e-4

    def validate(self, where: str) -> None:
        for name in ("aux_weight", "ent_main", "ent_aux"):
            positive(getattr(self, name), f"{where}.{name}", allow_zero=True)


def entropy_losses(target: SegOutput, size: tuple[int, int], params: MinEntParams) -> dict[str, torch.Tensor]:
    """MinEnt's terms: per level, its weight x the mean normalised entropy of the softmax upsampled
    to the target input size."""
    weights = {"main": params.ent_main, "aux": params.ent_aux}
    return {f"ent_{level}": weights[level] * entropy_loss(upsample(logits, size).float().softmax(dim=1))
            for level, logits in levels(target).items() if weights[level] > 0}
