"""GTAV in the RobustNet / BlindNet split layout.

``root/images/{train,valid,test}/<subfolder>/<frame>.png`` and the same under ``labels/``; labels
are Cityscapes colour PNGs matched by exact RGB (any other colour -> ignore).  'valid' becomes
split 'val'.  Full split: 12,388 train / 6,382 val / 6,181 test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lib.data.classes import CITYSCAPES19
from lib.data.readers.common import (
    LabelFormat,
    RawSample,
    check_choices,
    files,
    pair_label,
    require_dir,
    require_root,
)
from lib.errors import DataError

EXPECT = "images/{train,valid,test}/<subfolder>/*.png and labels/ alike (colour labels)"
FOLDER_OF = {"train": "train", "val": "valid", "test": "test"}


@dataclass(frozen=True)
class Options:
    splits: list[str] = field(default_factory=lambda: ["train", "val"])

    def validate(self, where: str) -> None:
        check_choices(self.splits, FOLDER_OF, f"{where}.splits", "split")


def label_format(opts: Options) -> LabelFormat:
    return LabelFormat("color", CITYSCAPES19, "RGB colour labels in the Cityscapes palette")


def expected_counts(opts: Options) -> dict[str, int]:
    return {s: n for s, n in {"train": 12388, "val": 6382, "test": 6181}.items() if s in opts.splits}


def scan(root: Path, opts: Options) -> list[RawSample]:
    require_root(root, "GTAV split", EXPECT)
    samples = []
    for split in opts.splits:
        folder = require_dir(root / "images" / FOLDER_OF[split], EXPECT)
        images = files(folder, "*/*.png")
        if not images:
            raise DataError(f"{folder}: no images in <subfolder>/*.png (expected {EXPECT})")
        for image in images:
            label = root / "labels" / FOLDER_OF[split] / image.parent.name / image.name
            samples.append(RawSample(image.stem, split, image, pair_label(image, label)))
    return samples
