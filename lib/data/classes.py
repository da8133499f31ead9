"""Class tables, defined once for the whole project.

The 19 Cityscapes train classes (names, colours, label-ID -> train-ID map) come from the official
``cityscapesscripts`` table; the SYNTHIA and Mapillary maps follow the released code of BlindNet
(root0yang/BlindNet), the 16-class SYNTHIA protocol that of DADA (valeoai/DADA, by ADVENT's
authors).  Every map is materialised as a 256-entry lookup table so that a conversion is one numpy
indexing operation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CS_LABELS

IGNORE = 255
# A LUT entry that marks a raw value no table knows; converters turn it into a clear error.
UNKNOWN = 254


@dataclass(frozen=True)
class ClassSet:
    """A class protocol: train IDs 0..n-1, in order."""

    name: str
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def palette(self) -> np.ndarray:
        """(256, 3) uint8 colour table; ignore and unknown values are black."""
        table = np.zeros((256, 3), np.uint8)
        table[: self.num_classes] = np.array(self.colors, np.uint8)
        return table


def _cityscapes19() -> ClassSet:
    train = sorted((l for l in _CS_LABELS if 0 <= l.trainId < IGNORE), key=lambda l: l.trainId)
    assert [l.trainId for l in train] == list(range(19)), "cityscapesscripts table changed"
    return ClassSet("cityscapes19", tuple(l.name for l in train), tuple(tuple(l.color) for l in train))


CITYSCAPES19 = _cityscapes19()
CLASS_INDEX = {name: i for i, name in enumerate(CITYSCAPES19.names)}

# SYNTHIA protocols: the 16 classes SYNTHIA shares with Cityscapes (terrain, truck and train dropped,
# train IDs renumbered), and the 13 of mIoU* (wall, fence and pole dropped as well).
_SYNTHIA16_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                    "traffic sign", "vegetation", "sky", "person", "rider", "car", "bus",
                    "motorcycle", "bicycle")
_SYNTHIA13_NAMES = tuple(n for n in _SYNTHIA16_NAMES if n not in ("wall", "fence", "pole"))


def _subset(name: str, names: tuple[str, ...]) -> ClassSet:
    return ClassSet(name, names, tuple(CITYSCAPES19.colors[CLASS_INDEX[n]] for n in names))


SYNTHIA16 = _subset("synthia16", _SYNTHIA16_NAMES)
SYNTHIA13 = _subset("synthia13", _SYNTHIA13_NAMES)
CLASS_SETS = {c.name: c for c in (CITYSCAPES19, SYNTHIA16, SYNTHIA13)}


def lut_from_dict(mapping: dict[int, int], known: range | list[int] | None = None) -> np.ndarray:
    """256-entry uint8 LUT: ``mapping`` values where given, IGNORE for other ``known`` raw values,
    UNKNOWN for everything else (the converter reports those)."""
    lut = np.full(256, UNKNOWN if known is not None else IGNORE, np.uint8)
    if known is not None:
        lut[list(known)] = IGNORE
    for raw, train in mapping.items():
        lut[raw] = train
    return lut


def subset_lut(subset: ClassSet) -> np.ndarray:
    """LUT from 19 Cityscapes train IDs to ``subset``'s train IDs (classes outside it -> IGNORE)."""
    lut = np.full(256, IGNORE, np.uint8)
    for new_id, name in enumerate(subset.names):
        lut[CLASS_INDEX[name]] = new_id
    return lut


# Cityscapes label IDs (also used by GTA5 label PNGs).  Valid raw values are the 34 label IDs
# 0..33; license plate (-1) is stored as 255 in 8-bit PNGs.
CITYSCAPES_LABEL_IDS = [l.id for l in _CS_LABELS if l.id >= 0] + [IGNORE]
CITYSCAPES_ID_TO_TRAIN = {l.id: l.trainId for l in _CS_LABELS if 0 <= l.trainId < IGNORE}
LABELID_LUT = lut_from_dict(CITYSCAPES_ID_TO_TRAIN, CITYSCAPES_LABEL_IDS)
TRAIN_TO_LABELID = {t: i for i, t in CITYSCAPES_ID_TO_TRAIN.items()}

# Labels already in train-ID form (ACDC / Dark Zurich labelTrainIds, BDD100K): identity on 0..18.
TRAINID_LUT = lut_from_dict({c: c for c in range(19)}, list(range(19)) + [IGNORE])

# SYNTHIA-RAND-CITYSCAPES raw IDs (channel 0 of GT/LABELS) -> Cityscapes 19 train IDs.
# 0 void, 13 parking-slot, 14 road-work and 22 lane-marking are ignored.
SYNTHIA_RAW_TO_19 = {1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18,
                     12: 17, 15: 6, 16: 9, 17: 12, 18: 14, 19: 15, 20: 16, 21: 3}
SYNTHIA_RAW_IDS = list(range(23))


def synthia_lut(protocol: ClassSet) -> np.ndarray:
    to_protocol = subset_lut(protocol)
    return lut_from_dict({raw: int(to_protocol[t]) for raw, t in SYNTHIA_RAW_TO_19.items()},
                         SYNTHIA_RAW_IDS)


# Mapillary Vistas v1.2 (66 IDs, 0..65) -> Cityscapes 19 train IDs (the released code,
# root0yang/BlindNet).
MAPILLARY66_TO_19 = {13: 0, 24: 0, 41: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6,
                     50: 7, 30: 8, 29: 9, 27: 10, 19: 11, 20: 12, 21: 12, 22: 12, 55: 13, 61: 14,
                     54: 15, 58: 16, 57: 17, 52: 18}
MAPILLARY_LUT = lut_from_dict(MAPILLARY66_TO_19, list(range(66)))


def color_to_train_ids(rgb: np.ndarray, classes: ClassSet = CITYSCAPES19) -> np.ndarray:
    """Exact RGB match to the class colours (GTAV colour labels); every other colour -> IGNORE."""
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in classes.colors], np.int32)
    order = np.argsort(keys)
    pos = np.clip(np.searchsorted(keys[order], code), 0, len(keys) - 1)
    hit = keys[order][pos] == code
    return np.where(hit, order[pos], IGNORE).astype(np.uint8)


def colorize(train_ids: np.ndarray, classes: ClassSet = CITYSCAPES19) -> np.ndarray:
    """(H, W) train IDs -> (H, W, 3) RGB for panels and plots."""
    return classes.palette()[train_ids]
