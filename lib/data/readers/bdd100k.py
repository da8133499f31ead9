"""BDD100K 10k semantic-segmentation subset.

``root/images/{train,val}/<name>.jpg`` with ``root/labels/{train,val}/<name>.png`` (BlindNet) or
``<name>_train_id.png`` (CISS); the official archive's ``images/10k/<split>`` and
``labels/sem_seg/masks/<split>`` are found too.  Labels are already train IDs (identity map).
7,000 train / 1,000 val.
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
    require_root,
)
from lib.errors import DataError

EXPECT = "images/{train,val}/<name>.jpg and labels/{train,val}/<name>.png (train IDs)"
SPLITS = {"train": 7000, "val": 1000}
IMAGE_DIRS = ("images/{split}", "images/10k/{split}")
LABEL_DIRS = ("labels/{split}", "labels/sem_seg/masks/{split}")
LABEL_NAMES = ("{stem}.png", "{stem}_train_id.png")


@dataclass(frozen=True)
class Options:
    splits: list[str] = field(default_factory=lambda: ["train", "val"])

    def validate(self, where: str) -> None:
        check_choices(self.splits, SPLITS, f"{where}.splits", "split")


def label_format(opts: Options) -> LabelFormat:
    return LabelFormat("ids", CITYSCAPES19, "train IDs 0..18 or 255", TRAINID_LUT)


def expected_counts(opts: Options) -> dict[str, int]:
    return {s: SPLITS[s] for s in opts.splits}


def _first_dir(root: Path, patterns: tuple[str, ...], split: str) -> Path | None:
    return next((root / p.format(split=split) for p in patterns if (root / p.format(split=split)).is_dir()), None)


def scan(root: Path, opts: Options) -> list[RawSample]:
    require_root(root, "BDD100K", EXPECT)
    samples = []
    for split in opts.splits:
        image_dir, label_dir = _first_dir(root, IMAGE_DIRS, split), _first_dir(root, LABEL_DIRS, split)
        if image_dir is None or label_dir is None:
            raise DataError(f"{root}: images/{split} or labels/{split} folder not found (expected {EXPECT})")
        images = files(image_dir, "*.jpg")
        if not images:
            raise DataError(f"{image_dir}: no .jpg images (expected {EXPECT})")
        for image in images:
            candidates = [label_dir / n.format(stem=image.stem) for n in LABEL_NAMES]
            label = next((c for c in candidates if c.is_file()), None)
            if label is None:
                raise DataError(f"{image}: image without its label (expected {candidates[0]})")
            samples.append(RawSample(image.stem, split, image, label))
    return samples
