"""The endless training streams a training stage reads: crops of a prepared split, sampled uniformly,
class-uniformly (RobustNet) or by rare class (DAFormer RCS), resumable at any iteration.

A stream is a factory: called with the iteration to start at, it yields this process's slice of
every global batch from there on (lib.data.dataset.infinite_batches), so a killed run resumes on
exactly the batches it would have seen and N processes read the draws of one process with the
N-times batch.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from torch.utils.data import Dataset

from lib.config import positive, positive_pair
from lib.data.dataset import PreparedDataset, infinite_batches
from lib.data.prepared import (
    PREPARED_ROOT,
    load_centroids,
    load_class_counts,
    load_class_set,
)
from lib.data.sampling import (
    Draw,
    centroid_entries,
    class_uniform_stream,
    rare_class_stream,
    uniform_stream,
)
from lib.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    HorizontalFlip,
    Normalize,
    RandomCrop,
    RandomScale,
    Resize,
    ScaleWidth,
)
from lib.errors import ConfigError

# A stream factory takes the iteration to start at and yields collated batches from there on.
StreamFactory = Callable[[int], Iterator[dict]]

# The mean and std of lib.data.transforms.Normalize ((x/255 - mean)/std): ImageNet's, none ([0, 1],
# CPSL's), [-1, 1] (the CycleGAN input) and Caffe's DeepLab-v2 (x - mean in 0..255 units, no division;
# the RGB order of its BGR mean: lib.models.weights stores that model's first conv for RGB inputs).
CAFFE_MEAN_RGB = (122.67891434, 116.66876762, 104.00698793)
NORMALIZATION = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
                 "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                 "caffe": (tuple(m / 255.0 for m in CAFFE_MEAN_RGB), (1 / 255.0,) * 3)}


@dataclass(frozen=True)
class DataParams:
    batch_size: int = 8
    crop: tuple[int, int] = (96, 192)                 # (height, width) of training crops
    resize: tuple[int, int] | None = None             # (height, width) before cropping; null keeps the size
    scale_width: int | None = None                    # resize to this width, aspect kept (CycleGAN)
    scale: tuple[float, float] | None = None          # random rescale range before cropping
    flip: bool = True
    split: str = "train"
    sampling: Literal["uniform", "class_uniform", "rare_class"] = "uniform"
    class_uniform_pct: float = 0.5                    # RobustNet: share of class-centroid draws
    rcs_temperature: float = 0.01                     # DAFormer RCS
    rcs_min_pixels: int = 3000
    rcs_min_crop_ratio: float = 0.5
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"   # image resizes (ADVENT, BAFFT: PIL bicubic)
    cat_max_ratio: float | None = None                # mmseg: redraw a crop one class dominates (CISS 0.75)
    workers: int = 2

    def validate(self, where: str) -> None:
        positive(self.batch_size, f"{where}.batch_size")
        positive(self.workers, f"{where}.workers", allow_zero=True)
        if self.scale_width is not None:
            positive(self.scale_width, f"{where}.scale_width")
        for name in ("crop", "resize", "scale"):
            positive_pair(getattr(self, name), f"{where}.{name}")
        if self.scale is not None and self.scale[0] > self.scale[1]:
            raise ConfigError(f"params: {where}.scale must be [min, max], got {list(self.scale)}")
        if self.cat_max_ratio is not None and not 0.0 < self.cat_max_ratio <= 1.0:
            raise ConfigError(f"params: {where}.cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")


def train_transforms(data: DataParams, normalize: str) -> Compose:
    steps = []
    if data.resize is not None:
        steps.append(Resize(*data.resize, interpolation=data.interpolation))
    if data.scale_width is not None:
        steps.append(ScaleWidth(data.scale_width, interpolation=data.interpolation))
    if data.scale is not None:
        steps.append(RandomScale(*data.scale, interpolation=data.interpolation))
    steps.append(RandomCrop(*data.crop, cat_max_ratio=data.cat_max_ratio))
    if data.flip:
        steps.append(HorizontalFlip())
    steps.append(Normalize(*NORMALIZATION[normalize]))
    return Compose(steps)


def sampler(prepared: Path, ids: list[str], data: DataParams, seed: int) -> Callable[[int], Iterator[Draw]]:
    """The draw requests of a training stream over the rows ``ids``, from any draw number on."""
    if data.sampling == "uniform":
        return functools.partial(uniform_stream, len(ids), seed)
    if data.sampling == "class_uniform":
        entries = centroid_entries(load_centroids(prepared), ids, load_class_set(prepared).num_classes)
        return functools.partial(class_uniform_stream, len(ids), entries, data.class_uniform_pct, seed)
    counts = load_class_counts(prepared, ids)
    return functools.partial(rare_class_stream, counts, data.rcs_temperature, data.rcs_min_pixels,
                             int(data.rcs_min_pixels * data.rcs_min_crop_ratio), seed)


def batches_from(dataset: Dataset, draws: Callable[[int], Iterator[Draw]], data: DataParams) -> StreamFactory:
    """The factory of a stream; called in the training loop, it gives this process its slice of
    every global batch (lib.train.distributed)."""
    def from_iteration(start_it: int) -> Iterator[dict]:
        import torch.distributed as dist  # the process group the training loop may have joined
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return infinite_batches(dataset, draws, data.batch_size, data.workers,
                                start_draw=start_it * world * data.batch_size, rank=rank, world=world)
    return from_iteration


def training_stream(name: str, data: DataParams, normalize: str, seed: int, labelled: bool) -> StreamFactory:
    """Endless batches of prepared dataset ``name``; the factory takes the iteration to start at."""
    prepared = PREPARED_ROOT / name
    dataset = PreparedDataset(prepared, data.split, train_transforms(data, normalize), seed, labelled=labelled)
    return batches_from(dataset, sampler(prepared, dataset.ids, data, seed), data)


def stream_seed(seed: int, stream: str) -> int:
    """Distinct data seeds per stream, so draw k of source and target never share a crop."""
    return int(np.random.SeedSequence([seed, *stream.encode()]).generate_state(1)[0])
