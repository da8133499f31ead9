"""CISS: Condition-Invariant Semantic Segmentation (Sakaridis et al., arXiv 2305.17349).

DACS self-training (Tranheden et al., WACV 2021), as DAFormer (Hoyer et al., CVPR 2022) configures it,
plus a feature invariance loss between every image and its stylized copy.  Sample i pairs a source crop
x_s (label y_s) with a target crop x_t; the loader (lib.data.paired) adds x~_s, the source in the
target's style, and x~_t, the target in the source's (FDA with beta = 0.01, or Reinhard, on the full
images before the shared crop and flip).  With the student G (encoder E), its EMA teacher G' and a
frozen ImageNet-initialised copy E_I, one iteration is, as in the released code (SysCV/CISS):

1. L_seg(x_s, y_s)                                     CE on the original source only
2. lambda_FD [L_FD(x_s) + L_FD(x~_s)]                  ||E(x) - E_I(x)||_2 on thing cells (DAFormer)
3. lambda_s L_inv(x_s, x~_s)                           sum_l w_l mean (E_l(a) - E_l(b))^2 (CISS)
4. y^_t = argmax G'(x_t), q = share of target pixels with max softmax >= tau           (DACS)
5. ClassMix: M from half of the source batch's classes, m = aug(M x_s + (1 - M) x_t),
   y_m = M y_s + (1 - M) y^_t, w_m = M + (1 - M) q                                     (DACS, DAFormer)
6. L_seg^w(m, y_m, w_m)
7. m~ = aug'(M x~_s + (1 - M) x~_t): the same M and on/off decisions, fresh jitter and blur draws;
   lambda_t L_inv(m, m~)

    L = L_seg + lambda_FD [L_FD(x_s) + L_FD(x~_s)] + lambda_s L_inv(x_s, x~_s) + L_seg^w(m) + lambda_t L_inv(m, m~)

The gradients of the source terms (1-3) and of the target terms (6-7) are back-propagated in two
passes and summed; after the optimizer step theta' <- alpha_t theta' + (1 - alpha_t) theta with
alpha_t = min(1 - 1/(t+1), 0.999).  lambda_s = lambda_t = 0 is DACS itself (the control of the
invariance loss): no stylized copies are made and steps 3 and 7 and the FD on x~_s disappear.

Our choices, flagged (CISS builds on HRDA with a MiT-B5 encoder; we run DeepLab on a ResNet):
- no HRDA multi-resolution: one crop per image; the invariance features are the crop's own, not
  those of its x0.5 context view (the released code's); the teacher labels the crop in one forward;
- the invariance stages are ResNet stages, ``{layer1: 0.9, layer2: 0.1}`` standing for MiT stages 1
  and 2 (strides 4 and 8); FD uses ``layer4`` for the last MiT stage;
- FD runs only when the row starts from imported (ImageNet) weights (``from: <weights entry>``); otherwise it
  is off, with one logged line;
- a model with an auxiliary head adds ``aux_weight`` x its CE to both supervised terms (DAFormer's
  head has none);
- the teacher runs in train mode with its dropout off, as DACS does; its BatchNorm therefore
  normalises with batch statistics, so copying the student's buffers (lib.models.ema) does not change
  its outputs;
- the student's BatchNorm statistics see all four views (MiT has LayerNorm only).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from lib.config import positive
from lib.data.classmix import (
    augment,
    choose_classes,
    class_masks,
    draw_augmentation,
    mix,
)
from lib.data.paired import STYLIZED
from lib.errors import ConfigError
from lib.losses.feature_distance import feature_distance, thing_cells
from lib.losses.invariance import feature_invariance
from lib.losses.segmentation import weighted_cross_entropy
from lib.methods.base import Batch, Method, StageContext
from lib.models.backbone import STAGES
from lib.models.ema import ema_update, warmup_momentum
from lib.models.output import SegOutput, upsample
from lib.stylize.transfer import MAX_BETA, Transfer, parse_transfer

ENCODER_FEATURES = ("stem", *STAGES)
FD_FEATURE = "layer4"      # the last encoder stage (MiT stage 4 in CISS)
DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass(frozen=True)
class CissParams:
    source_weight: float = 50.0        # lambda_s, Cityscapes -> ACDC (Dark Zurich: 100)
    target_weight: float = 20.0        # lambda_t (Dark Zurich: 10)
    invariance_layers: dict[str, float] = field(default_factory=lambda: {"layer1": 0.9, "layer2": 0.1})
    stylization: str = "fda"           # fda | fda:<beta> | reinhard (lib.stylize.transfer)
    fda_beta: float = 0.01
    ema: float = 0.999                 # the cap of alpha_t
    pseudo_threshold: float = 0.968    # tau of the confidence weight q
    jitter_p: float = 0.8              # DACS color_jitter_probability 0.2: applied when u > 0.2
    jitter_strength: float = 0.2
    blur_p: float = 0.5
    fd_weight: float = 0.005           # lambda_FD (0: off)
    fd_classes: list[int] = field(default_factory=lambda: [6, 7, 11, 12, 13, 14, 15, 16, 17, 18])
    fd_min_ratio: float = 0.75
    aux_weight: float = 0.1            # our choice: CE of an auxiliary head, if the model has one

    def validate(self, where: str) -> None:
        for name in ("source_weight", "target_weight", "fd_weight", "aux_weight", "jitter_strength"):
            positive(getattr(self, name), f"{where}.{name}", allow_zero=True)
        for name in ("ema", "pseudo_threshold", "jitter_p", "blur_p", "fd_min_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"params: {where}.{name} must be in [0, 1], got {value}")
        if self.jitter_strength > 0.5:     # hue shifts beyond half a turn are not defined
            raise ConfigError(f"params: {where}.jitter_strength must be <= 0.5, got {self.jitter_strength}")
        if not 0 <= self.fda_beta < MAX_BETA:
            raise ConfigError(f"params: {where}.fda_beta must be in [0, {MAX_BETA}), got {self.fda_beta}")
        parse_transfer(self.stylization, self.fda_beta, f"{where}.stylization")
        unknown = sorted(set(self.invariance_layers) - set(ENCODER_FEATURES))
        if unknown:
            raise ConfigError(f"params: {where}.invariance_layers.{unknown[0]} is not an encoder stage "
                              f"(stages: {', '.join(ENCODER_FEATURES)})")
        for name, weight in self.invariance_layers.items():
            positive(weight, f"{where}.invariance_layers.{name}", allow_zero=True)
        if self.invariant and not any(self.invariance_layers.values()):
            raise ConfigError(f"params: {where}.invariance_layers needs a positive weight while "
                              "source_weight or target_weight is positive")
        for c in self.fd_classes:
            positive(c, f"{where}.fd_classes", allow_zero=True)

    @property
    def invariant(self) -> bool:
        """False: plain DACS, the control of the invariance loss."""
        return self.source_weight > 0 or self.target_weight > 0


def pseudo_weight(prob: torch.Tensor, threshold: float) -> torch.Tensor:
    """DACS's confidence weight q: the share of ALL pixels of the batch (N, C, H, W softmax) whose top
    probability reaches ``threshold``; one scalar that weights every target pixel (the released code,
    SysCV/CISS)."""
    return (prob.max(dim=1).values >= threshold).float().mean()


class Ciss(Method):
    streams = ("source", "target")
    params_type = CissParams

    def __init__(self, model: nn.Module, params: CissParams, num_classes: int,
                 normalize: tuple[tuple[float, ...], tuple[float, ...]], start: str = "scratch"):
        super().__init__(model, params)
        for c in params.fd_classes:
            if c >= num_classes:
                raise ConfigError(f"params: ciss.fd_classes: class {c} does not exist ({num_classes} classes)")
        self.num_classes = num_classes
        self.mean, self.std = normalize
        self.teacher = copy.deepcopy(model).requires_grad_(False)     # iteration 0: G' = G
        self.imagenet = None
        if params.fd_weight > 0:
            if start == "weights":     # the frozen copy holds the imported weights the row starts from
                self.imagenet = copy.deepcopy(model).requires_grad_(False)
            else:
                print(f"ciss: ImageNet feature distance off: the row starts from {start}, not from imported "
                      "ImageNet weights (set method.fd_weight: 0 to silence this)")

    @classmethod
    def build(cls, model, params, context: StageContext) -> "Ciss":
        return cls(model, params, context.num_classes, context.normalize, context.start)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "teacher": self.teacher}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {} if self.imagenet is None else {"imagenet": self.imagenet}

    def stream_stylization(self) -> Transfer | None:
        p = self.params
        return parse_transfer(p.stylization, p.fda_beta, "ciss.stylization") if p.invariant else None

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: Batch, it: int) -> dict[str, torch.Tensor]:
        p = self.params
        source, target = batch["source"], batch["target"]
        xs, ys, xt = source["image"], source["label"], target["image"]
        if xs.shape != xt.shape:
            raise ConfigError(f"ciss mixes source and target crops pixel by pixel: give both streams one crop "
                              f"size (source {tuple(xs.shape[-2:])}, target {tuple(xt.shape[-2:])})")
        rng = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))   # global RNG: exact resume

        # source: L_seg, L_FD on both views, lambda_s L_inv
        out_s = self.model(xs)
        terms = {"seg": self._supervised(out_s, ys)}
        self._add_feature_distance(terms, "fd", xs, out_s, ys)
        if p.source_weight > 0 or (p.invariant and self.imagenet is not None):
            out_s_styl = self.model(source[STYLIZED])
            self._add_feature_distance(terms, "fd_stylized", source[STYLIZED], out_s_styl, ys)
            if p.source_weight > 0:
                terms["inv_source"] = p.source_weight * feature_invariance(
                    out_s.features, out_s_styl.features, p.invariance_layers)
        sum(terms.values()).backward()
        losses = terms

        # target: pseudo-labels of the teacher on the original target, ClassMix, weighted CE, lambda_t L_inv
        prob = self._teacher_softmax(xt)
        pseudo, q = prob.argmax(dim=1), pseudo_weight(prob, p.pseudo_threshold)
        masks = class_masks(ys, choose_classes(ys, rng))
        decisions = draw_augmentation(rng, p.jitter_p, p.blur_p)
        mixed = augment(mix(masks, xs, xt), self.mean, self.std, decisions, p.jitter_strength, rng)
        out_m = self.model(mixed)
        weight = torch.where(masks, 1.0, q)
        terms = {"seg_mix": self._supervised(out_m, mix(masks, ys, pseudo), weight)}
        if p.target_weight > 0:
            mixed_styl = augment(mix(masks, source[STYLIZED], target[STYLIZED]), self.mean, self.std,
                                 decisions, p.jitter_strength, rng)
            terms["inv_target"] = p.target_weight * feature_invariance(
                out_m.features, self.model(mixed_styl).features, p.invariance_layers)
        sum(terms.values()).backward()
        losses.update(terms)
        losses["pseudo_weight"] = q      # logged, not a loss term
        return {name: value.detach() for name, value in losses.items()}

    def after_step(self, it: int) -> None:
        # the teacher that iteration it + 1 uses: alpha_{it+1} (DACS updates at the start of an iteration)
        ema_update(self.teacher, self.model, warmup_momentum(it + 1, self.params.ema))

    # ------------------------------------------------------------------ pieces
    def _supervised(self, out: SegOutput, label: torch.Tensor, weight: torch.Tensor | float = 1.0) -> torch.Tensor:
        loss = weighted_cross_entropy(out.logits, label, weight)
        if out.aux_logits is not None and self.params.aux_weight > 0:
            loss = loss + self.params.aux_weight * weighted_cross_entropy(out.aux_logits, label, weight)
        return loss

    @torch.no_grad()
    def _teacher_softmax(self, xt: torch.Tensor) -> torch.Tensor:
        """softmax of the teacher's logits at the crop's size; train mode with dropout off (DACS)."""
        for module in self.teacher.modules():
            if isinstance(module, DROPOUT):
                module.eval()
        logits = self.teacher(xt).logits
        return torch.softmax(upsample(logits, tuple(xt.shape[-2:])).float(), dim=1)

    def _add_feature_distance(self, terms: dict, name: str, x: torch.Tensor, out: SegOutput,
                              label: torch.Tensor) -> None:
        if self.imagenet is None:
            return
        p = self.params
        student = out.features[FD_FEATURE]
        with torch.no_grad():
            reference = self.imagenet(x).features[FD_FEATURE]
        mask = thing_cells(label, tuple(student.shape[-2:]), self.num_classes, p.fd_classes, p.fd_min_ratio)
        terms[name] = p.fd_weight * feature_distance(student, reference, mask)


METHOD = Ciss
