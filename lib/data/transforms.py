"""Joint training transforms on a sample dict, with an explicit random generator.

A sample is a plain dict:
- ``image``: (H, W, 3) uint8 RGB;
- ``label``: (H, W) uint8 train IDs (255 = ignore), absent for unlabelled samples;
- any other numpy array: an extra dense map aligned with the image (pseudo-labels, confidences).
  Its dtype says how it moves: integer maps are label-like (nearest neighbour, padded with 255),
  floating maps are continuous (bilinear, padded with 0); a floating map whose key ends in
  ``_grid`` holds sampling coordinates into another map (lib.pseudo.stream: a soft label kept at
  its stored resolution) and is padded with ``OUTSIDE``, a coordinate that samples nothing;
- crop hints placed by the sampler: ``centroid`` (cy, cx) and ``rare_class`` with ``min_pixels``;
  geometric transforms keep ``centroid`` in the current image's coordinates;
- anything else (ids, ...) passes through untouched.

Every transform is ``t(sample, rng) -> new sample``: it never mutates its input and draws all its
randomness from the ``numpy.random.Generator`` it is given, so one draw's augmentation depends only
on how that generator was seeded (see ``lib.data.dataset``), not on process or call order.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import cv2
import numpy as np
import torch

from lib.data.classes import IGNORE

Sample = dict
Interpolation = Literal["nearest", "bilinear", "bicubic", "area"]

_CV2_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                      "area": cv2.INTER_AREA}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DAFormer's rare-class re-crop gives up after this many crops and keeps the last one.
RECROP_ATTEMPTS = 10
CAT_MAX_REDRAWS = 10     # mmseg RandomCrop: up to 10 crops drawn again, the last one kept
GRID_SUFFIX = "_grid"
OUTSIDE = -3.0           # a grid coordinate beyond [-1, 1]: grid_sample reads zeros there


class Transform(Protocol):
    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample: ...


def _dense_keys(sample: Sample) -> list[str]:
    """Keys of the maps that move with the image (the image itself excluded)."""
    return [k for k, v in sample.items() if k != "image" and isinstance(v, np.ndarray)]


def _is_label_like(array: np.ndarray) -> bool:
    return not np.issubdtype(array.dtype, np.floating)


def _pad_value(key: str, array: np.ndarray) -> float:
    if _is_label_like(array):
        return IGNORE
    return OUTSIDE if key.endswith(GRID_SUFFIX) else 0.0


def _resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel-centre nearest neighbour by indexing: exact for any dtype and channel count."""
    rows = np.minimum(((np.arange(height) + 0.5) * array.shape[0] / height).astype(np.int64),
                      array.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * array.shape[1] / width).astype(np.int64),
                      array.shape[1] - 1)
    return array[rows[:, None], cols[None, :]]


def _resize(array: np.ndarray, height: int, width: int, interpolation: Interpolation) -> np.ndarray:
    if interpolation == "nearest":
        return _resize_nearest(array, height, width)
    out = cv2.resize(array, (width, height), interpolation=_CV2_INTERPOLATION[interpolation])
    # OpenCV drops a trailing channel axis of size 1; keep the caller's layout.
    return out.reshape(height, width, *array.shape[2:])


def _rescale_centroid(centroid: tuple[int, int], old: tuple[int, int],
                      new: tuple[int, int]) -> tuple[int, int]:
    """The pixel of the resized image that nearest-neighbour resizing fills from ``centroid``."""
    return tuple(min(int((c + 0.5) * n / o), n - 1) for c, o, n in zip(centroid, old, new))


def resize_sample(sample: Sample, height: int, width: int, interpolation: Interpolation) -> Sample:
    """Image with ``interpolation``, label-like maps nearest, continuous maps bilinear."""
    old = sample["image"].shape[:2]
    out = dict(sample, image=_resize(sample["image"], height, width, interpolation))
    for key in _dense_keys(sample):
        array = sample[key]
        out[key] = (_resize_nearest(array, height, width) if _is_label_like(array)
                    else _resize(array, height, width, "bilinear"))
    if sample.get("centroid") is not None:
        out["centroid"] = _rescale_centroid(sample["centroid"], old, (height, width))
    return out


class Resize:
    """Resize to a fixed (height, width)."""

    def __init__(self, height: int, width: int, interpolation: Interpolation = "bilinear"):
        self.height, self.width, self.interpolation = height, width, interpolation

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return resize_sample(sample, self.height, self.width, self.interpolation)


