"""Training batches of a pseudo-labelled split: the target stream of a self-training stage.

A soft pseudo-label stays at its stored resolution (the logits' stride) all the way to the loss:
instead of a (C, H, W) float map at the image size (19 x 1024 x 2048 float32 is 159 MB per
Cityscapes frame), the loader hands on the stored map and a two-channel sampling grid that moves
with the image through every geometric transform; the loss reads the map at the grid's positions,
on the device, at the size it needs (:func:`soft_at`).  Sampling once at the transformed position
equals upsampling the map to the image and cropping or flipping it (exactly, up to rounding); under
a rescale it interpolates once where the full-size map would be interpolated twice.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lib.data.dataset import ImagesOnly
from lib.data.prepared import PREPARED_ROOT, require_prepared
from lib.data.sampling import uniform_stream
from lib.data.streams import DataParams, StreamFactory, batches_from, train_transforms
from lib.data.transforms import GRID_SUFFIX, Transform
from lib.errors import ConfigError, DataError
from lib.models.output import upsample
from lib.pseudo.artifact import PseudoLabels

SOFT_GRID = "soft" + GRID_SUFFIX


def _positions(size: int, stored: int, padded: int) -> np.ndarray:
    """grid_sample coordinates (align_corners=True) in a map of ``padded`` cells of the ``size``
    pixels of an image whose map has ``stored`` cells (align_corners upsampling: pixel i sits at
    cell i (stored - 1) / (size - 1))."""
    cells = np.arange(size, dtype=np.float64) * ((stored - 1) / (size - 1) if size > 1 else 0.0)
    return (cells * (2.0 / (padded - 1)) - 1.0 if padded > 1 else np.zeros(size)).astype(np.float32)


def soft_grid(image_size: tuple[int, int], stored: tuple[int, int], padded: tuple[int, int]) -> np.ndarray:
    """(H, W, 2) float32 (x, y) sampling grid of an image of ``image_size`` into its stored soft
    map of ``stored`` cells, zero-padded at the bottom and right to ``padded`` cells."""
    xs = _positions(image_size[1], stored[1], padded[1])
    ys = _positions(image_size[0], stored[0], padded[0])
    grid = np.empty((*image_size, 2), np.float32)
    grid[..., 0], grid[..., 1] = xs[None, :], ys[:, None]
    return grid


def soft_at(soft: torch.Tensor, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The soft labels of a batch at ``size``: the stored maps ``soft`` (N, C, h, w) read bilinearly
    at the batch's grid (N, 2, H, W), itself first brought to ``size`` (align_corners=True, as every
    map of the project is resized).  Positions outside the image (padding) read zeros."""
    grid = grid.float()
    if tuple(grid.shape[-2:]) != tuple(size):
        grid = upsample(grid, size)
    return F.grid_sample(soft.float(), grid.permute(0, 2, 3, 1), mode="bilinear", padding_mode="zeros",
                         align_corners=True)


class PseudoLabelledDataset(ImagesOnly):
    """A prepared split whose items carry pseudo-labels instead of the ground truth.

    ``load(i)`` returns ``id``, ``image`` and
    - for a hard form, ``pseudo`` of ``pseudo.sample(id, threshold)`` (uint8: the transforms move it
      like a label, nearest, padded with 255);
    - for the soft form, ``soft``: the stored map, float16 (C, h, w) zero-padded to the largest
      stored size of the split so that a batch stacks (the transforms leave tensors alone), and
      ``soft_grid``: :func:`soft_grid`, which the transforms move with the image ((2, H, W) after
      Normalize; padded with coordinates that read zeros).
    The dataset's own label is never read.
    """

    def __init__(self, prepared_dir: str | Path, split: str, transforms: Transform, seed: int,
                 pseudo: PseudoLabels, threshold: float | None = None, project_root: str | Path = "."):
        super().__init__(prepared_dir, split, transforms, seed, labelled=False, project_root=project_root)
        missing = [sample_id for sample_id in self.ids if sample_id not in pseudo]
        if missing:
            raise DataError(f"{pseudo.path}: no pseudo-labels for {len(missing)} of the {len(self)} samples "
                            f"of {prepared_dir} split '{split}' (first: {missing[0]})")
        self.pseudo, self.threshold = pseudo, threshold
        self.soft_size = None
        if pseudo.form == "soft":
            if threshold is not None:
                raise ConfigError(f"{pseudo.path}: soft pseudo-labels are probabilities, not thresholded "
                                  f"labels; a load-time pseudo_threshold ({threshold}) has nothing to act on (set it to null)")
            sizes = [pseudo.stored_soft_size(sample_id) for sample_id in self.ids]
            self.soft_size = (max(h for h, _ in sizes), max(w for _, w in sizes))

    def load(self, i: int) -> dict:
        sample = super().load(i)
        if self.soft_size is not None:
            return {**sample, **self._soft(sample["id"], sample["image"].shape[:2])}
        maps = self.pseudo.sample(sample["id"], self.threshold)
        if maps["pseudo"].shape != sample["image"].shape[:2]:
            raise DataError(f"{self.pseudo.path}: pseudo-label of '{sample['id']}' is "
                            f"{maps['pseudo'].shape} but its image is {sample['image'].shape[:2]}")
        return {**sample, **maps}

    def _soft(self, sample_id: str, image_size: tuple[int, int]) -> dict:
        row = self.pseudo.row_of(sample_id)
        if (int(row["height"]), int(row["width"])) != tuple(image_size):
            raise DataError(f"{self.pseudo.path}: pseudo-label of '{sample_id}' was made for a "
                            f"{row['height']}x{row['width']} image but its image is {image_size[0]}x{image_size[1]}")
        stored = self.pseudo.stored_soft(sample_id)
        padded = np.zeros((stored.shape[0], *self.soft_size), stored.dtype)
        padded[:, :stored.shape[1], :stored.shape[2]] = stored
        return {"soft": torch.from_numpy(padded), SOFT_GRID: soft_grid(image_size, stored.shape[1:], self.soft_size)}


def pseudo_stream(dataset_name: str, pseudo: PseudoLabels, threshold: float | None, data: DataParams,
                  normalize: str, seed: int) -> StreamFactory:
    """Endless batches of pseudo-labelled ``dataset_name`` (lib.data.streams'
    machinery: the same transforms, uniform draws, resumable at an iteration).

    ``normalize`` is a key of ``lib.data.streams.NORMALIZATION``; ``threshold`` is applied at load time
    (pass ``pseudo.default_threshold`` for the artifact's own).  Batches hold ``image``, ``id``,
    ``draw`` and for a hard form ``pseudo`` (N, H, W) int64, for the soft form ``soft``
    (N, C, h, w) float16 at the stored size and ``soft_grid`` (N, 2, H, W) (read them with :func:`soft_at`).
    """
    if data.sampling != "uniform":
        raise ConfigError(f"params: pseudo-labelled streams sample uniformly (got sampling '{data.sampling}')")
    if pseudo.meta.get("dataset") != dataset_name:
        raise ConfigError(f"{pseudo.path}: pseudo-labels of dataset '{pseudo.meta.get('dataset')}' "
                          f"cannot label '{dataset_name}'")
    if threshold is not None:
        pseudo.check_threshold(threshold)
    require_prepared(dataset_name)
    dataset = PseudoLabelledDataset(PREPARED_ROOT / dataset_name, data.split,
                                    train_transforms(data, normalize), seed, pseudo, threshold)
    draws = functools.partial(uniform_stream, len(dataset), seed)
    return batches_from(dataset, draws, data)
