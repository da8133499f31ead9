"""What BAFFT's two steps share (Yuan et al., IEEE TIP 2022): the step order, the discriminator,
the stuff and thing memories and the category / instance / ISIA terms; lib/methods/bafft_step1.py
describes them, lib/methods/bafft_step2.py adds the pseudo-labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from lib.config import positive
from lib.errors import ConfigError
from lib.losses.adversarial import frozen
from lib.losses.category import (
    STUFF_19,
    THING_19,
    RingBank,
    check_split,
    class_centroids,
    classifier_agrees,
    correct_prediction_mask,
    isia_intra,
    isia_separation,
    masked_average_pool,
    nearest_distance,
    self_weighted,
    stuff_regions,
    thing_regions,
    version_a_diff,
    version_a_same,
    version_a_separation,
)
from lib.losses.segmentation import cross_entropy
from lib.methods.base import Batch, OutputSpaceMethod
from lib.methods.parts.output_space import AdversarialOutputSpace, AdversarialParams
from lib.models.output import SegOutput, upsample


class SoftmaxDiscriminator(AdversarialOutputSpace):
    """AdaptSegNet's discriminator on the softmax (BAFFT's output-space term)."""

    def discriminator_input(self, prob: torch.Tensor) -> torch.Tensor:
        return prob


VERSION_A_BETA_AIM = 10.0   # `BETA` of code version A of the released code


@dataclass(frozen=True)
class BafftParams:
    aux_weight: float = 0.1        # CE of the aux head when the model has one (BAFFT's DeepLab has none)
    adv_weight: float = 1e-3       # λ_adv (the released code)
    stuff_weight: float = 1e-2     # λ_cls, stuff prototypes
    instance_weight: float = 1e-2  # λ_ins, thing instances
    isia_weight: float = 1e-2      # λ_ISIA (our choice); version A: weight of L_same + L_diff and of L_sep
    alignment: Literal["sim", "isia"] = "isia"
    code_faithful: bool = False    # isia only: code version A's losses, for comparison
    beta: float = 1.0              # ISIA separation weight β (value UNKNOWN in the paper)
    beta_aim: float = 1.0          # AIM thing-term weight β_AIM (version A uses 10)
    stuff_slots: int = 50          # NUM_PROTOTYPE
    thing_slots: int = 500         # 10 x NUM_PROTOTYPE
    top_k: int = 10                # largest connected regions kept per thing class
    stuff_classes: tuple[int, ...] = STUFF_19   # train IDs; lib.losses.category.stuff_and_things
    thing_classes: tuple[int, ...] = THING_19   # gives the split of another class set
    ndf: int = 64                  # discriminator width

    def validate(self, where: str) -> None:
        for name in ("aux_weight", "adv_weight", "stuff_weight", "instance_weight", "isia_weight",
                     "beta", "beta_aim"):
            positive(getattr(self, name), f"{where}.{name}", allow_zero=True)
        for name in ("stuff_slots", "thing_slots", "top_k", "ndf"):
            positive(getattr(self, name), f"{where}.{name}")
        if self.code_faithful and self.alignment != "isia":
            raise ConfigError(f"params: {where}.code_faithful reproduces the ISIA code (version A); "
                              f"it needs alignment: isia, got {self.alignment!r}")


class BafftAlignment(OutputSpaceMethod):
    """Both steps of BAFFT: AdaptSegNet's single-level discriminator plus the category- and
    instance-level alignment against the source memories.  ``target_regions`` and
    ``target_supervision`` are what step 2 changes."""

    params_type = BafftParams
    name = "bafft"

    def __init__(self, model: nn.Module, params: BafftParams):
        super().__init__(model, params)
        if model.params.arch != "deeplabv2":
            raise ConfigError(f"params: {self.name} needs model.arch deeplabv2 (its classifier gate feeds "
                              f"pooled layer4 features to the head), got {model.params.arch!r}")
        check_split(params.stuff_classes, params.thing_classes, model.num_classes, self.name)
        self.adversarial = SoftmaxDiscriminator(model, AdversarialParams(
            aux_weight=params.aux_weight, adv_main=params.adv_weight, adv_aux=0.0, gan="bce", ndf=params.ndf))
        dim = model.backbone.channels["layer4"]
        self.stuff_bank = RingBank(params.stuff_classes, params.stuff_slots, dim)
        self.thing_bank = RingBank(params.thing_classes, params.thing_slots, dim)

    @property
    def version_a(self) -> bool:
        return self.params.code_faithful

    def discriminators(self) -> dict[str, nn.Module]:
        return self.adversarial.discriminators()

    def modules(self) -> dict[str, nn.Module]:
        # the memories have no parameters but are checkpointed, so a resumed run matches exactly
        return {**super().modules(), "stuff_bank": self.stuff_bank, "thing_bank": self.thing_bank}

    # --- the step -----------------------------------------------------------------------------

    def training_step(self, batch: Batch, it: int) -> dict[str, torch.Tensor]:
        xs, ys, xt = batch["source"]["image"], batch["source"]["label"], batch["target"]["image"]
        size = tuple(xt.shape[-2:])
        with frozen(self.discriminators().values()):
            source = self.model(xs)
            losses = self.source_losses(source, ys)
            sum(losses.values()).backward(retain_graph=self.version_a)
            mask = correct_prediction_mask(source.logits.detach(), ys)
            self.remember(source.features["layer4"].detach(), mask)
            target = self.model(xt)
            regions = self.target_regions(target, batch["target"])
            aligned = {**self.target_supervision(target, batch["target"]),
                       **self.adversarial.target_losses(target, size, it),
                       **self.alignment_losses(source, mask, target, regions, it)}
            total = sum(aligned.values())
            if total.requires_grad:
                total.backward()
        judged = self.discriminator_losses(source.detached(), ys, target.detached(), size, it)
        if judged:
            sum(judged.values()).backward()
        return {name: value.detach() for name, value in {**losses, **aligned, **judged}.items()}

    def source_losses(self, source: SegOutput, label: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = {"seg": cross_entropy(source.logits, label)}
        if source.aux_logits is not None and self.aux_weight > 0:
            losses["seg_aux"] = self.aux_weight * cross_entropy(source.aux_logits, label)
        return losses

    def target_regions(self, target: SegOutput, target_batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def target_supervision(self, target: SegOutput, target_batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def discriminator_losses(self, source, source_label, target, target_size, it):
        return self.adversarial.discriminator_losses(source, source_label, target, target_size, it)

    # --- memories and matching -------------------------------------------------------------------

    def pooled_regions(self, features: torch.Tensor, labels: np.ndarray):
        """One image's stuff prototypes and thing instances: (vectors, classes) for each."""
        stuff_masks, stuff = stuff_regions(labels, self.params.stuff_classes)
        thing_masks, things = thing_regions(labels, self.params.thing_classes, self.params.top_k)
        masks = torch.from_numpy(np.concatenate([stuff_masks, thing_masks])).to(features.device)
        pooled = masked_average_pool(features, masks)
        return pooled[:len(stuff)], stuff, pooled[len(stuff):], things

    @torch.no_grad()
    def remember(self, features: torch.Tensor, mask: torch.Tensor) -> None:
        """As released: the gated source prototypes and instances of every image enter the memories."""
        for f, labels in zip(features, mask.cpu().numpy()):
            stuff_v, stuff, thing_v, things = self.pooled_regions(f, labels)
            agree = classifier_agrees(self.model.head, torch.cat([stuff_v, thing_v]), stuff + things).tolist()
            for bank, vectors, classes, ok in ((self.stuff_bank, stuff_v, stuff, agree[:len(stuff)]),
                                               (self.thing_bank, thing_v, things, agree[len(stuff):])):
                for c in dict.fromkeys(classes):
                    rows = [i for i, (k, good) in enumerate(zip(classes, ok)) if k == c and good]
                    if rows:
                        bank.write(c, vectors[rows])

    def matched(self, distance: torch.Tensor) -> torch.Tensor:
        """φ(d): plain for ``sim``, AIM's self-weighting d² otherwise."""
        return distance if self.params.alignment == "sim" else self_weighted(distance)

    @property
    def instance_beta(self) -> float:
        if self.params.alignment == "sim":
            return 1.0
        return VERSION_A_BETA_AIM if self.version_a else self.params.beta_aim

    def alignment_losses(self, source: SegOutput, mask: torch.Tensor, target: SegOutput,
                         regions: torch.Tensor, it: int) -> dict[str, torch.Tensor]:
        p = self.params
        features = target.features["layer4"]
        dim = features.shape[1]
        zero = features.new_zeros((), dtype=torch.float32)
        stuff_ready, thing_ready = self.stuff_bank.ready_classes(), self.thing_bank.ready_classes()
        stuff_terms, instance_terms, separation_terms = [], [], []
        for f, labels in zip(features, regions.cpu().numpy()):
            stuff_v, stuff, thing_v, things = self.pooled_regions(f, labels)
            gated = [i for i, ok in enumerate(classifier_agrees(self.model.head, stuff_v, stuff).tolist()) if ok]
            if it > 0:
                for i in gated:
                    if stuff[i] in stuff_ready:
                        d = nearest_distance(stuff_v[i:i + 1], self.stuff_bank.entries(stuff[i]))
                        stuff_terms.append(self.matched(d).sum())
                for c in dict.fromkeys(things):
                    if c in thing_ready:
                        rows = [i for i, k in enumerate(things) if k == c]
                        d = nearest_distance(thing_v[rows], self.thing_bank.entries(c))
                        instance_terms.append(self.matched(d).mean())
            if self.version_a:
                separation_terms.append(version_a_separation(stuff_v[gated], thing_v, things, dim))
        n = len(features)
        losses = {"stuff": p.stuff_weight * sum(stuff_terms, zero) / n,
                  "instance": p.instance_weight * self.instance_beta * sum(instance_terms, zero) / n}
        if self.version_a:
            p_s, p_t = paired_probabilities(source.logits, target.logits)
            losses["same"] = p.isia_weight * version_a_same(p_s, p_t, dim)
            losses["diff"] = p.isia_weight * version_a_diff(p_s, p_t, dim)
            losses["sep"] = p.isia_weight * sum(separation_terms, zero) / n
        elif p.alignment == "isia":
            c_s, present_s = class_centroids(source.features["layer4"].detach(), mask, self.model.num_classes)
            c_t, present_t = class_centroids(features, regions, self.model.num_classes)
            losses["isia_intra"] = p.isia_weight * isia_intra(c_s, c_t, present_s, present_t)
            losses["isia_sep"] = p.isia_weight * p.beta * isia_separation(c_s, c_t, present_s, present_t)
        return losses


def paired_probabilities(source_logits: torch.Tensor, target_logits: torch.Tensor):
    """Version A's softmax maps on one grid: the source's resized to the target's (the released code
    resizes the source image instead), images paired by index."""
    n = min(len(source_logits), len(target_logits))
    p_s = upsample(source_logits[:n].float().softmax(dim=1), tuple(target_logits.shape[-2:]))
    return p_s, target_logits[:n].float().softmax(dim=1)
