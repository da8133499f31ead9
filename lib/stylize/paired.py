"""stylize@<name>: a cached copy of a prepared source restyled by images of another prepared dataset.

Pairing (deterministic): source row i (rows in ``splits`` order, then index order) is restyled by
row ``style_pairing(...)[i]`` of the style split, drawn uniformly with replacement by
``numpy.random.default_rng([seed, *utf8 bytes of the output name])``.  Each output therefore has its
own pairing, independent of batch size, workers and device.
"""
from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lib.config import positive
from lib.data.prepared import PREPARED_ROOT, load_index, resolve
from lib.errors import ConfigError, DataError
from lib.io import read_rgb
from lib.stylize.cache import rows_of_splits, write_prepared_copy
from lib.stylize.transfer import MAX_BETA, Transfer, parse_transfer, resize_to


@dataclass(frozen=True)
class StylizeParams:
    source: str                      # prepared labelled dataset to restyle
    style: str                       # prepared dataset whose images give the style
    outputs: dict[str, str]          # output name -> transfer spec (lib.stylize.transfer.parse_transfer)
    style_split: str = "train"
    splits: list[str] = field(default_factory=lambda: ["train"])
    seed: int = 0
    batch_size: int = 32
    workers: int = 2                 # loader processes; never changes the result
    fda_beta: float = 0.01           # the beta of a plain `fda` spec

    def validate(self, where: str) -> None:
        positive(self.batch_size, f"{where}.batch_size")
        positive(self.workers, f"{where}.workers", allow_zero=True)
        if not 0 <= self.fda_beta < MAX_BETA:
            raise ConfigError(f"params: {where}.fda_beta must be in [0, {MAX_BETA}), got {self.fda_beta}")
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ConfigError(f"params: {where}.splits must be a non-empty list without repeats, got {self.splits}")
        for name, spec in self.outputs.items():
            if name in (self.source, self.style):
                raise ConfigError(f"params: {where}.outputs.{name}: an output cannot replace its own "
                                  f"source or style dataset; pick another name")
            parse_transfer(spec, self.fda_beta, f"{where}.outputs.{name}")

    def transfer(self, name: str) -> Transfer:
        if name not in self.outputs:
            raise ConfigError(f"params: no output '{name}' under 'stylize.outputs' "
                              f"(known: {', '.join(self.outputs) or 'none'})")
        return parse_transfer(self.outputs[name], self.fda_beta, f"stylize.outputs.{name}")


def style_pairing(n_content: int, n_style: int, seed: int, name: str) -> np.ndarray:
    """Style row for each content row: uniform with replacement, seeded by (seed, output name)."""
    return np.random.default_rng([seed, *name.encode()]).integers(0, n_style, n_content)


class PairedStyleRender:
    """The ``render`` of write_prepared_copy: restyle each image by its paired style image.

    Style images are read on the fly (threads: cv2 releases the GIL) and resized to the content's
    size when they differ (bilinear), so a batch stacks.
    """

    def __init__(self, transfer: Transfer, style_path_of: dict[str, Path], device: torch.device,
                 pool: concurrent.futures.Executor):
        self.transfer, self.style_path_of, self.device, self.pool = transfer, style_path_of, device, pool

    def __call__(self, images: torch.Tensor, ids: list[str]) -> torch.Tensor:
        styles = self.pool.map(read_rgb, [self.style_path_of[i] for i in ids])
        style = torch.cat([resize_to(torch.from_numpy(s).to(self.device).permute(2, 0, 1)[None].float(),
                                     tuple(images.shape[-2:])) for s in styles])
        # unclipped: write_prepared_copy clips, and records how much, for every transfer alike
        return self.transfer(images.float(), style, clip=False)


def run_stylize(name: str, params: StylizeParams, out: Path, examples: Path | None, device: torch.device) -> dict:
    """Write the stylized copy ``name`` to ``out`` (a prepared dataset); returns its stats."""
    transfer = params.transfer(name)
    source, style = PREPARED_ROOT / params.source, PREPARED_ROOT / params.style
    rows = rows_of_splits(source, params.splits)
    style_rows = load_index(style, params.style_split)
    if rows["id"].duplicated().any():
        raise DataError(f"{source}: sample ids repeat across splits {params.splits}; cannot pair by id")
    pairs = style_pairing(len(rows), len(style_rows), params.seed, name)
    style_path_of = {i: resolve(p) for i, p in zip(rows["id"], style_rows["image"].iloc[pairs])}
    meta = {**transfer.describe(), "spec": params.outputs[name], "style": params.style,
            "style_split": params.style_split, "seed": params.seed,
            "pairing": "style row i = numpy default_rng([seed, *utf8(output name)]).integers(0, n_style, n)[i]"}
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        render = PairedStyleRender(transfer, style_path_of, device, pool)
        return write_prepared_copy(source, out, render, splits=params.splits, batch_size=params.batch_size,
                                   device=device, desc=f"stylize@{name}", meta=meta, workers=params.workers,
                                   examples=examples)
