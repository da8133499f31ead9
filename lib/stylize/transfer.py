"""Image-level style transfer from one style image per content image: FDA, Reinhard, CPSL's Lab transfer.

Every function takes float tensors (B, 3, H, W) of 0..255 RGB values, on any device, and returns
the stylized content in the same form; image b of ``content`` is restyled by image b of ``style``.
:func:`parse_transfer` turns a params string (``fda``, ``fda:<beta>``, ``reinhard``, ``lab``) into
one of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lib.errors import ConfigError

# The window must stay inside the spectrum: b = floor(beta * min(H, W)) <= (min(H, W) - 1) / 2.
MAX_BETA = 0.5
# Reinhard et al. replace log(0) by log(machine epsilon); the CISS code uses numpy's float64 eps.
LOG_EPS = 2.220446049250313e-16
# A flat channel has std 0: standardising it would divide by zero, so it maps onto the style mean.
MIN_STD = 1e-6


def resize_to(style: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, 3, h, w) to ``size`` = (H, W); a no-op when the size already matches."""
    if tuple(style.shape[-2:]) == tuple(size):
        return style
    return F.interpolate(style, size=size, mode="bilinear", align_corners=False)


def fda(content: torch.Tensor, style: torch.Tensor, beta: float) -> torch.Tensor:
    """Fourier Domain Adaptation as CISS applies it (Yang & Soatto 2020, centred-window variant).

    Per image and channel: the centred amplitude spectrum of the content gets the style's
    centred (2b+1) x (2b+1) low-frequency window, b = floor(beta * min(H, W)); the content's phase
    is kept.  The result is the real part of the inverse transform and is NOT clipped to [0, 255].

    Conventions (ours): beta == 0 means no window at all, so the content is returned unchanged;
    any beta > 0 replaces at least the DC bin (b = 0 is a 1x1 window).  A style image of another
    size is first resized to the content's size (bilinear); CISS centre-crops both to one size.
    """
    if not 0 <= beta < MAX_BETA:
        raise ValueError(f"fda: beta must be in [0, {MAX_BETA}), got {beta}")
    if beta == 0:
        return content.clone()
    height, width = content.shape[-2:]
    style = resize_to(style, (height, width))
    b = math.floor(beta * min(height, width))
    # Rows floor(H/2)-b..floor(H/2)+b of the fftshift-ed spectrum are frequencies -b..b, i.e. rows
    # (-b..b) mod H of the plain one: indexing those skips two shifts (slow rolls of complex data).
    frequencies = torch.arange(-b, b + 1, device=content.device)
    rows, cols = (frequencies % height)[:, None], (frequencies % width)[None, :]
    spectrum = torch.fft.fft2(content)
    style_amplitude = torch.fft.fft2(style)[..., rows, cols].abs()
    window = spectrum[..., rows, cols]
    # amplitude from the style, phase (the unit number sgn) from the content; a zero bin has phase 0
    spectrum[..., rows, cols] = torch.where(window == 0, style_amplitude, window.sgn() * style_amplitude)
    return torch.fft.ifft2(spectrum).real


