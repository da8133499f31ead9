"""What every raw-layout reader shares: the sample record, the label format, folder checks."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from lib.data.classes import ClassSet
from lib.errors import ConfigError, DataError


@dataclass(frozen=True)
class RawSample:
    """One image of a raw dataset, with its raw label file (None when the split is unlabelled)."""

    id: str
    split: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class LabelFormat:
    """How a layout stores labels.

    kind: ``ids`` (single-channel 8-bit PNG of raw IDs, 'L' or palette 'P'), ``color`` (RGB colour
    PNG matched exactly against the class colours), ``synthia`` (16-bit multi-channel PNG, raw ID
    in channel 0).  ``lut`` maps raw IDs to train IDs (UNKNOWN for IDs the layout does not define).
    """

    kind: Literal["ids", "color", "synthia"]
    classes: ClassSet
    expected: str
    lut: np.ndarray | None = None


def require_root(root: Path, layout: str, expect: str) -> Path:
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found (expected the {layout} layout: {expect})")
    if not any(root.iterdir()):
        raise DataError(f"{root}: dataset folder is empty (expected the {layout} layout: {expect})")
    return root


def require_dir(path: Path, expect: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: folder not found (expected {expect})")
    return path


def files(folder: Path, pattern: str) -> list[Path]:
    """The files of ``folder`` matching ``pattern``, less macOS's AppleDouble companions (``._name``:
    metadata a copy from a Mac leaves beside every file, not images)."""
    return sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("._"))


def strip_suffix(name: str, suffix: str) -> str:
    if not name.endswith(suffix):
        raise DataError(f"{name}: file name does not end with '{suffix}'")
    return name[: -len(suffix)]


def pair_label(image: Path, label: Path, required: bool = True) -> Path | None:
    """The label that belongs to ``image``; a missing one is an error when the split is labelled."""
    if label.is_file():
        return label
    if required:
        raise DataError(f"{image}: image without its label (expected {label})")
    return None


def check_choices(values: list[str], allowed, where: str, what: str) -> None:
    """Params check for option lists such as ``splits`` or ``conditions``."""
    for v in values:
        if v not in allowed:
            raise ConfigError(f"params: {where}: unknown {what} '{v}' (expected {', '.join(allowed)})")
