"""Training samples from a prepared split, and the endless batch iterator the engine consumes.

Determinism: the augmentation of a draw uses ``numpy.random.default_rng([seed, k])`` where k is
the draw number carried by the ``Draw`` request.  A batch therefore depends only on (seed, the
stream's draws), never on which worker loads it, how many workers there are, or whether the run
was resumed.  Use different seeds for datasets that are drawn side by side (source and target),
or draw k of both would share crops and flips.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lib.data.prepared import load_index, resolve
from lib.data.sampling import Draw
from lib.data.transforms import Transform
from lib.errors import DataError
from lib.io import read_label_png, read_rgb

# Sampler hints consumed by the transforms; they differ between draws, so they never reach a batch.
HINT_KEYS = ("centroid", "rare_class", "min_pixels")
# Keeps worker seeds apart from the augmentation (seed, k) and sampler (seed, epoch, 1) streams.
_WORKER_TAG = 2


class PreparedDataset(Dataset):
    """One split of a prepared dataset, indexed by ``Draw`` (or a plain row number for evaluation).

    An item is the transformed sample without hints, plus ``id`` (str) and ``draw`` (k).
    Unlabelled rows (label '') have no ``label`` key, so a split should be all labelled or all
    unlabelled to collate; ``labelled=True`` makes an unlabelled row an error at construction.  Label and image must have the same size.
    """

    def __init__(self, prepared_dir: str | Path, split: str, transforms: Transform, seed: int,
                 labelled: bool = False, project_root: str | Path = "."):
        self.index = load_index(prepared_dir, split, labelled=labelled)
        self.transforms = transforms
        self.seed = seed
        self.project_root = Path(project_root)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def ids(self) -> list[str]:
        return self.index["id"].tolist()

    def load(self, i: int) -> dict:
        """Row i as read from disk: image, label (if any), id."""
        row = self.index.iloc[i]
        sample = {"id": row["id"], "image": read_rgb(resolve(row["image"], self.project_root))}
        if row["label"]:
            label_path = resolve(row["label"], self.project_root)
            label = read_label_png(label_path)
            if label.shape != sample["image"].shape[:2]:
                raise DataError(f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but its "
                                f"image is {sample['image'].shape[1]}x{sample['image'].shape[0]}")
            sample["label"] = label
        return sample

    def __getitem__(self, draw: Draw | int) -> dict:
        if not isinstance(draw, Draw):
            draw = Draw(index=int(draw), k=int(draw))
        return self.augment(self.load(draw.index), draw)

    def augment(self, sample: dict, draw: Draw) -> dict:
        """A loaded sample as draw k sees it: the draw's crop hints, then the transforms with the
        generator of (seed, k)."""
        sample = dict(sample)
        if draw.centroid is not None:
            sample["centroid"] = draw.centroid
        if draw.rare_class is not None:
            sample["rare_class"], sample["min_pixels"] = draw.rare_class, draw.min_pixels
        sample = self.transforms(sample, np.random.default_rng([self.seed, draw.k]))
        for key in HINT_KEYS:
            sample.pop(key, None)
        sample["draw"] = draw.k
        return sample


class ImagesOnly(PreparedDataset):
    """The images of a prepared split; the ground truth is never read.  Items are
    ``{id, image}`` (transformed) plus ``draw``; the image must have the index's size."""

    def load(self, i: int) -> dict:
        row = self.index.iloc[i]
        path = resolve(row["image"], self.project_root)
        image = read_rgb(path)
        if image.shape[:2] != (row["height"], row["width"]):
            raise DataError(f"{path}: image is {image.shape[1]}x{image.shape[0]} but the index says "
                            f"{row['width']}x{row['height']}")
        return {"id": row["id"], "image": image}


def _seed_worker(seed: int, worker_id: int) -> None:
    """Give each worker distinct, reproducible global RNG states.

    Our transforms never touch global RNGs; this guards any library code that does against the
    forked-workers-share-one-numpy-state bug.
    """
    state = np.random.SeedSequence([seed, worker_id, _WORKER_TAG]).generate_state(2)
    np.random.seed(state[0])
    random.seed(int(state[0]))
    torch.manual_seed(int(state[1]))


def infinite_batches(dataset: PreparedDataset, sampler_stream: Callable[[int], Iterator[Draw]],
                     batch_size: int, num_workers: int, start_draw: int = 0, rank: int = 0,
                     world: int = 1) -> Iterator[dict]:
    """Collated batches forever: batch t holds draws start_draw + t*batch_size ... + batch_size-1.

    ``sampler_stream(start)`` is a stream from ``lib.data.sampling`` bound to its data and seed
    (e.g. ``functools.partial(uniform_stream, len(dataset), seed)``); resume at iteration t with
    ``start_draw = t * batch_size``.  Batches are dicts of stacked tensors, ``id`` a list of str.

    With ``world`` processes (torch.distributed), global batch t holds ``world * batch_size`` draws
    from ``start_draw + t * world * batch_size`` on (resume with ``start_draw = t * world *
    batch_size``) and process ``rank`` takes its slice [rank * batch_size, (rank + 1) * batch_size):
    together the processes read exactly what one process with the global batch reads.
    """
    draws = sampler_stream(start_draw)
    if world > 1:
        draws = _slice_of_every_batch(draws, batch_size, rank, world)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=draws,
        num_workers=num_workers,
        worker_init_fn=functools.partial(_seed_worker, dataset.seed) if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        # its own generator: creating the iterator must not consume the global torch RNG, or a
        # resumed run's dropout would see different random numbers than an uninterrupted one
        generator=torch.Generator().manual_seed(dataset.seed),
    )
    return iter(loader)


def _slice_of_every_batch(draws: Iterator[Draw], batch_size: int, rank: int, world: int) -> Iterator[Draw]:
    """Of every ``world * batch_size`` consecutive draws, the ``rank``-th run of ``batch_size``."""
    for position, draw in enumerate(draws):
        if (position // batch_size) % world == rank:
            yield draw


def inference_loader(dataset: PreparedDataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """One ordered pass over a split for inference (evaluation, pseudo-labelling): batches of
    ``batch_size`` when every image has one size, one image at a time otherwise."""
    uniform = dataset.index[["height", "width"]].drop_duplicates().shape[0] == 1
    return DataLoader(dataset, batch_size=batch_size if uniform else 1, num_workers=num_workers,
                      pin_memory=device.type == "cuda")
