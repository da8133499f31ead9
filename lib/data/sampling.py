"""Infinite, seeded streams of draw requests over one prepared split.

A stream yields ``Draw``s with consecutive draw numbers k = start, start+1, ...  Every stream is a
pure function of (data, seed, start): draw k is computed from (seed, k) or (seed, epoch of k)
without replaying earlier draws, so a run resumed at draw k sees exactly the draws it would have
seen had it never stopped.

- ``uniform_stream``: a fresh random permutation every epoch.
- ``class_uniform_stream``: RobustNet's class-uniform epochs (the released code, shachoi/RobustNet;
  after Zhu et al., CVPR 2019).
- ``rare_class_stream``: DAFormer's rare-class sampling, RCS (Hoyer et al., CVPR 2022).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count

import numpy as np
import pandas as pd

from lib.errors import ConfigError, DataError

# Mixed into the sampler's seeds so its random numbers never coincide with the per-draw
# augmentation generators default_rng([seed, k]) (SeedSequence pads short entropy with zeros).
_SAMPLER_TAG = 1


@dataclass(frozen=True)
class Draw:
    """One request for a training sample: row ``index`` of the split, as draw number ``k``.

    ``k`` seeds the sample's augmentation.  ``centroid`` (cy, cx, full-image pixels) asks for a
    crop that contains it; ``rare_class`` asks for a crop with more than ``min_pixels`` of it.
    """

    index: int
    k: int
    centroid: tuple[int, int] | None = None
    rare_class: int | None = None
    min_pixels: int = 0


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, _SAMPLER_TAG])


def _epoch_stream(epoch_draws, epoch_length: int, start: int) -> Iterator[Draw]:
    """Draws start, start+1, ... where ``epoch_draws(epoch)`` lists (index, centroid) per epoch."""
    epoch, cached = -1, []
    for k in count(start):
        if k // epoch_length != epoch:
            epoch = k // epoch_length
            cached = epoch_draws(epoch)
        index, centroid = cached[k % epoch_length]
        yield Draw(index=index, k=k, centroid=centroid)


def uniform_stream(n: int, seed: int, start: int = 0) -> Iterator[Draw]:
    """Every epoch of ``n`` draws is a permutation of 0..n-1 seeded by (seed, epoch)."""
    if n <= 0:
        raise DataError("cannot sample from an empty split")
    return _epoch_stream(
        lambda epoch: [(int(i), None) for i in _epoch_rng(seed, epoch).permutation(n)], n, start)


# ----------------------------------------------------------------------------------------------
# Class-uniform sampling (RobustNet)


def class_uniform_counts(n: int, num_classes: int, pct: float) -> tuple[int, int]:
    """(n_c, n_rand): entries per class and uniformly drawn images in an epoch of ``n`` images."""
    if not 0.0 <= pct <= 1.0:
        raise ConfigError(f"class-uniform share {pct} outside [0, 1]")
    per_class = math.floor(pct * n / num_classes)
    return per_class, n - num_classes * per_class


def centroid_entries(centroids: pd.DataFrame, ids: list[str], num_classes: int) -> list[np.ndarray]:
    """Per class, an (M_c, 3) int64 array of (row index in ``ids``, cy, cx).

    Centroid rows of samples outside ``ids`` (other splits) are skipped.
    """
    position = {sample_id: i for i, sample_id in enumerate(ids)}
    rows = centroids[centroids["id"].isin(position)]
    bad = rows[(rows["class"] < 0) | (rows["class"] >= num_classes)]
    if len(bad):
        raise DataError(f"centroids: class {int(bad['class'].iloc[0])} outside 0..{num_classes - 1} "
                        f"(sample {bad['id'].iloc[0]})")
    index = rows["id"].map(position).to_numpy(np.int64)
    table = np.stack([index, rows["cy"].to_numpy(np.int64), rows["cx"].to_numpy(np.int64)], 1)
    classes = rows["class"].to_numpy()
    return [table[classes == c] for c in range(num_classes)]


def class_uniform_epoch(n: int, entries: list[np.ndarray], pct: float,
                        rng: np.random.Generator) -> np.ndarray:
    """One epoch as an (L, 3) array of (index, cy, cx); cy = cx = -1 for the uniform part.

    n_rand images without replacement, plus n_c centroid entries for every class that has any
    (its entries shuffled, then cycled if fewer than n_c), all shuffled together.
    """
    per_class, n_random = class_uniform_counts(n, len(entries), pct)
    parts = [np.stack([rng.choice(n, n_random, replace=False),
                       np.full(n_random, -1), np.full(n_random, -1)], 1)]
    for class_entries in entries:
        if len(class_entries):
            order = rng.permutation(len(class_entries))
            parts.append(class_entries[order[np.arange(per_class) % len(class_entries)]])
    epoch = np.concatenate(parts).astype(np.int64)
    return epoch[rng.permutation(len(epoch))]


def class_uniform_stream(n: int, entries: list[np.ndarray], pct: float, seed: int,
                         start: int = 0) -> Iterator[Draw]:
    """Class-uniform draws over ``n`` images; ``entries`` from ``centroid_entries``.

    Epochs are rebuilt from (seed, epoch); centroid draws carry their centroid.
    """
    if n <= 0:
        raise DataError("cannot sample from an empty split")
    per_class, n_random = class_uniform_counts(n, len(entries), pct)
    epoch_length = n_random + per_class * sum(len(e) > 0 for e in entries)

    def epoch_draws(epoch: int) -> list[tuple[int, tuple[int, int] | None]]:
        table = class_uniform_epoch(n, entries, pct, _epoch_rng(seed, epoch))
        return [(int(i), None if cy < 0 else (int(cy), int(cx))) for i, cy, cx in table]

    return _epoch_stream(epoch_draws, epoch_length, start)


# ----------------------------------------------------------------------------------------------
# Rare-class sampling (DAFormer RCS)


def rcs_class_probabilities(class_counts: np.ndarray, temperature: float, min_pixels: int) -> np.ndarray:
    """P(c) = softmax((1 - f_c) / T) over classes with an image holding > min_pixels of c.

    f_c is class c's share of all labelled pixels; classes with no such image get P = 0, since
    sampling them could never produce the requested crop.
    """
    counts = np.asarray(class_counts, np.float64)
    total = counts.sum()
    if total <= 0:
        raise DataError("rare-class sampling: the class counts hold no labelled pixels")
    eligible = (counts > min_pixels).any(axis=0)
    if not eligible.any():
        raise ConfigError(f"rare-class sampling: no image has more than {min_pixels} pixels of "
                          "any class; lower min_pixels")
    logits = (1.0 - counts.sum(axis=0) / total) / temperature
    weights = np.where(eligible, np.exp(logits - logits[eligible].max()), 0.0)
    return weights / weights.sum()


def rare_class_stream(class_counts: np.ndarray, temperature: float, min_pixels: int,
                      crop_min_pixels: int, seed: int, start: int = 0) -> Iterator[Draw]:
    """Draw k: class c ~ P(c), then uniformly an image with > min_pixels of c (both from (seed, k)).

    ``class_counts`` rows are the split's rows in index order.  The draw asks the crop for more
    than ``crop_min_pixels`` of c (DAFormer: min_pixels * min_crop_ratio).
    """
    counts = np.asarray(class_counts)
    probabilities = rcs_class_probabilities(counts, temperature, min_pixels)
    images_with = [np.flatnonzero(counts[:, c] > min_pixels) for c in range(counts.shape[1])]
    for k in count(start):
        rng = np.random.default_rng([seed, k, _SAMPLER_TAG])
        c = int(rng.choice(len(probabilities), p=probabilities))
        yield Draw(index=int(rng.choice(images_with[c])), k=k, rare_class=c,
                   min_pixels=crop_min_pixels)