class ScaleWidth:
    """Resize to a given width, keeping the aspect ratio (CycleGAN's ``scale_width``, CyCADA)."""

    def __init__(self, width: int, interpolation: Interpolation = "bilinear"):
        self.width, self.interpolation = width, interpolation

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        height, width = sample["image"].shape[:2]
        return resize_sample(sample, max(1, round(height * self.width / width)), self.width, self.interpolation)


class RandomScale:
    """Rescale by s ~ U[min_scale, max_scale] relative to the current size (aspect ratio kept)."""

    def __init__(self, min_scale: float, max_scale: float, interpolation: Interpolation = "bilinear"):
        self.min_scale, self.max_scale, self.interpolation = min_scale, max_scale, interpolation

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        scale = rng.uniform(self.min_scale, self.max_scale)
        height, width = sample["image"].shape[:2]
        return resize_sample(sample, max(1, round(height * scale)), max(1, round(width * scale)),
                             self.interpolation)


def pad_to(sample: Sample, height: int, width: int) -> Sample:
    """Pad symmetrically up to at least (height, width): image 0, label-like maps 255, grids
    ``OUTSIDE``, other maps 0."""
    h, w = sample["image"].shape[:2]
    pad_h, pad_w = max(0, height - h), max(0, width - w)
    if pad_h == 0 and pad_w == 0:
        return sample
    top, left = pad_h // 2, pad_w // 2

    def pad(array: np.ndarray, value: float) -> np.ndarray:
        widths = [(top, pad_h - top), (left, pad_w - left)] + [(0, 0)] * (array.ndim - 2)
        return np.pad(array, widths, constant_values=value)

    out = dict(sample, image=pad(sample["image"], 0))
    for key in _dense_keys(sample):
        out[key] = pad(sample[key], _pad_value(key, sample[key]))
    if sample.get("centroid") is not None:
        cy, cx = sample["centroid"]
        out["centroid"] = (cy + top, cx + left)
    return out


def crop_origin(size: int, crop: int, rng: np.random.Generator, centre: int | None = None) -> int:
    """Crop start along one axis of ``size`` pixels (size >= crop).

    With a ``centre`` (RobustNet class-uniform rule) the start is drawn from U{centre-crop+1 ..
    centre} and then clipped into the image, so the crop always holds ``centre``.  RobustNet draws
    from U{centre-crop .. centre}, whose lowest start misses the centre by one pixel; we exclude it.
    """
    if centre is None:
        return int(rng.integers(0, size - crop + 1))
    start = int(rng.integers(centre - crop + 1, centre + 1))
    return min(max(start, 0), size - crop)


class RandomCrop:
    """Crop (height, width), padding first where the image is smaller.

    Hints on the sample steer the crop: a ``centroid`` makes every crop contain it; a
    ``rare_class`` c re-draws the crop (up to RECROP_ATTEMPTS crops, DAFormer's rare-class
    sampling) until it holds more than ``min_pixels`` labelled pixels of c, else keeps the last.
    With ``cat_max_ratio`` each of those crops is itself mmseg's: redrawn (up to CAT_MAX_REDRAWS
    times) while one class covers that share of its labelled pixels, as DAFormer re-runs the whole
    crop for every rare-class attempt.
    """

    def __init__(self, height: int, width: int, cat_max_ratio: float | None = None):
        self.height, self.width, self.cat_max_ratio = height, width, cat_max_ratio

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        sample = pad_to(sample, self.height, self.width)
        h, w = sample["image"].shape[:2]
        cy, cx = sample.get("centroid") or (None, None)
        recrop = sample.get("rare_class") is not None and "label" in sample
        for _ in range(RECROP_ATTEMPTS if recrop else 1):
            top, left = self._origin(sample, h, w, cy, cx, rng)
            if not recrop or self._rare_pixels(sample, top, left) > sample["min_pixels"]:
                break
        return self._crop(sample, top, left)

    def _origin(self, sample: Sample, h: int, w: int, cy: int | None, cx: int | None,
                rng: np.random.Generator) -> tuple[int, int]:
        """One crop's (top, left), redrawn under ``cat_max_ratio`` (the last draw is kept)."""
        top, left = crop_origin(h, self.height, rng, cy), crop_origin(w, self.width, rng, cx)
        if self.cat_max_ratio is not None and "label" in sample:
            for _ in range(CAT_MAX_REDRAWS):
                if self._balanced(sample["label"][top:top + self.height, left:left + self.width]):
                    break
                top, left = crop_origin(h, self.height, rng, cy), crop_origin(w, self.width, rng, cx)
        return top, left

    def _balanced(self, window: np.ndarray) -> bool:
        """mmseg's ``cat_max_ratio`` rule (DAFormer, CISS: 0.75 on the source): the crop holds at least
        two labelled classes and none covers ``cat_max_ratio`` or more of its labelled pixels."""
        counts = np.bincount(window[window != IGNORE].ravel(), minlength=1)
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def _rare_pixels(self, sample: Sample, top: int, left: int) -> int:
        window = sample["label"][top:top + self.height, left:left + self.width]
        return int(np.count_nonzero(window == sample["rare_class"]))

    def _crop(self, sample: Sample, top: int, left: int) -> Sample:
        out = dict(sample)
        for key in ["image", *_dense_keys(sample)]:
            out[key] = sample[key][top:top + self.height, left:left + self.width]
        if sample.get("centroid") is not None:
            out["centroid"] = (sample["centroid"][0] - top, sample["centroid"][1] - left)
        return out


