"""Test-time prediction: whole-image or sliding-window logits, optional flip, weighted ensembles.

``predict_logits`` returns logits at the label size; the argmax is the caller's.  Conventions:

- **Ensemble** (the "single" test mode of ADVENT's released code, valeoai/ADVENT): the weighted *sum*
  of every model's upsampled logits (weights are not normalised; ADVENT's AdvEnt+MinEnt uses 0.5/0.5).
- **Whole**: the image, optionally resized to ``input_size`` first (ADVENT feeds 1024x512 and
  upsamples to 2048x1024), one forward, main logits upsampled to ``out_size`` with
  ``lib.models.output.upsample`` (bilinear, align_corners=True, as ADVENT, CPSL and BlindNet do).
  The input resize is ``resize_mode`` (bilinear by default, bicubic for ADVENT) with
  align_corners=False and antialias=True: the pixel-centre, antialiased convention of PIL's
  ``Image.resize``, applied to the normalised float tensor (normalisation is per-channel affine, so
  this equals resizing the uint8 image up to PIL's rounding and bicubic clamping).
- **Slide** (mmseg ``slide_inference``): windows per axis = ceil((H - win) / stride) + 1, the last
  one clamped to the image edge; each window's logits are upsampled to the window size, summed
  into a canvas and divided by the per-pixel visit count, then upsampled to ``out_size``.  A window
  larger than the (resized) image is shrunk to the image (mmseg crops it the same way; no
  padding).  When a single window covers the whole image this is exactly the whole-image path
  (logits upsampled straight to ``out_size``, no intermediate resampling).
- **Precision**: ``precision="bf16"`` runs the forward passes under bf16 autocast where the device
  computes bf16 natively (lib.device), fp32 otherwise; logits are upsampled, summed and
  returned in float32 either way.
- **Memory layout** (``inference_layout``): evaluation and pseudo-labelling can hold the model in
  channels_last, which changes speed only (oneDNN and cuDNN pick their NHWC kernels).
- **Flip**: the mean of the logits of the image and of its mirror image (mirrored back); in slide
  mode the whole image is mirrored before sliding, as mmseg's flip TTA does.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lib import device as arithmetic
from lib.models.ensemble import Ensemble
from lib.models.output import SegOutput, upsample

MODES = ("whole", "slide")
RESIZE_MODES = ("bilinear", "bicubic")


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window origins along one axis: ceil((size - window) / stride) + 1 of them (1 when the
    window covers the axis), at multiples of ``stride``, the last clamped to ``size - window``."""
    if size < 1 or window < 1 or stride < 1:
        raise ValueError(f"size, window and stride must be >= 1 (got {size}, {window}, {stride})")
    if window >= size:
        return [0]
    count = math.ceil((size - window) / stride) + 1
    return [min(i * stride, size - window) for i in range(count)]


