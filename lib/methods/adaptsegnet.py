"""AdaptSegNet (Tsai et al., CVPR 2018): multi-level adversarial learning in the output space.

Per level l in {main, aux}, with P_l = softmax(up(F_l(x))) at the input size:

    L_G = L_seg(x_s) + sum_l lambda_adv_l * L_adv(D_l(P_l(x_t)), source)
    L_D = sum_l 1/2 [ L_adv(D_l(P_l(x_s)), source) + L_adv(D_l(P_l(x_t)), target) ]

with fully convolutional discriminators D_main, D_aux (lib/models/discriminator.py), L_adv the
BCE-with-logits on every patch (or least squares, ``gan: ls``), source label 0, target 1, and the
step order of lib.methods.base.OutputSpaceMethod.  Weights: main 1e-3, aux 2e-4 (the PyTorch-0.4
port's README suggests 5e-4 / 5e-5); the single-level LS-GAN recipe uses 0.01 and no aux.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lib.config import positive
from lib.losses.adversarial import SOURCE, TARGET, GanLoss, gan_loss
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


class AdaptSegNet(OutputSpaceMethod):
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
        """AdaptSegNet feeds the softmax itself."""
        return prob

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


METHOD = AdaptSegNet
