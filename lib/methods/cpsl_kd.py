"""CPSL / ProDA self-distillation rounds (stages 2 and 3 of the released code:
lslrh/CPSL, microsoft/ProDA).

A frozen teacher (the previous stage's model, eval mode: running statistics, no dropout) and a
student (ImageNet / SimCLR backbone with a fresh head for KD-1, the previous stage for KD-2; chosen
by the stage's ``init`` and ``model.weights``).  Per iteration:

    L = CE(up(P(x_s)), y_s)                                     backpropagated first
      + pl_weight * CE(P_student(x_t^strong), ỹ^strong)          hard pseudo-label, thresholded at load
      + kd_weight * KD(P_student(x_t^strong), P_teacher(x_t^strong))

Student and teacher both see the strong view; the pseudo-label follows its geometry (nearest,
out-of-frame and cut-out pixels ignored).  All target terms live at ``label_scale`` (1/4) of the
crop.  No RCE, no EMA, no prototypes, no CutMix.  ``kd_form`` picks the released loss
(probabilities inside the KL; what produced the published numbers) or the true KL
(lib.losses.distillation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lib.config import positive
from lib.data.strong import StrongParams, strong_view, warp
from lib.errors import ConfigError
from lib.losses.distillation import kd_loss
from lib.losses.segmentation import cross_entropy
from lib.methods.base import Batch, Method, StageContext
from lib.models.output import upsample


@dataclass(frozen=True)
class CpslKdParams:
    kd_form: Literal["released", "kl"] = "released"
    kd_weight: float = 1.0             # --distillation
    pl_weight: float = 1.0
    label_scale: float = 0.25
    aux_weight: float = 0.1            # source CE of an auxiliary head, if the model has one
    strong: StrongParams = field(default_factory=StrongParams)

    def validate(self, where: str) -> None:
        for name in ("kd_weight", "pl_weight", "aux_weight"):
            positive(getattr(self, name), f"{where}.{name}", allow_zero=True)
        positive(self.label_scale, f"{where}.label_scale")
        if self.label_scale > 1:
            raise ConfigError(f"params: {where}.label_scale must be <= 1, got {self.label_scale}")


def nearest(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) integer map resized with pixel-centre nearest neighbour."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return F.interpolate(label[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()


class CpslKd(Method):
    streams = ("source", "target")
    params_type = CpslKdParams
    needs_teacher = True
    needs_pseudo = True

    def __init__(self, model: nn.Module, params: CpslKdParams, teacher: nn.Module, normalize):
        super().__init__(model, params)
        self.teacher = teacher
        self.mean, self.std = normalize

    @classmethod
    def build(cls, model, params, context: StageContext) -> "CpslKd":
        return cls(model, params, context.teacher, context.normalize)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def training_step(self, batch: Batch, it: int) -> dict[str, torch.Tensor]:
        p = self.params
        xs, ys = batch["source"]["image"], batch["source"]["label"]
        xt, pseudo = batch["target"]["image"], batch["target"]["pseudo"]
        h, w = xt.shape[-2:]
        size = (max(1, round(h * p.label_scale)), max(1, round(w * p.label_scale)))

        source = self.model(xs)
        losses = {"src": cross_entropy(source.logits, ys)}
        if source.aux_logits is not None and p.aux_weight > 0:
            losses["src_aux"] = p.aux_weight * cross_entropy(source.aux_logits, ys)
        sum(losses.values()).backward()

        rng = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))   # global RNG: exact resume
        x_strong, geometry = strong_view(xt, self.mean, self.std, p.strong, rng)
        student = upsample(self.model(x_strong).logits, size)
        with torch.no_grad():
            teacher = upsample(self.teacher(x_strong).logits, size)
        label = warp(nearest(pseudo, size), geometry, mode="nearest")
        terms = {}
        if p.pl_weight > 0:
            terms["pl"] = p.pl_weight * cross_entropy(student, label)
        if p.kd_weight > 0:
            terms["kd"] = p.kd_weight * kd_loss(student, teacher, p.kd_form)
        if terms:
            sum(terms.values()).backward()
        losses.update(terms)
        return {name: value.detach() for name, value in losses.items()}


METHOD = CpslKd