class HorizontalFlip:
    """Mirror image and maps left-right with probability p."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.p:
            return sample
        out = dict(sample)
        for key in ["image", *_dense_keys(sample)]:
            # contiguous so torch.from_numpy accepts it later
            out[key] = np.ascontiguousarray(sample[key][:, ::-1])
        if sample.get("centroid") is not None:
            cy, cx = sample["centroid"]
            out["centroid"] = (cy, sample["image"].shape[1] - 1 - cx)
        return out


def _grayscale(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma with torchvision's weights, (H, W, 1) so it broadcasts against RGB."""
    return image @ np.array([[0.2989], [0.587], [0.114]], np.float32)


def _blend(image: np.ndarray, other: np.ndarray | float, factor: float) -> np.ndarray:
    return np.clip(factor * image + (1.0 - factor) * other, 0.0, 255.0)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    return _blend(image, 0.0, factor)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    return _blend(image, float(_grayscale(image).mean()), factor)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    return _blend(image, _grayscale(image), factor)


def adjust_hue(image: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue by ``shift`` turns of the colour circle (float32 HSV: hue in degrees)."""
    hsv = cv2.cvtColor(image / 255.0, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0] + 360.0 * shift) % 360.0
    return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0, 0.0, 255.0)


class PhotometricJitter:
    """torchvision ColorJitter, applied with probability p; the image only.

    Factors ~ U[max(0, 1-s), 1+s] for brightness, contrast and saturation, hue shift ~ U[-hue, hue]
    turns, the four in a random order; a zero strength skips its operation.  Works in float32 and
    rounds once at the end (torchvision re-quantises uint8 after every operation).
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                 hue: float = 0.0, p: float = 1.0):
        self.brightness, self.contrast, self.saturation, self.hue, self.p = (
            brightness, contrast, saturation, hue, p)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.p:
            return sample
        ops = [(adjust_brightness, self.brightness), (adjust_contrast, self.contrast),
               (adjust_saturation, self.saturation)]
        draws = [(op, rng.uniform(max(0.0, 1.0 - s), 1.0 + s)) for op, s in ops if s > 0]
        if self.hue > 0:
            draws.append((adjust_hue, rng.uniform(-self.hue, self.hue)))
        image = sample["image"].astype(np.float32)
        for i in rng.permutation(len(draws)):
            op, factor = draws[i]
            image = op(image, factor)
        return dict(sample, image=np.rint(image).astype(np.uint8))


class GaussianBlur:
    """Blur the image with sigma ~ U[sigma_min, sigma_max], with probability p (kernel from sigma)."""

    def __init__(self, sigma_min: float, sigma_max: float, p: float = 1.0):
        self.sigma_min, self.sigma_max, self.p = sigma_min, sigma_max, p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.p:
            return sample
        sigma = rng.uniform(self.sigma_min, self.sigma_max)
        return dict(sample, image=cv2.GaussianBlur(sample["image"], (0, 0), sigmaX=sigma, sigmaY=sigma))


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """Label-like maps -> int64, continuous maps -> float32; channels first for (H, W, K)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    tensor = tensor.long() if _is_label_like(array) else tensor.float()
    return tensor.permute(2, 0, 1).contiguous() if tensor.ndim == 3 else tensor


class Normalize:
    """Final step: image -> float32 CHW, (x/255 - mean)/std; label and maps -> tensors.

    ``mean`` and ``std`` are on the [0, 1] scale (torchvision's ToTensor + Normalize convention).
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image = (sample["image"].astype(np.float32) / 255.0 - self.mean) / self.std
        out = dict(sample, image=torch.from_numpy(image.transpose(2, 0, 1).copy()))
        for key in _dense_keys(sample):
            out[key] = _to_tensor(sample[key])
        return out


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for transform in self.transforms:
            sample = transform(sample, rng)
        return sample
