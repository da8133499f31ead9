"""BlindNet (Ahn et al., CVPR 2024): style-blind domain generalisation through covariance alignment
and semantic-consistency contrast, as the released code (root0yang/BlindNet) trains it.

Every source crop is seen twice, as two pixel-aligned photometric views (lib.data.photometric):
the original view x (mild colour jitter with p = 0.5, blur) and the style view x_a (strong jitter,
blur).  Both go through the DeepLabV3+ with instance normalisation (``model.instance_norm: in``) in
separate forwards, so BatchNorm never mixes them.  With F^i the three instance-normalised encoder
maps (stem, layer1, layer2), pi_j the projection heads on layer4, dec0 and dec1 (j = 0, 1, 2),
q_j = pi_j(x_a) and k_j = sg[pi_j(x)], y the label, p = argmax P(x) and p_a = argmax P(x_a):

    L = L_seg + 0.4 L_aux + w1 CML + w2 CCL + w3 CWCL + w4 SDCL,      (w1, w2, w3, w4) = (0.2, 0.2, 0.3, 0.3)

    L_seg = 1/2 [CE(up(P(x)), y) + CE(up(P(x_a)), y)]
    L_aux = CE(dsn(x), y at stride 16, nearest)                                  original view only
    CML   = 1/3 sum_i mean (sg[Sigma(F^i)] - Sigma(F^i_a))^2
    CCL   = 1/3 sum_i mean_b,c (diag Sigma(sg[F^i], F^i_a) - 1)^2
    CWCL  = 1/3 sum_j InfoNCE(q_j, k_j): <= 15 classes x 50 hard/easy anchors per image, the same
            pixel of x as positive, in-image negatives, T = 0.07
    SDCL  = 1/3 sum_j InfoNCE of the pixels the style flips (x right, x_a wrong as c): positive the
            same pixel of x, negatives 20 genuine class-c pixels of x_a, T = 0.07

A level without a valid class (CWCL) or anchor (SDCL) contributes 0 to its mean.  ``cwcl_negatives``
picks CWCL's negative set: ``as_executed`` (the released code under any PyTorch >= 1.2: all sampled
keys of the image, the positive included) or ``intended`` (the other slots' keys only).

Inference uses the segmenter alone: the projection heads are a module of the method, checkpointed
for resume but not part of the model artifact.

Our choices, flagged: the views are computed on the batch in float (lib.data.photometric); the
samplers draw with replacement where a set is smaller than the draw, which happens only on grids
smaller than the reference's (lib.losses.contrastive).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from lib.config import positive
from lib.data.photometric import (
    ORIGINAL_VIEW,
    STYLE_VIEW,
    PhotometricParams,
    photometric_view,
)
from lib.errors import ConfigError
from lib.losses.category import resize_labels
from lib.losses.contrastive import (
    class_wise_anchors,
    class_wise_nce,
    disentangle_anchors,
    disentangle_nce,
)
from lib.losses.covariance import EPS, covariance_matching_loss, cross_covariance_loss
from lib.losses.segmentation import cross_entropy, cross_entropy_on_grid
from lib.methods.base import Batch, Method, ParamGroup, StageContext
from lib.models.backbone import INSTANCE_NORM_FEATURES
from lib.models.output import SegOutput
from lib.models.projection import ProjectionHead

# pi_0 .. pi_2: layer4 (stride 16), dec0 (304 ch) and dec1 (256 ch) at stride 4
CONTRAST_LEVELS = ("layer4", "decoder_input", "embedding")


@dataclass(frozen=True)
class BlindNetParams:
    aux_weight: float = 0.4                # dsn head on layer3
    cml_weight: float = 0.2                # omega_1
    ccl_weight: float = 0.2                # omega_2
    cwcl_weight: float = 0.3               # omega_3
    sdcl_weight: float = 0.3               # omega_4
    temperature: float = 0.07              # --nce_T, both contrasts
    cwcl_negatives: Literal["as_executed", "intended"] = "as_executed"
    max_classes: int = 15                  # --contrast_max_classes
    anchors_per_class: int = 50            # --contrast_max_views: also the "more than" pixel count
    sdcl_negatives: int = 20               # --num_patch
    sdcl_anchors_per_image: int = 1000     # SDCL keeps at most B x 1000 anchors
    projection_dim: int = 256
    covariance_eps: float = EPS
    original_view: PhotometricParams = field(default_factory=lambda: ORIGINAL_VIEW)
    style_view: PhotometricParams = field(default_factory=lambda: STYLE_VIEW)

    def validate(self, where: str) -> None:
        for name in ("aux_weight", "cml_weight", "ccl_weight", "cwcl_weight", "sdcl_weight", "covariance_eps"):
            positive(getattr(self, name), f"{where}.{name}", allow_zero=True)
        for name in ("temperature", "max_classes", "anchors_per_class", "sdcl_negatives",
                     "sdcl_anchors_per_image", "projection_dim"):
            positive(getattr(self, name), f"{where}.{name}")


class BlindNet(Method):
    streams = ("source",)
    params_type = BlindNetParams

    def __init__(self, model: nn.Module, params: BlindNetParams,
                 normalize: tuple[tuple[float, ...], tuple[float, ...]]):
        super().__init__(model, params)
        if model.params.arch != "deeplabv3plus":
            raise ConfigError(f"params: blindnet needs model.arch deeplabv3plus (its contrast reads the "
                              f"decoder's dec0/dec1), got {model.params.arch!r}")
        if model.params.instance_norm == "none" and (params.cml_weight > 0 or params.ccl_weight > 0):
            raise ConfigError("params: blindnet's covariance alignment needs model.instance_norm: in "
                              "(or set cml_weight and ccl_weight to 0)")
        channels = model.backbone.channels
        widths = {"layer4": channels["layer4"], "decoder_input": 304, "embedding": 256}
        self.heads = nn.ModuleList([ProjectionHead(widths[name], params.projection_dim)
                                    for name in CONTRAST_LEVELS])
        self.mean, self.std = normalize

    @classmethod
    def build(cls, model: nn.Module, params: BlindNetParams, context: StageContext) -> "BlindNet":
        return cls(model, params, context.normalize)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "projection": self.heads}

    def param_groups(self) -> dict[str, list[ParamGroup]]:
        groups = super().param_groups()
        groups["model"].append(ParamGroup(list(self.heads.parameters()), head=True))
        return groups

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: Batch, it: int) -> dict[str, torch.Tensor]:
        p = self.params
        image, label = batch["source"]["image"], batch["source"]["label"]
        rng = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))   # global RNG: exact resume
        x = photometric_view(image, self.mean, self.std, p.original_view, rng)
        x_a = photometric_view(image, self.mean, self.std, p.style_view, rng)
        out, out_a = self.model(x), self.model(x_a)     # separate forwards: BatchNorm never mixes the views

        losses = {"seg": 0.5 * (cross_entropy(out.logits, label) + cross_entropy(out_a.logits, label))}
        if out.aux_logits is not None and p.aux_weight > 0:
            losses["seg_aux"] = p.aux_weight * cross_entropy_on_grid(out.aux_logits, label)
        losses.update(self.covariance_alignment(out, out_a))
        losses.update(self.semantic_contrast(out, out_a, label, rng))
        sum(losses.values()).backward()
        return {name: value.detach() for name, value in losses.items()}

    def covariance_alignment(self, out: SegOutput, out_a: SegOutput) -> dict[str, torch.Tensor]:
        """w1 CML + w2 CCL over the three instance-normalised maps; the original view is detached."""
        p = self.params
        if p.cml_weight == 0 and p.ccl_weight == 0:
            return {}
        pairs = [(out.features[name], out_a.features[name]) for name in INSTANCE_NORM_FEATURES]
        losses = {}
        if p.cml_weight > 0:
            losses["cml"] = p.cml_weight * _mean([covariance_matching_loss(f, f_a, p.covariance_eps)
                                                  for f, f_a in pairs])
        if p.ccl_weight > 0:
            losses["ccl"] = p.ccl_weight * _mean([cross_covariance_loss(f, f_a, p.covariance_eps)
                                                  for f, f_a in pairs])
        return losses

    def semantic_contrast(self, out: SegOutput, out_a: SegOutput, label: torch.Tensor,
                          rng: torch.Generator) -> dict[str, torch.Tensor]:
        """w3 CWCL + w4 SDCL over the three projection levels: q from x_a (gradient), k from x (none)."""
        p = self.params
        if p.cwcl_weight == 0 and p.sdcl_weight == 0:
            return {}
        pred, pred_a = out.logits.detach().argmax(dim=1), out_a.logits.detach().argmax(dim=1)
        cwcl, sdcl = [], []
        for head, name in zip(self.heads, CONTRAST_LEVELS):
            q = head(out_a.features[name])
            with torch.no_grad():
                k = head(out.features[name])
            size = tuple(q.shape[-2:])
            y, p_x, p_xa = (resize_labels(t, size) for t in (label, pred, pred_a))
            nothing = q.sum() * 0.0
            if p.cwcl_weight > 0:
                index = class_wise_anchors(y, p_x, p.max_classes, p.anchors_per_class, p.cwcl_negatives, rng)
                cwcl.append(nothing if index is None else
                            class_wise_nce(q, k, index, p.anchors_per_class, p.temperature, p.cwcl_negatives))
            if p.sdcl_weight > 0:
                anchors = disentangle_anchors(y, p_x, p_xa, p.sdcl_negatives,
                                              p.sdcl_anchors_per_image * len(label), rng)
                sdcl.append(nothing if anchors is None else disentangle_nce(q, k, anchors, p.temperature))
        losses = {}
        if cwcl:
            losses["cwcl"] = p.cwcl_weight * _mean(cwcl)
        if sdcl:
            losses["sdcl"] = p.sdcl_weight * _mean(sdcl)
        return losses


def _mean(terms: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(terms).mean()


METHOD = BlindNet
