"""Photometric views of a batch on its device: colour jitter and Gaussian blur, no geometry
(the two views of BlindNet's released code, root0yang/BlindNet).

BlindNet trains on two views of every crop that differ only in colour: the "original" view x (mild
jitter with probability 0.5, then blur) and the "style" view x_a (strong jitter always, then blur).
Neither moves a pixel, so pixel (u, v) of x and x_a show the same scene point and share the label.
RobustNet trains on the mild view and measures its style statistics on the strong one (its released
code, shachoi/RobustNet).

Per image, as torchvision's ColorJitter and RobustNet's RandomGaussianBlur:

1. with probability ``jitter_p``: brightness, contrast and saturation factors ~ U[max(0, 1-s), 1+s],
   a hue shift ~ U[-hue, hue] turns, the four applied in a random order (a zero strength skips its
   operation);
2. always, when ``blur_sigma`` is not (0, 0): a Gaussian blur with sigma ~ U[blur_sigma], kernel
   radius int(4 sigma + 0.5) and edge replication (skimage/scipy ``gaussian``, mode 'nearest').

Our choices: the views are computed in float in [0, 1] on the normalised batch (the reference works
on PIL uint8 images and re-quantises after each step); every image draws a fixed number of uniforms
from the CPU generator the caller passes (seeded from torch's global RNG, so a resumed run draws the
same views).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from lib.config import positive
from lib.errors import ConfigError

_ADJUST = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
_UNIFORMS = 10   # per image: jitter coin, 3 factors, hue shift, 4 order keys, blur sigma


@dataclass(frozen=True)
class PhotometricParams:
    """One view: ColorJitter(brightness, contrast, saturation, hue) with probability ``jitter_p``,
    then a Gaussian blur with sigma ~ U[blur_sigma] (always).  Every key must be given, so a params
    section never inherits another view's strengths; :data:`ORIGINAL_VIEW` and :data:`STYLE_VIEW`
    are BlindNet's two views."""

    jitter_p: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    blur_sigma: tuple[float, float]

    def validate(self, where: str) -> None:
        if not 0.0 <= self.jitter_p <= 1.0:
            raise ConfigError(f"params: {where}.jitter_p must be in [0, 1], got {self.jitter_p}")
        for name in ("brightness", "contrast", "saturation"):
            positive(getattr(self, name), f"{where}.{name}", allow_zero=True)
        if not 0.0 <= self.hue <= 0.5:   # hue shifts beyond half a turn are not defined
            raise ConfigError(f"params: {where}.hue must be in [0, 0.5], got {self.hue}")
        if len(self.blur_sigma) != 2 or self.blur_sigma[0] > self.blur_sigma[1] or self.blur_sigma[0] < 0:
            raise ConfigError(f"params: {where}.blur_sigma must be [min, max] with 0 <= min <= max, "
                              f"got {list(self.blur_sigma)}")


# x: RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.5) + blur (``--color_aug 0.5 --gblur``);
# x_a: ColorJitter(0.8, 0.8, 0.8, 0.3) always + blur.  Blur sigma ~ U[0.15, 1.30] in both.
ORIGINAL_VIEW = PhotometricParams(jitter_p=0.5, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                                  blur_sigma=(0.15, 1.3))
STYLE_VIEW = PhotometricParams(jitter_p=1.0, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.3,
                               blur_sigma=(0.15, 1.3))


def photometric_view(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                     params: PhotometricParams, generator: torch.Generator) -> torch.Tensor:
    """The view of a normalised batch (N, 3, H, W), (x - mean)/std with x in [0, 1]: float32,
    normalised the same way, same size and pixel grid.  Runs in float32 even under autocast."""
    n = len(images)
    draws = torch.rand((n, _UNIFORMS), generator=generator, dtype=torch.float64).tolist()
    device = images.device
    with torch.autocast(device.type, enabled=False):
        mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        x = (images.float() * std_t + mean_t).clamp(0.0, 1.0)
        x = torch.stack([_view(x[i], u, params) for i, u in enumerate(draws)])
        return (x - mean_t) / std_t


def _view(image: torch.Tensor, u: list[float], params: PhotometricParams) -> torch.Tensor:
    if u[0] < params.jitter_p:
        factors = [max(0.0, 1.0 - s) + u[1 + k] * (1.0 + s - max(0.0, 1.0 - s))
                   for k, s in enumerate((params.brightness, params.contrast, params.saturation))]
        factors.append(params.hue * (2.0 * u[4] - 1.0))
        strengths = (params.brightness, params.contrast, params.saturation, params.hue)
        for k in sorted(range(4), key=lambda k: u[5 + k]):
            if strengths[k] > 0:
                image = _ADJUST[k](image, factors[k])
    low, high = params.blur_sigma
    return gaussian_blur(image, low + u[9] * (high - low))


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (C, H, W) image: radius int(4 sigma + 0.5), edges replicated,
    as ``scipy.ndimage.gaussian_filter(mode='nearest')`` per channel (skimage's ``gaussian``)."""
    radius = int(4.0 * sigma + 0.5)
    if radius == 0:
        return image
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(image.device, torch.float32)
    channels = image.shape[0]
    x = F.pad(image[None], (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return x[0]
