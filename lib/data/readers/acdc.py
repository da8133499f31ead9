"""ACDC (Adverse Conditions Dataset with Correspondences).

Native layout: ``root/rgb_anon/<condition>/<split>/<sequence>/<name>_rgb_anon.png`` and
``root/gt/<condition>/<split>/<sequence>/<name>_gt_labelTrainIds.png``.  Flattened layout (CISS
README): ``root/rgb_anon/<split>/<name>_rgb_anon.png`` and ``root/gt/<split>/<name>_gt_labelTrainIds.png``
(conditions mixed; a condition subset needs the native layout).  Test labels are withheld.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
from lib.errors import ConfigError, DataError

CONDITIONS = ("fog", "night", "rain", "snow")
SPLITS = ("train", "val", "test")
EXPECT = ("rgb_anon/<condition>/<split>/<sequence>/*_rgb_anon.png and "
          "gt/<condition>/<split>/<sequence>/*_gt_labelTrainIds.png (or the flattened rgb_anon/<split>/)")


@dataclass(frozen=True)
class Options:
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    layout: Literal["auto", "native", "flat"] = "auto"

    def validate(self, where: str) -> None:
        check_choices(self.conditions, CONDITIONS, f"{where}.conditions", "condition")
        check_choices(self.splits, SPLITS, f"{where}.splits", "split")


def label_format(opts: Options) -> LabelFormat:
    return LabelFormat("ids", CITYSCAPES19, "train IDs 0..18 or 255", TRAINID_LUT)


def expected_counts(opts: Options) -> dict[str, int]:
    per_condition = {"train": 400, "val": {"fog": 100, "night": 106, "rain": 100, "snow": 100}, "test": 500}
    counts = {}
    for s in opts.splits:
        n = per_condition[s]
        counts[s] = sum(n[c] for c in opts.conditions) if isinstance(n, dict) else n * len(opts.conditions)
    return counts


def detect_layout(root: Path) -> str:
    rgb = root / "rgb_anon"
    if any((rgb / c).is_dir() for c in CONDITIONS):
        return "native"
    if any((rgb / s).is_dir() for s in SPLITS):
        return "flat"
    raise DataError(f"{rgb}: neither rgb_anon/<condition>/ nor rgb_anon/<split>/ found (expected {EXPECT})")


def scan(root: Path, opts: Options) -> list[RawSample]:
    require_root(root, "ACDC", EXPECT)
    require_dir(root / "rgb_anon", EXPECT)
    layout = detect_layout(root) if opts.layout == "auto" else opts.layout
    if layout == "flat" and sorted(opts.conditions) != sorted(CONDITIONS):
        raise ConfigError("params: ACDC condition subsets need the native layout "
                          f"(rgb_anon/<condition>/...); {root} is flattened")
    folders = ([(c, s, f"{c}/{s}", "*/*_rgb_anon.png") for c in opts.conditions for s in opts.splits]
               if layout == "native" else [(None, s, s, "*_rgb_anon.png") for s in opts.splits])
    samples = []
    for condition, split, rel, pattern in folders:
        folder = require_dir(root / "rgb_anon" / rel, EXPECT)
        images = files(folder, pattern)
        if not images:
            raise DataError(f"{folder}: no {pattern} images (expected {EXPECT})")
        for image in images:
            stem = strip_suffix(image.name, "_rgb_anon.png")
            sub = image.parent.relative_to(root / "rgb_anon")
            label = root / "gt" / sub / f"{stem}_gt_labelTrainIds.png"
            samples.append(RawSample(stem, split, image,
                                     None if split == "test" else pair_label(image, label)))
    return samples
