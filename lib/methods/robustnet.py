"""RobustNet (Choi et al., CVPR 2021): instance whitening losses IW / IRW / ISW, the baselines of
BlindNet (Ahn et al., CVPR 2024), as the released code (shachoi/RobustNet) trains them.

The DeepLabV3+ carries instance normalisation after the stem and at the end of layer1 and layer2
(``model.instance_norm: in``); each step trains on one photometric view of the crop (colour jitter
with p = 0.5, blur: BlindNet's original view) with

    L = CE(up(P(x)), y) + 0.4 CE(dsn(x), y at stride 16) + w * 1/3 sum_i L_wt(F^i)
    L_wt(F) = mean_b max(0, (sum_ij M_ij |Sigma_b,ij| - margin) / |M|)

- ``iw``:  M = all off-diagonal pairs i < j, margin 0 (paper weight 0.8);
- ``irw``: the same M, margin = floor(C(C-1)/2 / relax_denom) (0.6);
- ``isw``: M = the style-sensitive pairs (0.6), found by a statistics phase before the loss starts:
  each of ``trials`` trials measures, for ``trial_images`` images, every off-diagonal covariance
  entry under the plain image and a strong photometric view (ColorJitter(0.8, 0.8, 0.8, 0.3) + blur),
  takes the variance across the two views, (a - b)^2 / 2, averaged over the images -> V; V's C^2
  entries are clustered by exact 1-D k-means (``clusters``: 3 on GTAV, 2 on Cityscapes) and the
  entries outside the lowest cluster are sensitive.  M is the AND over the trials.
- ``none``: no whitening loss: RobustNet's baseline (``model.instance_norm: none``) or its "IBN"
  (``model.instance_norm: in_affine``).

ISW's statistics phase runs as RobustNet runs it between epochs 5 and 6: once, at iteration
``statistics_iter``, with the weights fixed (eval mode, no gradients), on ``trials`` x ``trial_images``
full-resolution source training frames (batch 1, no geometric augmentation; the stage hands them over
as ``StageContext.source_frames``), each trial its own random draw of frames; the ISW loss is on from
that iteration.  The selection is a checkpointed module, so a resumed run never measures twice.  Our
choice: trial t draws its frames and style views from the generator of (train seed, t).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
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
from lib.losses.covariance import (
    EPS,
    relaxed_margin,
    sensitive_mask,
    strict_upper,
    view_variance,
    whitening_loss,
)
from lib.losses.segmentation import cross_entropy, cross_entropy_on_grid
from lib.methods.base import Batch, Method, StageContext
from lib.models.backbone import INSTANCE_NORM_FEATURES
from lib.train.checkpoint import evaluating

# (count, seed) -> that many distinct source training frames, drawn with the seed, each (1, 3, H, W) normalised
Frames = Callable[[int, list[int]], Iterator[torch.Tensor]]


@dataclass(frozen=True)
class RobustNetParams:
    aux_weight: float = 0.4
    whitening: Literal["none", "iw", "irw", "isw"] = "isw"
    whitening_weight: float = 0.6          # paper: IW 0.8, IRW 0.6, ISW 0.6
    relax_denom: float = 64.0              # IRW margin denominator
    clusters: int = 3                      # ISW k-means K (GTAV 3, Cityscapes 2)
    trials: int = 10                       # ISW statistics trials
    trial_images: int = 500                # images per trial
    # ISW statistics start: the end of RobustNet's epoch 5 on GTAV, 6 x 774 iterations of batch 16
    # (12,388 images / 16) -- derived from the recipe, not a published number
    statistics_iter: int = 4644
    covariance_eps: float = EPS
    train_view: PhotometricParams = field(default_factory=lambda: ORIGINAL_VIEW)
    style_view: PhotometricParams = field(default_factory=lambda: STYLE_VIEW)   # ISW statistics only

    def validate(self, where: str) -> None:
        for name in ("aux_weight", "whitening_weight", "statistics_iter", "covariance_eps"):
            positive(getattr(self, name), f"{where}.{name}", allow_zero=True)
        for name in ("relax_denom", "clusters", "trials", "trial_images"):
            positive(getattr(self, name), f"{where}.{name}")


class StyleSelection(nn.Module):
    """ISW's statistics phase and its result, as buffers (checkpointed): per instance-normalised map
    i, the running sum of the view variance of the current trial and the AND of the trial masks."""

    def __init__(self, channels: list[int]):
        super().__init__()
        for i, c in enumerate(channels):
            self.register_buffer(f"variance_{i}", torch.zeros(c, c, dtype=torch.float64))
            self.register_buffer(f"mask_{i}", torch.ones(c, c, dtype=torch.bool))
        self.register_buffer("images", torch.zeros((), dtype=torch.long))
        self.register_buffer("trials_done", torch.zeros((), dtype=torch.long))
        self.layers = len(channels)

    def variance(self, i: int) -> torch.Tensor:
        return getattr(self, f"variance_{i}")

    def mask(self, i: int) -> torch.Tensor:
        return getattr(self, f"mask_{i}")

    def add(self, variances: list[torch.Tensor], images: int) -> None:
        for i, v in enumerate(variances):
            self.variance(i).add_(v.double())
        self.images.add_(images)

    def close_trial(self, clusters: int) -> None:
        for i in range(self.layers):
            self.mask(i).logical_and_(sensitive_mask(self.variance(i) / self.images, clusters))
            self.variance(i).zero_()
        self.images.zero_()
        self.trials_done.add_(1)


class RobustNet(Method):
    streams = ("source",)
    params_type = RobustNetParams

    def __init__(self, model: nn.Module, params: RobustNetParams,
                 normalize: tuple[tuple[float, ...], tuple[float, ...]], frames: Frames | None = None,
                 seed: int = 0):
        super().__init__(model, params)
        self.frames, self.seed = frames, seed
        if params.whitening != "none" and model.params.instance_norm == "none":
            raise ConfigError(f"params: robustnet whitening {params.whitening!r} needs model.instance_norm: in "
                              "(model.arch deeplabv3plus)")
        if params.whitening == "isw" and frames is None:
            raise ConfigError("robustnet whitening 'isw' measures its statistics on source frames; none were given")
        channels = model.backbone.channels
        self.channels = [channels["stem"], channels["layer1"], channels["layer2"]]
        self.selection = StyleSelection(self.channels) if params.whitening == "isw" else None
        self.mean, self.std = normalize

    @classmethod
    def build(cls, model: nn.Module, params: RobustNetParams, context: StageContext) -> "RobustNet":
        return cls(model, params, context.normalize, context.source_frames, context.seed)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model} if self.selection is None else {"model": self.model, "selection": self.selection}

    @property
    def selection_ready(self) -> bool:
        return int(self.selection.trials_done) >= self.params.trials

    def training_step(self, batch: Batch, it: int) -> dict[str, torch.Tensor]:
        p = self.params
        image, label = batch["source"]["image"], batch["source"]["label"]
        rng = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))   # global RNG: exact resume
        x = photometric_view(image, self.mean, self.std, p.train_view, rng)
        if p.whitening == "isw" and it >= p.statistics_iter and not self.selection_ready:
            self.measure_styles(image.device)
        out = self.model(x)
        losses = {"seg": cross_entropy(out.logits, label)}
        if out.aux_logits is not None and p.aux_weight > 0:
            losses["seg_aux"] = p.aux_weight * cross_entropy_on_grid(out.aux_logits, label)
        if p.whitening in ("iw", "irw") or (p.whitening == "isw" and self.selection_ready):
            terms = [whitening_loss(out.features[name], *self.selected(i, out.features[name].device),
                                    eps=p.covariance_eps)
                     for i, name in enumerate(INSTANCE_NORM_FEATURES)]
            losses["whitening"] = p.whitening_weight * torch.stack(terms).mean()
        sum(losses.values()).backward()
        return {name: value.detach() for name, value in losses.items()}

    def selected(self, i: int, device: torch.device) -> tuple[torch.Tensor, float]:
        """(M, margin) of map i."""
        c = self.channels[i]
        if self.params.whitening == "isw":
            return self.selection.mask(i).to(device), 0.0
        margin = relaxed_margin(c, self.params.relax_denom) if self.params.whitening == "irw" else 0.0
        return strict_upper(c, device), margin

    @torch.no_grad()
    def measure_styles(self, device: torch.device) -> None:
        """ISW's statistics phase: for each trial, the covariances of ``trial_images`` frames and of
        their style views, in eval mode with the weights as they are, then the trial's mask."""
        p = self.params
        with evaluating(self.model):
            for trial in range(int(self.selection.trials_done), p.trials):
                rng = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, trial]).generate_state(1)[0]))
                for frame in self.frames(p.trial_images, [self.seed, trial]):
                    frame = frame.to(device)
                    styled = photometric_view(frame, self.mean, self.std, p.style_view, rng)
                    plain, style = self.model(frame), self.model(styled)
                    self.selection.add([view_variance(plain.features[name], style.features[name], p.covariance_eps)
                                        for name in INSTANCE_NORM_FEATURES], len(frame))
                self.selection.close_trial(p.clusters)


METHOD = RobustNet
