"""Cityscapes.

``root/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` and
``root/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png`` (label IDs -> train IDs by
the official table).  2,975 train / 500 val / 1,525 test; test labels are withheld (unlabelled).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lib.data.classes import CITYSCAPES19, LABELID_LUT
from lib.data.readers.common import (
    LabelFormat,
    RawSample,
    check_choices,
    files,
    pair_label,
    require_dir,
    require_root,
    strip_suffix,
)
from lib.errors import DataError

EXPECT = "leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_labelIds.png"
SPLITS = {"train": 2975, "val": 500, "test": 1525}
UNLABELLED_SPLITS = {"test"}


@dataclass(frozen=True)
class Options:
    splits: list[str] = field(default_factory=lambda: ["train", "val"])

    def validate(self, where: str) -> None:
        check_choices(self.splits, SPLITS, f"{where}.splits", "split")


def label_format(opts: Options) -> LabelFormat:
    return LabelFormat("ids", CITYSCAPES19, "Cityscapes label IDs 0..33", LABELID_LUT)


def expected_counts(opts: Options) -> dict[str, int]:
    return {s: SPLITS[s] for s in opts.splits}


def scan(root: Path, opts: Options) -> list[RawSample]:
    require_root(root, "Cityscapes", EXPECT)
    samples = []
    for split in opts.splits:
        folder = require_dir(root / "leftImg8bit" / split, EXPECT)
        images = files(folder, "*/*_leftImg8bit.png")
        if not images:
            raise DataError(f"{folder}: no <city>/*_leftImg8bit.png images (expected {EXPECT})")
        for image in images:
            stem = strip_suffix(image.name, "_leftImg8bit.png")
            label = root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelIds.png"
            samples.append(RawSample(stem, split, image,
                                     None if split in UNLABELLED_SPLITS else pair_label(image, label)))
    return samples
