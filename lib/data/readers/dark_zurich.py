"""Dark Zurich.

``root/rgb_anon/train/{night,twilight,day}/<sequence>/<name>_rgb_anon.png`` (unlabelled),
``root/rgb_anon/val/night/<sequence>/<name>_rgb_anon.png`` with
``root/gt/val/night/<sequence>/<name>_gt_labelTrainIds.png`` (50 labelled), ``rgb_anon/test/night``
(151, labels withheld).  CISS trains on the night part of train only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lib.data.classes import CITYSCAPES19, TRAINID_LUT
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

TIMES = ("night", "twilight", "day")
SPLITS = ("train", "val", "test")
EXPECT = "rgb_anon/{train,val,test}/<time>/<sequence>/*_rgb_anon.png and gt/val/night/<sequence>/*_gt_labelTrainIds.png"


@dataclass(frozen=True)
class Options:
    times: list[str] = field(default_factory=lambda: ["night"])   # times of day used from train
    splits: list[str] = field(default_factory=lambda: ["train", "val"])

    def validate(self, where: str) -> None:
        check_choices(self.times, TIMES, f"{where}.times", "time of day")
        check_choices(self.splits, SPLITS, f"{where}.splits", "split")


def label_format(opts: Options) -> LabelFormat:
    return LabelFormat("ids", CITYSCAPES19, "train IDs 0..18 or 255", TRAINID_LUT)


def expected_counts(opts: Options) -> dict[str, int]:
    train = {"night": 2416, "twilight": 2920, "day": 3041}
    full = {"train": sum(train[t] for t in opts.times), "val": 50, "test": 151}
    return {s: full[s] for s in opts.splits}


def scan(root: Path, opts: Options) -> list[RawSample]:
    require_root(root, "Dark Zurich", EXPECT)
    samples = []
    for split in opts.splits:
        for time in (opts.times if split == "train" else ["night"]):
            folder = require_dir(root / "rgb_anon" / split / time, EXPECT)
            images = files(folder, "*/*_rgb_anon.png")
            if not images:
                raise DataError(f"{folder}: no <sequence>/*_rgb_anon.png images (expected {EXPECT})")
            for image in images:
                stem = strip_suffix(image.name, "_rgb_anon.png")
                label = root / "gt" / split / time / image.parent.name / f"{stem}_gt_labelTrainIds.png"
                samples.append(RawSample(stem, split, image,
                                         pair_label(image, label) if split == "val" else None))
    return samples
