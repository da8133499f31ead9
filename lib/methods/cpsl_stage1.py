"""CPSL stage 1: class-balanced pixel-level self-labelling on top of ProDA's denoising
(Li et al., CVPR 2022; stage 1 of the released code, lslrh/CPSL).

Per iteration, with a source batch (x_s, y_s) and a weakly augmented target batch x_t carrying the
warm-up's soft pseudo-label p̂ (form ``soft`` of the pseudo_label stage):

1. L_src = CE(up(P(x_s)), y_s), backpropagated at once.
2. CutMix (probability ``cutmix_p``): a box of half the crop pasted from x_s into x_t; later the
   same box of the target label is taken from y_s (at crop resolution, then nearest-downsampled).
3. The EMA teacher θ̄ (train mode, as released: batch statistics, dropout on) gives features F̄
   and logits Ō on the target crop.
4. The student sees the (mixed) weak crop -> logits, and a strong view -> features.
5. Rectification: w = softmax(cos(F̄, C̄)/τ), ŷ = argmax(w ⊙ p̂).
6. L_SL: the cluster prediction softmax(cos(f̄, C)/τ) of 256 sampled teacher pixels per image is
   pulled towards two class-balanced Sinkhorn targets (teacher features against C, normalised
   teacher logits), each computed over the FIFO memory plus the new pixels.  f̄ comes from the
   no-grad teacher, so L_SL trains the prototypes C only, as the released code does.
7. L_cons = KL(teacher weak -> strong ‖ student strong) of the prototype assignments (/K).
8. L_con (code only): queue contrast of the student's weak features, on iterations without
   CutMix once the memory is full.
9. L_sce = 0.1 CE + 1.0 RCE of the weak logits against ŷ with the CutMix box from y_s.

    L = L_src + L_sce + 5 L_cons + 0.1 L_SL + 0.001 L_con

After each step θ̄ <- 0.999 θ̄ + 0.001 θ (buffers copied) and C̄ <- 0.999 C̄ + 0.001 C.
Target terms live at ``label_scale`` (1/4) of the crop, the teacher grid at the logits' stride.

Our choices, flagged: the teacher sees the un-mixed weak crop instead of the full image mapped
onto the crop ("full2weak"); the two are the same pixels, we lose the context outside the crop
and the teacher's BatchNorm sees crops.  Because of that the queue labels ŷ_SL are aligned with
their features (the released code's are misaligned).  The strong view's geometry is one affine per
sample (lib.data.strong), applied identically to images and maps.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lib.config import positive
from lib.data.strong import (
    StrongParams,
    cutmix_boxes,
    paste,
    strong_view,
    valid_mask,
    warp,
)
from lib.errors import ConfigError
from lib.losses.clustering import (
    FifoQueue,
    consistency_kl,
    cosine_scores,
    prototype_weights,
    queue_contrast,
    rectify,
    self_labelling_loss,
    sinkhorn,
    symmetric_ce,
)
from lib.losses.segmentation import cross_entropy
from lib.methods.base import Batch, Method, ParamGroup, StageContext
from lib.models.ema import ema_update
from lib.models.output import upsample
from lib.pseudo.stream import SOFT_GRID, soft_at
from lib.train import distributed


@dataclass(frozen=True)
class CpslStage1Params:
    temperature: float = 0.08          # tau of every prototype softmax
    epsilon: float = 0.05              # Sinkhorn entropy
    sinkhorn_iterations: int = 3
    samples_per_image: int = 256       # CPSL fbs: teacher pixels per image for L_SL
    queue_length: int = 65536
    ema: float = 0.999                 # teacher and prototype EMA momentum
    rectify_threshold: float = 0.0     # CPSL train_thred
    cutmix_p: float = 0.5
    cutmix_area: float = 0.5
    sl_weight: float = 0.1             # L_SL
    cons_weight: float = 5.0           # L_cons
    con_weight: float = 0.001          # L_con (code only; 0 switches it off)
    sce_alpha: float = 0.1
    sce_beta: float = 1.0
    label_scale: float = 0.25          # target terms at this fraction of the crop (CPSL: 1/4)
    aux_weight: float = 0.1            # source CE of an auxiliary head, if the model has one
    strong: StrongParams = field(default_factory=StrongParams)

    def validate(self, where: str) -> None:
        for name in ("temperature", "epsilon", "sinkhorn_iterations", "samples_per_image", "queue_length",
                     "label_scale"):
            positive(getattr(self, name), f"{where}.{name}")
        for name in ("sl_weight", "cons_weight", "con_weight", "sce_alpha", "sce_beta", "aux_weight",
                     "rectify_threshold"):
            positive(getattr(self, name), f"{where}.{name}", allow_zero=True)
        for name in ("ema", "cutmix_p", "cutmix_area"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"params: {where}.{name} must be in [0, 1], got {value}")
        if self.label_scale > 1:
            raise ConfigError(f"params: {where}.label_scale must be <= 1, got {self.label_scale}")


class Prototypes(nn.Module):
    """The self-labelling head: learnable prototypes C, their EMA C̄ and the three FIFO memories."""

    def __init__(self, init: torch.Tensor, prior: torch.Tensor, queue_length: int):
        super().__init__()
        init = F.normalize(init.float(), dim=1)
        k, d = init.shape
        if prior.shape != (k,):
            raise ConfigError(f"cpsl_stage1: the class prior has shape {tuple(prior.shape)}, the prototypes {k} classes")
        self.weight = nn.Parameter(init.clone())
        self.register_buffer("ema", init.clone())
        self.register_buffer("prior", prior.float().clone())   # r: fixed for the whole stage, as released
        self.features = FifoQueue(queue_length, d)
        self.labels = FifoQueue(queue_length, 0, torch.long)
        self.logits = FifoQueue(queue_length, k)


class CpslStage1(Method):
    streams = ("source", "target")
    params_type = CpslStage1Params
    needs_pseudo = True

    def __init__(self, model: nn.Module, params: CpslStage1Params, prototypes: torch.Tensor,
                 prior: torch.Tensor, normalize):
        super().__init__(model, params)
        self.teacher = copy.deepcopy(model).requires_grad_(False)
        self.prototypes = Prototypes(prototypes, prior, params.queue_length)
        self.mean, self.std = normalize

    @classmethod
    def build(cls, model, params, context: StageContext) -> "CpslStage1":
        pseudo = context.pseudo
        if pseudo is None or pseudo.form != "soft" or pseudo.prototypes is None or pseudo.prior is None:
            raise ConfigError("params: cpsl_stage1 needs soft pseudo-labels with prototypes and a class prior "
                              "(the row's `pseudo` must be a set of pseudo_labels with form: soft)")
        width = getattr(model, "embedding_channels", None)
        if width is not None and pseudo.prototypes.shape[1] != width:
            raise ConfigError(f"params: the soft pseudo-labels' prototypes are {pseudo.prototypes.shape[1]}-d but "
                              f"the model's embedding has {width} channels (label with the model the row starts from)")
        return cls(model, params, pseudo.prototypes, pseudo.prior, context.normalize)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "teacher": self.teacher, "prototypes": self.prototypes}

    def param_groups(self) -> dict[str, list[ParamGroup]]:
        groups = super().param_groups()
        groups["model"].append(ParamGroup([self.prototypes.weight], head=True))   # C at the head's LR
        return groups

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: Batch, it: int) -> dict[str, torch.Tensor]:
        p = self.params
        xs, ys = batch["source"]["image"], batch["source"]["label"]
        xt = batch["target"]["image"]
        n, _, h, w = xt.shape
        size = (max(1, round(h * p.label_scale)), max(1, round(w * p.label_scale)))
        rng = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))   # global RNG: exact resume

        losses = {"src": self._source_loss(xs, ys)}
        losses["src"].backward()

        mixed = bool(torch.rand((), generator=rng) < p.cutmix_p) and xs.shape == xt.shape
        boxes = cutmix_boxes(n, h, w, rng, area=p.cutmix_area, p=1.0) if mixed else None
        x_weak = paste(xt, xs, boxes) if mixed else xt

        with torch.no_grad():
            teacher = self.teacher(xt)
        f_bar, o_bar = teacher.features["embedding"].float(), teacher.logits.float()
        weak = self.model(x_weak)
        x_strong, geometry = strong_view(xt, self.mean, self.std, p.strong, rng)
        strong = self.model(x_strong)

        c_bar = self.prototypes.ema
        weights = prototype_weights(upsample(f_bar, size), c_bar, p.temperature)
        soft = soft_at(batch["target"]["soft"], batch["target"][SOFT_GRID], size)   # stored map, read at `size`
        label = rectify(soft, weights, p.rectify_threshold)
        target_label = self._mix_label(label, ys, boxes, (h, w), size) if mixed else label

        terms = {"sce": symmetric_ce(upsample(weak.logits, size), target_label, p.sce_alpha, p.sce_beta)}
        if p.cons_weight > 0:
            teacher_z = warp(weights, geometry, mode="bilinear", fill=0.0)
            valid = valid_mask(geometry, size, xt.device)
            student_logp = F.log_softmax(
                cosine_scores(upsample(strong.features["embedding"], size), c_bar) / p.temperature, dim=1)
            terms["cons"] = p.cons_weight * consistency_kl(teacher_z, student_logp, valid)
        grid_label = F.interpolate(label[:, None].float(), size=f_bar.shape[-2:], mode="nearest-exact")[:, 0].long()
        if p.sl_weight > 0:     # pushes this iteration's pixels into the memories
            terms["sl"] = p.sl_weight * self._self_labelling(f_bar, o_bar, grid_label, rng)
        if p.con_weight > 0 and not mixed and self.prototypes.features.full:
            terms["con"] = p.con_weight * self._contrast(weak.features["embedding"], grid_label, rng)
        sum(terms.values()).backward()
        losses.update(terms)
        return {name: value.detach() for name, value in losses.items()}

    def after_step(self, it: int) -> None:
        ema_update(self.teacher, self.model, self.params.ema)
        with torch.no_grad():
            self.prototypes.ema.mul_(self.params.ema).add_(self.prototypes.weight, alpha=1 - self.params.ema)

    # ------------------------------------------------------------------ pieces
    def _source_loss(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        out = self.model(xs)
        loss = cross_entropy(out.logits, ys)
        if out.aux_logits is not None and self.params.aux_weight > 0:
            loss = loss + self.params.aux_weight * cross_entropy(out.aux_logits, ys)
        return loss

    @staticmethod
    def _mix_label(label: torch.Tensor, source_label: torch.Tensor, boxes: torch.Tensor,
                   crop: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """ŷ with the CutMix box taken from y_s: at crop resolution, then nearest-downsampled."""
        full = F.interpolate(label[:, None].float(), size=crop, mode="nearest-exact")[:, 0].long()
        full = paste(full, source_label, boxes)
        return F.interpolate(full[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()

    def _sample(self, grid: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """One permutation of the teacher grid's positions, shared by the batch (first B kept)."""
        count = grid.shape[-2] * grid.shape[-1]
        return torch.randperm(count, generator=rng)[: self.params.samples_per_image].to(grid.device)

    def _self_labelling(self, f_bar: torch.Tensor, o_bar: torch.Tensor, grid_label: torch.Tensor,
                        rng: torch.Generator) -> torch.Tensor:
        """L_SL of this process's images.  The memories take every image of the global batch in its
        order, as CPSL's single process (DataParallel) does: under several processes each one's
        sampled pixels are gathered, and a process's image i is assigned with the memories as
        they are after the global batch's images before it."""
        p, protos = self.params, self.prototypes
        picks = self._sample(f_bar, rng)
        c = protos.weight
        sampled = [(F.normalize(f_bar[i].flatten(1)[:, picks].t(), dim=1),           # (B, D)
                    F.normalize(o_bar[i].flatten(1)[:, picks].t(), dim=1),           # (B, K)
                    grid_label[i].flatten()[picks]) for i in range(len(f_bar))]
        first = distributed.rank() * len(f_bar)       # this process's images in the global batch
        if distributed.world_size() > 1:
            features, logits, labels = distributed.all_gather_cat([torch.stack([s[k] for s in sampled])
                                                                   for k in range(3)])
            pushed = list(zip(features, logits, labels))
        else:
            pushed = sampled
        losses = []
        for j, (f, o, label) in enumerate(pushed):
            if first <= j < first + len(f_bar):
                f, o = sampled[j - first][:2]
                scores = f @ F.normalize(c, dim=1).t()                               # grad to C only
                b = len(f)
                with torch.no_grad():
                    if protos.features.full:
                        feature_scores = torch.cat([protos.features.data @ c.t(), scores.detach()])
                        logit_scores = torch.cat([protos.logits.data, o])
                    else:
                        feature_scores, logit_scores = scores.detach(), o
                    q_a = sinkhorn(feature_scores, protos.prior, p.epsilon, p.sinkhorn_iterations)[-b:]
                    q_b = sinkhorn(logit_scores, protos.prior, p.epsilon, p.sinkhorn_iterations)[-b:]
                losses.append(self_labelling_loss(q_a, scores, p.temperature)
                              + self_labelling_loss(q_b, scores, p.temperature))
            with torch.no_grad():
                protos.features.push(f)
                protos.labels.push(label)
                protos.logits.push(o)
        return torch.stack(losses).mean()

    def _contrast(self, embedding: torch.Tensor, grid_label: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        p, protos = self.params, self.prototypes
        picks = self._sample(embedding, rng)
        features = F.normalize(embedding.float().flatten(2)[:, :, picks].permute(0, 2, 1).reshape(-1, embedding.shape[1]),
                               dim=1)
        labels = grid_label.flatten(1)[:, picks].reshape(-1)
        # copies: the next iteration's push must not change what this graph saw
        return queue_contrast(features, labels, protos.features.data.clone(), protos.labels.data.clone(),
                              p.temperature)


METHOD = CpslStage1
