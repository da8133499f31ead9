"""GTA5 in the ADVENT / CPSL layout.

``root/images/00001.png``, ``root/labels/00001.png`` (same names; labels are Cityscapes label IDs,
usually palette PNGs), optional ``root/split.mat`` with 1-based ``trainIds``, ``valIds``,
``testIds``.  Full dataset: 24,966 frames (some downloads hold only 24,941 pairs).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io

from lib.data.classes import CITYSCAPES19, LABELID_LUT
from lib.data.readers.common import (
    LabelFormat,
    RawSample,
    files,
    pair_label,
    require_dir,
    require_root,
)
from lib.errors import DataError

EXPECT = "images/NNNNN.png and labels/NNNNN.png, optional split.mat"
EXPECTED_TOTAL = 24966


@dataclass(frozen=True)
class Options:
    # "auto": use root/split.mat when present; "none": every frame is 'train' (ADVENT and CPSL
    # train on all 24,966 frames); any other value: path of a split.mat file.
    split_mat: str = "auto"


def label_format(opts: Options) -> LabelFormat:
    return LabelFormat("ids", CITYSCAPES19, "Cityscapes label IDs 0..33", LABELID_LUT)


def expected_counts(opts: Options) -> dict[str, int]:
    return {"total": EXPECTED_TOTAL}


def read_split_mat(path: Path) -> dict[int, str]:
    """Frame number -> split, from a GTA5 ``split.mat``."""
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as err:  # scipy raises several types for a corrupt file
        raise DataError(f"{path}: not a readable split.mat ({err})") from None
    keys = {"trainIds": "train", "valIds": "val", "testIds": "test"}
    if not any(k in mat for k in keys):
        raise DataError(f"{path}: expected arrays trainIds / valIds / testIds")
    return {int(frame): split for key, split in keys.items()
            for frame in np.asarray(mat.get(key, [])).reshape(-1)}


def scan(root: Path, opts: Options) -> list[RawSample]:
    require_root(root, "GTA5", EXPECT)
    images = files(require_dir(root / "images", EXPECT), "*.png")
    require_dir(root / "labels", EXPECT)
    if not images:
        raise DataError(f"{root / 'images'}: no PNG images (expected {EXPECT})")
    mat = root / "split.mat" if opts.split_mat == "auto" else Path(opts.split_mat)
    use_mat = opts.split_mat not in ("auto", "none") or mat.is_file()
    if opts.split_mat not in ("auto", "none") and not mat.is_file():
        raise DataError(f"{mat}: split file not found (params split_mat)")
    split_of = read_split_mat(mat) if use_mat else None
    samples = []
    for image in images:
        if split_of is not None:
            if not image.stem.isdigit():
                raise DataError(f"{image}: expected a numbered frame name like 00001.png")
            split = split_of.get(int(image.stem))
            if split is None:
                continue  # not part of any split in split.mat
        else:
            split = "train"
        samples.append(RawSample(image.stem, split, image, pair_label(image, root / "labels" / image.name)))
    return samples
