"""One reader module per raw dataset layout.

A reader module defines ``Options`` (a dataclass of its params), ``scan(root, options)`` -> list of
:class:`RawSample`, ``label_format(options)`` and ``expected_counts(options)`` (sizes of the full
public dataset, used only to warn about incomplete downloads).  Everything downstream of the
``prepare`` stage sees only prepared datasets.
"""
from __future__ import annotations

from types import ModuleType

from lib.data.readers import (
    acdc,
    bdd100k,
    cityscapes,
    dark_zurich,
    gta5,
    gtav_split,
    mapillary,
    synthia,
)
from lib.data.readers.common import LabelFormat, RawSample

READERS: dict[str, ModuleType] = {
    "gta5": gta5,
    "gtav_split": gtav_split,
    "synthia": synthia,
    "cityscapes": cityscapes,
    "acdc": acdc,
    "dark_zurich": dark_zurich,
    "bdd100k": bdd100k,
    "mapillary": mapillary,
}

__all__ = ["READERS", "LabelFormat", "RawSample"]
