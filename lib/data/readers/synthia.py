"""SYNTHIA-RAND-CITYSCAPES.

``root/RGB/0000000.png`` and ``root/GT/LABELS/0000000.png``: the label is channel 0 of a 16-bit
multi-channel PNG (channel 1 holds instance IDs).  9,400 images; BlindNet splits them randomly into
6,580 train / 2,820 val with split lists that are not available to us.  OUR CHOICE: without
``split_lists`` we draw the same 70/30 split with a seeded permutation; give the original lists to
reproduce BlindNet's split exactly.  ``classes`` picks the 19-, 16- or 13-class protocol.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from lib.data.classes import CITYSCAPES19, SYNTHIA13, SYNTHIA16, synthia_lut
from lib.data.readers.common import (
    LabelFormat,
    RawSample,
    files,
    pair_label,
    require_dir,
    require_root,
)
from lib.errors import ConfigError, DataError

EXPECT = "RGB/*.png and GT/LABELS/*.png (16-bit)"
PROTOCOLS = {19: CITYSCAPES19, 16: SYNTHIA16, 13: SYNTHIA13}


@dataclass(frozen=True)
class Options:
    classes: Literal[19, 16, 13] = 19
    val_fraction: float = 0.3          # 2,820 / 9,400
    split_seed: int = 0
    # Optional {split: path of a text file with one image name per line}; overrides the random split.
    split_lists: dict[str, str] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"params: {where}.val_fraction must be in [0, 1), got {self.val_fraction}")


def label_format(opts: Options) -> LabelFormat:
    return LabelFormat("synthia", PROTOCOLS[opts.classes], "SYNTHIA raw IDs 0..22 in channel 0",
                       synthia_lut(PROTOCOLS[opts.classes]))


def expected_counts(opts: Options) -> dict[str, int]:
    return {"total": 9400}


def random_split(names: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """name -> 'train' | 'val', a seeded permutation with round(val_fraction * N) val images."""
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = int(round(val_fraction * len(names)))
    val = {names[i] for i in order[:n_val]}
    return {n: ("val" if n in val else "train") for n in names}


def split_from_lists(lists: dict[str, str]) -> dict[str, str]:
    split_of = {}
    for split, path in lists.items():
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{p}: split list not found (params split_lists.{split})")
        for line in p.read_text().split():
            split_of[Path(line).stem] = split
    return split_of


def scan(root: Path, opts: Options) -> list[RawSample]:
    require_root(root, "SYNTHIA", EXPECT)
    images = files(require_dir(root / "RGB", EXPECT), "*.png")
    require_dir(root / "GT" / "LABELS", EXPECT)
    if not images:
        raise DataError(f"{root / 'RGB'}: no PNG images (expected {EXPECT})")
    names = [p.stem for p in images]
    split_of = (split_from_lists(opts.split_lists) if opts.split_lists
                else random_split(names, opts.val_fraction, opts.split_seed))
    return [RawSample(p.stem, split_of[p.stem], p, pair_label(p, root / "GT" / "LABELS" / p.name))
            for p in images if p.stem in split_of]
