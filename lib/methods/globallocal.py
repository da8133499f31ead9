"""Joint Global-Local alignment (Yarram et al., ICASSP 2022) -- OUR RECONSTRUCTION, NOT THE ORIGINAL.

The authors never released the code and the paper is paywalled; only the claims and a teaser figure
are public (the paper's abstract and the authors' README).  What follows is the project's own
reconstruction, to be reported only next to a re-run of its global baseline with the same seed:

- R1 local outputs: the per-pixel softmax vectors p_hw of the main head, at the logits' stride
  (``resolution: logits``) or upsampled to the input (``resolution: input``).
- R2 masks: source pixels with a valid label (y != 255), grouped by that label, optionally without
  the classes in ``ignore_source_classes`` ("noisy source background"); target pixels grouped by
  their argmax, kept when max p >= ``target_threshold``.
- R3 a class-conditional pixel discriminator D_loc (1x1 convs K -> 64 -> 128 -> 256 -> K); each
  pixel is judged by the logit of its class; BCE, source 0, target 1, masked mean:
      L_local   = mean_{target pixels} BCE(D_loc(p_t)[k_t], source)            (generator fools D_loc)
      L_D_local = 1/2 [ mean_{source} BCE(D_loc(p_s)[y_s], source) + mean_{target} BCE(D_loc(p_t)[k_t], target) ]
- R4 L = L_src + L_global + lambda_local * L_local, where L_global is AdvEnt, AdaptSegNet or MinEnt
  (``global_method``, with its own params in ``global_params``); lambda_local = 1e-3.
- R5 joint from ``local_start`` (0 = from the first iteration).
D_loc shares the discriminators' optimizer (Adam 1e-4, betas (0.9, 0.99), poly 0.9).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lib.config import parse, positive
from lib.data.classes import IGNORE
from lib.errors import ConfigError
from lib.losses.adversarial import SOURCE, TARGET, GanLoss, gan_loss
from lib.losses.entropy import self_information
from lib.methods.base import OutputSpaceMethod
from lib.methods.parts.output_space import (
    AdversarialOutputSpace,
    AdversarialParams,
    MinEntParams,
    entropy_losses,
)
from lib.models.discriminator import PixelDiscriminator
from lib.models.output import SegOutput, upsample


class GlobalAlignment(AdversarialOutputSpace):
    """The global term: AdvEnt's discriminators on self-information, AdaptSegNet's on the softmax,
    or MinEnt's entropy (no discriminator), with that method's params."""

    def __init__(self, model: nn.Module, method: str, params):
        self.method = method
        super().__init__(model, params if method != "minent" else AdversarialParams(
            aux_weight=params.aux_weight, adv_main=0.0, adv_aux=0.0))
        self.minent = params if method == "minent" else None

    def discriminator_input(self, prob: torch.Tensor) -> torch.Tensor:
        return self_information(prob) if self.method == "advent" else prob

    def target_losses(self, target, size, it):
        return entropy_losses(target, size, self.minent) if self.minent else super().target_losses(target, size, it)


GLOBAL_PARAMS = {"advent": AdversarialParams, "adaptsegnet": AdversarialParams, "minent": MinEntParams}


@dataclass(frozen=True)
class GlobalLocalParams:
    global_method: Literal["advent", "adaptsegnet", "minent"] = "advent"
    global_params: dict[str, Any] = field(default_factory=dict)   # that method's params (its defaults otherwise)
    local_weight: float = 1e-3                   # lambda_local (R4)
    resolution: Literal["logits", "input"] = "logits"   # R1
    target_threshold: float = 0.0                # R2: min confidence of a target pixel (0 keeps all)
    ignore_source_classes: tuple[int, ...] = ()  # R2 alternative B: train IDs left out of the source term
    local_start: int = 0                         # R5: first iteration with the local term
    gan: GanLoss = "bce"

    def global_method_params(self, where: str):
        return parse(GLOBAL_PARAMS[self.global_method], self.global_params, where)

    def validate(self, where: str) -> None:
        positive(self.local_weight, f"{where}.local_weight", allow_zero=True)
        positive(self.local_start, f"{where}.local_start", allow_zero=True)
        if not 0.0 <= self.target_threshold < 1.0:
            raise ConfigError(f"params: {where}.target_threshold must be in [0, 1), got {self.target_threshold}")
        self.global_method_params(f"{where}.global_params")


def pick(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(N, K, h, w) class-conditional logits -> (N, h, w): each pixel's logit for its own class."""
    return logits.gather(1, classes.clamp(max=logits.shape[1] - 1).unsqueeze(1)).squeeze(1)


def source_groups(label: torch.Tensor, size: tuple[int, int], ignored: tuple[int, ...]):
    """Labels brought to the local map's size (nearest) and the mask of pixels that take part."""
    label = F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()
    mask = label != IGNORE
    for cls in ignored:
        mask &= label != cls
    return label, mask


def target_groups(prob: torch.Tensor, threshold: float):
    """Argmax pseudo-classes and the mask of confident pixels."""
    confidence, classes = prob.max(dim=1)
    return classes, confidence >= threshold


class GlobalLocal(OutputSpaceMethod):
    params_type = GlobalLocalParams

    def __init__(self, model: nn.Module, params: GlobalLocalParams):
        super().__init__(model, params)
        global_params = params.global_method_params("globallocal.global_params")
        self.global_alignment = GlobalAlignment(model, params.global_method, global_params)
        self.d_local = PixelDiscriminator(model.num_classes)

    @property
    def aux_weight(self) -> float:
        return self.global_alignment.aux_weight

    def discriminators(self) -> dict[str, nn.Module]:
        return {**self.global_alignment.discriminators(), "local_discriminator": self.d_local}

    def local_outputs(self, out: SegOutput, size: tuple[int, int]) -> torch.Tensor:
        logits = upsample(out.logits, size) if self.params.resolution == "input" else out.logits
        return logits.float().softmax(dim=1)

    def local_active(self, it: int) -> bool:
        return it >= self.params.local_start and self.params.local_weight > 0

    def target_losses(self, target, size, it):
        losses = self.global_alignment.target_losses(target, size, it)
        if self.local_active(it):
            p_t = self.local_outputs(target, size)
            classes, mask = target_groups(p_t.detach(), self.params.target_threshold)
            fooled = gan_loss(pick(self.d_local(p_t), classes), SOURCE, self.params.gan, mask)
            losses["adv_local"] = self.params.local_weight * fooled
        return losses

    def discriminator_losses(self, source, source_label, target, target_size, it):
        losses = self.global_alignment.discriminator_losses(source, source_label, target, target_size, it)
        if self.local_active(it):
            p_s = self.local_outputs(source, tuple(source_label.shape[-2:]))
            p_t = self.local_outputs(target, target_size)
            y_s, mask_s = source_groups(source_label, tuple(p_s.shape[-2:]), self.params.ignore_source_classes)
            k_t, mask_t = target_groups(p_t, self.params.target_threshold)
            losses["d_local"] = 0.5 * (gan_loss(pick(self.d_local(p_s), y_s), SOURCE, self.params.gan, mask_s)
                                       + gan_loss(pick(self.d_local(p_t), k_t), TARGET, self.params.gan, mask_t))
        return losses


METHOD = GlobalLocal
