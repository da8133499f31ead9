"""MinEnt (Vu et al., CVPR 2019): direct entropy minimisation on the target.

    L = L_seg(x_s) + 1e-3 * L_ent(P_main(x_t)) + 2e-4 * L_ent(P_aux(x_t))

L_ent is the mean normalised entropy of the softmax upsampled to the target input size
(lib/losses/entropy.py).  No discriminator.  The entropy-ranking "ER" refinement of the paper is
not in the released code and is not reproduced.  A large weight collapses the predictions onto a
few classes (ADVENT issue #5).
"""
from __future__ import annotations

from dataclasses import dataclass

from lib.config import positive
from lib.losses.entropy import entropy_loss
from lib.methods.adaptsegnet import levels
from lib.methods.base import OutputSpaceMethod
from lib.models.output import upsample


@dataclass(frozen=True)
class MinEntParams:
    aux_weight: float = 0.1       # lambda_seg of the aux head
    ent_main: float = 1e-3
    ent_aux: float = 2e-4

    def validate(self, where: str) -> None:
        for name in ("aux_weight", "ent_main", "ent_aux"):
            positive(getattr(self, name), f"{where}.{name}", allow_zero=True)


class MinEnt(OutputSpaceMethod):
    params_type = MinEntParams

    def target_losses(self, target, size, it):
        weights = {"main": self.params.ent_main, "aux": self.params.ent_aux}
        return {f"ent_{level}": weights[level] * entropy_loss(upsample(logits, size).float().softmax(dim=1))
                for level, logits in levels(target).items() if weights[level] > 0}


METHOD = MinEnt
