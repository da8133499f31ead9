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

import torch

from lib.methods.parts.output_space import AdversarialOutputSpace


class AdaptSegNet(AdversarialOutputSpace):
    def discriminator_input(self, prob: torch.Tensor) -> torch.Tensor:
        """AdaptSegNet feeds the softmax itself."""
        return prob


METHOD = AdaptSegNet