def _channel_mix(matrix: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 colour matrix to every pixel of (B, 3, H, W)."""
    return (matrix.to(images) @ images.flatten(2)).view_as(images)


def _match_moments(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Per image and channel: standardise the content, then give it the style's mean and std.

    Population std (numpy's default, as in the reference implementations).
    """
    c_std, c_mean = torch.std_mean(content, dim=(-2, -1), keepdim=True, correction=0)
    s_std, s_mean = torch.std_mean(style, dim=(-2, -1), keepdim=True, correction=0)
    return (content - c_mean) / c_std.clamp_min(MIN_STD) * s_std + s_mean


# Reinhard et al. 2001: RGB -> LMS, then log LMS -> l alpha beta (Ruderman et al.).
RGB_TO_LMS = torch.tensor([[0.3811, 0.5783, 0.0402],
                           [0.1967, 0.7244, 0.0782],
                           [0.0241, 0.1288, 0.8444]], dtype=torch.float64)
LOG_LMS_TO_LAB = torch.diag(torch.tensor([3, 6, 2], dtype=torch.float64).rsqrt()) @ torch.tensor(
    [[1, 1, 1], [1, 1, -2], [1, -1, 0]], dtype=torch.float64)


def rgb_to_lalphabeta(rgb: torch.Tensor) -> torch.Tensor:
    lms = _channel_mix(RGB_TO_LMS, rgb).clamp_min(LOG_EPS)
    return _channel_mix(LOG_LMS_TO_LAB, lms.log())


def lalphabeta_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`rgb_to_lalphabeta` (matrix inverses computed, not the paper's rounded ones)."""
    lms = _channel_mix(torch.linalg.inv(LOG_LMS_TO_LAB), lab).exp()
    return _channel_mix(torch.linalg.inv(RGB_TO_LMS), lms)


def reinhard(content: torch.Tensor, style: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """Reinhard colour transfer: match per-channel mean and std in l alpha beta space; clipped to [0, 255].

    Applied to true RGB order (our choice; the CISS code feeds BGR arrays to the RGB matrix).
    ``clip=False`` leaves the clipping to the caller (the dataset cache clips and counts).
    """
    matched = _match_moments(rgb_to_lalphabeta(content), rgb_to_lalphabeta(style))
    out = lalphabeta_to_rgb(matched)
    return out.clamp(0, 255) if clip else out


# CIE-Lab of sRGB (IEC 61966-2-1), D65 white, 2 degree observer; the constants scikit-image uses.
SRGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                            [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
D65_WHITE = (0.95047, 1.0, 1.08883)
LAB_DELTA = 6 / 29   # f(t) is a cube root above DELTA**3 and linear below
# (L + 16, a, b) from (f(X/Xn), f(Y/Yn), f(Z/Zn)): L = 116 fy - 16, a = 500 (fx - fy), b = 200 (fy - fz)
F_TO_LAB = torch.tensor([[0, 116, 0], [500, -500, 0], [0, 200, -200]], dtype=torch.float64)


def _srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c > 0.04045, ((c + 0.055) / 1.055).clamp_min(0) ** 2.4, c / 12.92)


def _linear_to_srgb(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c > 0.0031308, 1.055 * c.clamp_min(0.0031308) ** (1 / 2.4) - 0.055, c * 12.92)


def _white(images: torch.Tensor) -> torch.Tensor:
    return torch.tensor(D65_WHITE).to(images).view(1, 3, 1, 1)


def _l_offset(images: torch.Tensor) -> torch.Tensor:
    return torch.tensor([16.0, 0, 0]).to(images).view(1, 3, 1, 1)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """0..255 sRGB (B, 3, H, W) -> CIE-Lab (L in 0..100)."""
    xyz = _channel_mix(SRGB_TO_XYZ, _srgb_to_linear(rgb / 255)) / _white(rgb)
    f = torch.where(xyz > LAB_DELTA ** 3, xyz.clamp_min(LAB_DELTA ** 3) ** (1 / 3),
                    xyz / (3 * LAB_DELTA ** 2) + 4 / 29)
    return _channel_mix(F_TO_LAB, f) - _l_offset(f)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`rgb_to_lab`, 0..255 but not clipped (out-of-gamut colours leave the range)."""
    f = _channel_mix(torch.linalg.inv(F_TO_LAB), lab + _l_offset(lab))
    xyz = torch.where(f > LAB_DELTA, f ** 3, 3 * LAB_DELTA ** 2 * (f - 4 / 29)) * _white(lab)
    return _linear_to_srgb(_channel_mix(torch.linalg.inv(SRGB_TO_XYZ), xyz)) * 255


def lab_transfer(content: torch.Tensor, style: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """CPSL's colour transfer: match per-channel mean and std in CIE-Lab; clipped to [0, 255] unless ``clip=False``."""
    matched = _match_moments(rgb_to_lab(content), rgb_to_lab(style))
    out = lab_to_rgb(matched)
    return out.clamp(0, 255) if clip else out


@dataclass(frozen=True)
class Transfer:
    """A parsed transfer spec: which function, and FDA's beta."""
    kind: Literal["fda", "reinhard", "lab"]
    beta: float | None = None

    def __call__(self, content: torch.Tensor, style: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """``clip`` applies to Reinhard and Lab only: FDA is never clipped."""
        if self.kind == "fda":
            return fda(content, style, self.beta)
        transfer = reinhard if self.kind == "reinhard" else lab_transfer
        return transfer(content, style, clip=clip)

    def describe(self) -> dict:
        return {"transfer": self.kind, **({"beta": self.beta} if self.kind == "fda" else {})}


TRANSFER_FORMS = f"fda, fda:<beta> (0 <= beta < {MAX_BETA}), reinhard or lab"


def parse_transfer(spec, fda_beta: float, where: str) -> Transfer:
    """``fda`` (beta = ``fda_beta``), ``fda:<beta>``, ``reinhard`` or ``lab``; anything else is a ConfigError."""
    if spec in ("reinhard", "lab"):
        return Transfer(spec)
    if isinstance(spec, str) and (spec == "fda" or spec.startswith("fda:")):
        try:
            beta = fda_beta if spec == "fda" else float(spec.removeprefix("fda:"))
        except ValueError:
            beta = math.nan
        if 0 <= beta < MAX_BETA:
            return Transfer("fda", beta)
    raise ConfigError(f"params: {where} = {spec!r} is not a transfer; expected {TRANSFER_FORMS}")
