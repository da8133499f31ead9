"""MinEnt (Vu et al., CVPR 2019): direct entropy minimisation on the target.

    L = L_seg(x_s) + 1e-3 * L_ent(P_main(x_t)) + 2e-4 * L_ent(P_aux(x_t))

L_ent is the mean normalised entropy of the softmax upsampled to the target input size
(lib/losses/entropy.py).  No discriminator.  The entropy-ranking "ER" refinement of the paper is
not in the released code and is not reproduced.  A large weight collapses the predictions onto a
few classes (ADVENT issue #5).
"""
from __future__ import annotations

from lib.methods.base import OutputSpaceMethod
from lib.methods.parts.output_space import MinEntParams, entropy_losses


class MinEnt(OutputSpaceMethod):
    params_type = MinEntParams

    def target_losses(self, target, size, it):
        return entropy_losses(target, size, self.params)


METHOD = MinEnt
