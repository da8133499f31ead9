"""Class tables against the methods' released code and the official cityscapesscripts table."""
from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lib.data import classes as C
from tests import layouts as L


def test_cityscapes19_matches_spec_and_official_table():
    from cityscapesscripts.helpers.labels import trainId2label
    assert C.CITYSCAPES19.num_classes == 19
    assert [trainId2label[i].name for i in range(19)] == list(C.CITYSCAPES19.names)
    for raw in range(256):
        assert C.LABELID_LUT[raw] in (L.SPEC_LABELID_TO_TRAIN.get(raw, 255), C.UNKNOWN)
    assert all(C.LABELID_LUT[raw] == 255 for raw in range(34) if raw not in L.SPEC_LABELID_TO_TRAIN)
    assert C.LABELID_LUT[34] == C.UNKNOWN and C.LABELID_LUT[255] == 255


def test_palette_is_the_gtav_colour_table():
    assert {tuple(c): i for i, c in enumerate(C.CITYSCAPES19.colors)} == L.SPEC_GTAV_COLORS


def test_synthia_and_mapillary_tables():
    lut19, lut16 = C.synthia_lut(C.CITYSCAPES19), C.synthia_lut(C.SYNTHIA16)
    assert {r: int(lut19[r]) for r in range(23)} == L.SPEC_SYNTHIA_TO_19
    assert {r: int(lut16[r]) for r in range(23) if lut16[r] != 255} == L.SPEC_SYNTHIA_TO_16
    lut13 = C.synthia_lut(C.SYNTHIA13)
    assert [int(np.flatnonzero(lut13[:23] == i)[0]) for i in range(13)] == L.SPEC_SYNTHIA_13_ORDER
    assert {r: int(C.MAPILLARY_LUT[r]) for r in range(66) if C.MAPILLARY_LUT[r] != 255} == L.SPEC_MAPILLARY
    assert C.MAPILLARY_LUT[66] == C.UNKNOWN


def test_subset_lut_keeps_names():
    lut = C.subset_lut(C.SYNTHIA13)
    for i19, name in enumerate(C.CITYSCAPES19.names):
        j = lut[i19]
        assert (C.SYNTHIA13.names[j] == name) if j != 255 else name not in C.SYNTHIA13.names


@given(arrays(np.uint8, (6, 7), elements=st.integers(0, 20)))
def test_colour_round_trip(train_ids):
    """colorize then exact colour match returns the train IDs (19, 20 -> ignore)."""
    ids = np.where(train_ids < 19, train_ids, 255).astype(np.uint8)
    np.testing.assert_array_equal(C.color_to_train_ids(C.colorize(ids)), np.where(ids < 19, ids, 255))


@given(arrays(np.uint8, (5, 5, 3)))
def test_off_palette_colours_are_ignored(rgb):
    palette = {tuple(c) for c in C.CITYSCAPES19.colors}
    ids = C.color_to_train_ids(rgb)
    for y, x in np.ndindex(5, 5):
        colour = tuple(int(v) for v in rgb[y, x])
        assert (ids[y, x] == 255) == (colour not in palette)
