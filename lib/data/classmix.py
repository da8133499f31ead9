"""ClassMix and the strong augmentation of mixed images, as DACS (Tranheden et al., WACV 2021) and
DAFormer (Hoyer et al., CVPR 2022) apply them.

ClassMix pastes the pixels of half of the source classes onto the target crop:

    M_i = [y_s,i in S_i],   m = M x_s + (1 - M) x_t,   y_m = M y_s + (1 - M) y^_t,   w_m = M + (1 - M) q

S_i: (n + n mod 2) / 2 classes drawn without replacement from the n distinct values of the WHOLE
source label batch, ignore (255) included: DAFormer's deviation from DACS (per-sample classes), which
CISS inherits; a sample may draw classes it does not contain.

The mixed image is then colour-jittered (p 0.8, strength 0.2) and blurred (p 0.5, sigma ~ U(0.15, 1.15),
kernel ~10% of the side, odd).  The on/off decisions are drawn once per iteration and shared by the
batch; factors and sigma are drawn per sample.  CISS augments its stylized mix with the same decisions
and freshly drawn factors (the released code, SysCV/CISS): call :func:`augment` twice with the same decisions.

Our choice: the jitter follows torchvision's ColorJitter (multiplicative brightness, factors
U[1-s, 1+s], hue shift U[-s, s] turns, the four in a random order) on the [0, 1] image; DACS calls
kornia's.  Randomness comes only from the CPU ``torch.Generator`` passed in.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

# DACS's blur: sigma ~ U(0.15, 1.15)
BLUR_SIGMA = (0.15, 1.15)
_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
_PER_SAMPLE = 9    # uniforms per sample: 4 jitter factors, 4 order keys, sigma


def choose_classes(labels: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
    """Per sample of (N, H, W) source labels: (n + n mod 2) / 2 of the batch's n distinct values."""
    candidates = torch.unique(labels)
    n = len(candidates)
    picks = [torch.randperm(n, generator=generator)[: (n + n % 2) // 2] for _ in range(len(labels))]
    return [candidates[p.to(candidates.device)] for p in picks]


def class_masks(labels: torch.Tensor, classes: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, H, W) bool: pixel of sample i whose label is one of ``classes[i]``."""
    return torch.stack([torch.isin(label, chosen) for label, chosen in zip(labels, classes)])


def mix(mask: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """M source + (1 - M) target for images (N, C, H, W) or per-pixel maps (N, H, W); ``mask`` (N, H, W)."""
    return torch.where(mask[:, None] if source.ndim == 4 else mask, source, target)


@dataclass(frozen=True)
class Augmentation:
    """The per-iteration on/off decisions of the mixed-image augmentation."""

    jitter: bool
    blur: bool


def draw_augmentation(generator: torch.Generator, jitter_p: float, blur_p: float) -> Augmentation:
    """DACS: colour jitter if u > 0.2 (``jitter_p`` = 0.8 here is the probability it is applied), blur if
    u' > 0.5; two uniforms per iteration."""
    u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    return Augmentation(jitter=u[0] < jitter_p, blur=u[1] < blur_p)


def blur_kernel_size(side: int) -> int:
    """DACS's kernel: ceil(0.1 side), made odd by subtracting one (103 for 1024, 7 for 64)."""
    size = math.ceil(0.1 * side)
    return size if size % 2 else size - 1


def augment(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], decisions: Augmentation,
            strength: float, generator: torch.Generator) -> torch.Tensor:
    """Jitter and blur a normalised batch (N, 3, H, W), (x - mean) / std of [0, 1] values, per sample.

    Draws a fixed number of uniforms per sample whatever the decisions, so a second call on the same
    generator always sees fresh parameters.  Returns float32 images normalised the same way.
    """
    n, _, height, width = images.shape
    uniforms = torch.rand((n, _PER_SAMPLE), generator=generator, dtype=torch.float64).tolist()
    if not (decisions.jitter or decisions.blur):
        return images
    kernel = [blur_kernel_size(width), blur_kernel_size(height)]
    with torch.autocast(images.device.type, enabled=False):
        mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        x = (images.float() * std_t + mean_t).clamp(0.0, 1.0)
        out = []
        for image, u in zip(x, uniforms):
            if decisions.jitter and strength > 0:
                factors = [1.0 - strength + 2 * strength * u[k] for k in range(3)]
                factors.append(-strength + 2 * strength * u[3])          # hue shift in turns
                for k in sorted(range(4), key=lambda k: u[4 + k]):
                    image = _JITTER[k](image, factors[k])
            if decisions.blur:
                sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[8]
                image = TF.gaussian_blur(image, kernel, [sigma, sigma])
            out.append(image)
        return (torch.stack(out) - mean_t) / std_t