def inference_layout(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """``model`` converted in place to the channels_last memory format when asked (returned for chaining).

    Measured on the synthetic DeepLabV2-R18 (8 images of 128x256, 2 CPU cores): 0.86x the NCHW time
    under bf16 autocast, 0.89x in fp32; the inputs may stay NCHW (0.88x).  Training keeps NCHW on
    CPU, where the backward is slower in channels_last (1.04x); ``train.channels_last`` is CUDA-only.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _pairs(models) -> list[tuple[torch.nn.Module, float]]:
    if isinstance(models, torch.nn.Module):
        models = [(models, 1.0)]
    pairs = []
    for model, weight in models:      # an ensemble artifact runs as its members (lib.models.ensemble)
        members = model.pairs() if isinstance(model, Ensemble) else [(model, 1.0)]
        pairs += [(member, float(weight) * own) for member, own in members]
    if not pairs:
        raise ValueError("predict_logits needs at least one (model, weight) pair")
    for model, _ in pairs:
        if getattr(model, "training", False):
            raise ValueError(f"{type(model).__name__} is in training mode; call model.eval() "
                             "before inference (BatchNorm would use batch statistics)")
    return pairs


def _forward(pairs, x: torch.Tensor, size: tuple[int, int], precision: str) -> torch.Tensor:
    """Weighted sum of each model's main logits, upsampled to ``size`` (float32)."""
    total = None
    for model, weight in pairs:
        with arithmetic.autocast(precision, x.device):
            out = model(x)
        logits = out.logits if isinstance(out, SegOutput) else out
        logits = upsample(logits.float(), size) * weight
        if total is not None and logits.shape != total.shape:
            raise ValueError(f"ensemble members disagree on the logits shape: "
                             f"{tuple(total.shape)} vs {tuple(logits.shape)}")
        total = logits if total is None else total + logits
    return total


def _slide(pairs, x: torch.Tensor, out_size: tuple[int, int], window: tuple[int, int],
           stride: tuple[int, int], precision: str) -> torch.Tensor:
    height, width = x.shape[-2:]
    win_h, win_w = min(window[0], height), min(window[1], width)
    rows = window_starts(height, win_h, stride[0])
    cols = window_starts(width, win_w, stride[1])
    if len(rows) == 1 and len(cols) == 1 and (win_h, win_w) == (height, width):
        return _forward(pairs, x, out_size, precision)
    canvas = None
    visits = torch.zeros(1, 1, height, width, device=x.device)
    for top in rows:
        for left in cols:
            logits = _forward(pairs, x[..., top:top + win_h, left:left + win_w], (win_h, win_w), precision)
            if canvas is None:
                canvas = logits.new_zeros(logits.shape[0], logits.shape[1], height, width)
            canvas[..., top:top + win_h, left:left + win_w] += logits
            visits[..., top:top + win_h, left:left + win_w] += 1
    return upsample(canvas / visits, out_size)


def _pair_arg(value, name: str) -> tuple[int, int]:
    if value is None:
        raise ValueError(f"slide inference needs {name}=(height, width)")
    if isinstance(value, int):
        value = (value, value)
    h, w = (int(v) for v in value)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {tuple(value)}")
    return h, w


@torch.inference_mode()
def predict_logits(models, image: torch.Tensor, out_size: Sequence[int], *, mode: str = "whole",
                   input_size: Sequence[int] | None = None, window: Sequence[int] | None = None,
                   stride: Sequence[int] | None = None, flip: bool = False,
                   resize_mode: str = "bilinear", precision: str = "fp32") -> torch.Tensor:
    """(N, C, out_h, out_w) float32 logits of the weighted ensemble ``models`` for ``image``.

    ``models``: a list of (model, weight) pairs (a bare module means [(module, 1.0)]), all in eval
    mode, each returning a SegOutput (or a logits tensor).  ``image``: the normalised (N, 3, H, W)
    batch on the models' device.  ``input_size`` (h, w) resizes the image before inference (see the
    module docstring).  ``mode="slide"`` needs ``window`` and ``stride`` as (h, w) in the pixels of
    the (resized) input.  ``flip`` averages with the horizontally mirrored prediction.
    ``precision``: ``fp32`` or ``bf16`` (autocast where native, see the module docstring).
    """
    if mode not in MODES:
        raise ValueError(f"inference mode must be one of {MODES}, got '{mode}'")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got '{resize_mode}'")
    if image.dim() != 4:
        raise ValueError(f"image must be a (N, 3, H, W) batch, got shape {tuple(image.shape)}")
    pairs = _pairs(models)
    arithmetic.effective(precision, image.device)      # an unknown precision fails here
    out_size = (int(out_size[0]), int(out_size[1]))
    if mode == "slide":
        window, stride = _pair_arg(window, "window"), _pair_arg(stride, "stride")
    x = image.float()
    if input_size is not None and tuple(int(s) for s in input_size) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(int(input_size[0]), int(input_size[1])), mode=resize_mode,
                          align_corners=False, antialias=True)

    def run(batch: torch.Tensor) -> torch.Tensor:
        if mode == "whole":
            return _forward(pairs, batch, out_size, precision)
        return _slide(pairs, batch, out_size, window, stride, precision)

    logits = run(x)
    if flip:
        logits = 0.5 * (logits + run(x.flip(-1)).flip(-1))
    return logits
