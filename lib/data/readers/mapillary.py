"""Mapillary Vistas v1.2 (66 classes, IDs 0..65), mapped to the 19 Cityscapes classes.

``root/{training,validation}/images/<name>.jpg`` with ``root/<folder>/labels/<name>.png`` (v1.2
release) or ``root/<folder>/v1.2/labels/<name>.png`` (v2.0 release); labels are palette PNGs whose
indices are class IDs.  18,000 training / 2,000 validation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lib.data.classes import CITYSCAPES19, MAPILLARY_LUT
from lib.data.readers.common import (
    LabelFormat,
    RawSample,
    check_choices,
    files,
    require_dir,
    require_root,
)
from lib.errors import DataError

EXPECT = "{training,validation}/images/*.jpg and {training,validation}/labels/*.png (v1.2 IDs)"
FOLDER_OF = {"train": "training", "val": "validation"}
SPLITS = {"train": 18000, "val": 2000}


@dataclass(frozen=True)
class Options:
    splits: list[str] = field(default_factory=lambda: ["val"])

    def validate(self, where: str) -> None:
        check_choices(self.splits, SPLITS, f"{where}.splits", "split")


def label_format(opts: Options) -> LabelFormat:
    return LabelFormat("ids", CITYSCAPES19, "Mapillary v1.2 IDs 0..65", MAPILLARY_LUT)


def expected_counts(opts: Options) -> dict[str, int]:
    return {s: SPLITS[s] for s in opts.splits}


def scan(root: Path, opts: Options) -> list[RawSample]:
    require_root(root, "Mapillary Vistas", EXPECT)
    samples = []
    for split in opts.splits:
        base = root / FOLDER_OF[split]
        images = files(require_dir(base / "images", EXPECT), "*.jpg")
        if not images:
            raise DataError(f"{base / 'images'}: no .jpg images (expected {EXPECT})")
        label_dir = next((d for d in (base / "labels", base / "v1.2" / "labels") if d.is_dir()), None)
        if label_dir is None:
            raise DataError(f"{base}: labels/ (or v1.2/labels/) folder not found (expected {EXPECT})")
        for image in images:
            label = label_dir / f"{image.stem}.png"
            if not label.is_file():
                raise DataError(f"{image}: image without its label (expected {label})")
            samples.append(RawSample(image.stem, split, image, label))
    return samples
