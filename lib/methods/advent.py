"""AdvEnt (Vu et al., CVPR 2019): adversarial entropy minimisation.

AdaptSegNet's multi-level output-space adversarial training, with each discriminator fed the
weighted self-information map I = -P log2(P) / log2(C) (all C channels) instead of P:

    L_G = L_seg(x_s) + 1e-3 * L_adv(D_main(I_main(x_t)), source) + 2e-4 * L_adv(D_aux(I_aux(x_t)), source)
    L_D = sum_l 1/2 [ L_adv(D_l(I_l(x_s)), source) + L_adv(D_l(I_l(x_t)), target) ]

in the exact step order of ADVENT's ``train_advent`` (lib.methods.base.OutputSpaceMethod), BCE.
"""
from __future__ import annotations

import torch

from lib.losses.entropy import self_information
from lib.methods.parts.output_space import AdversarialOutputSpace


class AdvEnt(AdversarialOutputSpace):
    def discriminator_input(self, prob: torch.Tensor) -> torch.Tensor:
        return self_information(prob)


METHOD = AdvEnt
