"""Converters on tiny fixtures in each real layout: train IDs checked pixel by pixel against the label
maps of the methods' released code."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from PIL import Image, ImageOps

from lib.data import prepared
from lib.data.convert import PrepareParams, _centre_window, parse_dataset_spec, prepare_dataset, tile_centroids
from lib.data.dataset import PreparedDataset
from lib.data.transforms import Normalize
from lib.errors import ConfigError
from lib.io import read_label_png, read_rgb
from tests import layouts as L

PARAMS = PrepareParams(workers=1, centroid_tile=1024)


def run(tmp_path: Path, name: str, spec: dict, params: PrepareParams = PARAMS) -> tuple[pd.DataFrame, dict, Path]:
    out = tmp_path / "prepared" / name
    meta = prepare_dataset(parse_dataset_spec(name, spec), out, params)
    return prepared.load_index(out), meta, out


def assert_labels(index: pd.DataFrame, expected: dict[str, np.ndarray | None]) -> None:
    assert sorted(index["id"]) == sorted(expected)
    for row in index.itertuples():
        if expected[row.id] is None:
            assert row.label == ""
        else:
            np.testing.assert_array_equal(read_label_png(row.label), expected[row.id], err_msg=row.id)


def test_gta5_label_ids_and_split_mat(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "GTA5"
    expected = L.make_gta5(root, rng, n=4, split_mat={"trainIds": [1, 3], "valIds": [2], "testIds": [4]})
    index, meta, out = run(tmp_path, "gta5", {"layout": "gta5", "root": str(root)})
    assert_labels(index, expected)
    assert dict(zip(index["id"], index["split"])) == {"00001": "train", "00002": "val", "00003": "train", "00004": "test"}
    assert meta["counts"] == {"test": 1, "train": 2, "val": 1}
    assert meta["class_protocol"] == "cityscapes19" and meta["layout"] == "gta5"
    assert any("24966" in n for n in meta["count_notes"])
    # image paths point at the raw images (not copied); labels live in the prepared folder
    assert all(Path(p).parent == root / "images" for p in index["image"])
    assert not list(out.glob("**/*.jpg")) and len(list(out.glob("labels/*/*.png"))) == 4
    assert list(index.columns[:4]) == ["id", "split", "image", "label"]


def test_gta5_without_split_mat_is_all_train(tmp_path):
    root = tmp_path / "GTA5"
    L.make_gta5(root, np.random.default_rng(1), n=3)
    index, meta, _ = run(tmp_path, "gta5", {"layout": "gta5", "root": str(root)})
    assert set(index["split"]) == {"train"} and meta["counts"] == {"train": 3}


def test_gtav_split_layout_colour_labels(tmp_path):
    root = tmp_path / "GTAV"
    expected = L.make_gtav_split(root, np.random.default_rng(2), {"train": 2, "valid": 2})
    index, meta, _ = run(tmp_path, "gtav", {"layout": "gtav_split", "root": str(root)})
    assert_labels(index, expected)
    assert meta["counts"] == {"train": 2, "val": 2}


@pytest.mark.parametrize("classes", [19, 16, 13])
def test_synthia_16bit_channel0_protocols(tmp_path, classes):
    root = tmp_path / "SYNTHIA"
    raws = L.make_synthia(root, np.random.default_rng(3), n=10)
    if classes == 19:
        table = L.SPEC_SYNTHIA_TO_19
    elif classes == 16:
        table = L.SPEC_SYNTHIA_TO_16
    else:
        table = {raw: i for i, raw in enumerate(L.SPEC_SYNTHIA_13_ORDER)}
    expected = {k: L.spec_map(v, table) for k, v in raws.items()}
    index, meta, _ = run(tmp_path, f"syn{classes}", {"layout": "synthia", "root": str(root), "classes": classes})
    assert_labels(index, expected)
    assert meta["num_classes"] == classes
    assert meta["counts"] == {"train": 7, "val": 3}  # 70/30 like 6,580 / 2,820


def test_synthia_split_lists_override(tmp_path):
    root = tmp_path / "SYNTHIA"
    L.make_synthia(root, np.random.default_rng(4), n=4)
    (tmp_path / "train.txt").write_text("0000000.png\n0000001.png\n0000002.png\n")
    (tmp_path / "val.txt").write_text("0000003.png\n")
    index, _, _ = run(tmp_path, "syn", {"layout": "synthia", "root": str(root),
                                        "split_lists": {"train": str(tmp_path / "train.txt"),
                                                        "val": str(tmp_path / "val.txt")}})
    assert dict(zip(index["id"], index["split"]))["0000003"] == "val"
    assert (index["split"] == "train").sum() == 3


def test_cityscapes_label_ids(tmp_path):
    root = tmp_path / "cityscapes"
    expected = L.make_cityscapes(root, np.random.default_rng(5), {"train": 3, "val": 2})
    index, meta, _ = run(tmp_path, "cs", {"layout": "cityscapes", "root": str(root)})
    assert_labels(index, expected)
    assert meta["counts"] == {"train": 3, "val": 2}
    assert "aachen_000000_000019" in set(index["id"])


def test_acdc_native_condition_subset_and_unlabelled_test(tmp_path):
    root = tmp_path / "ACDC"
    exp = L.make_acdc_native(root, np.random.default_rng(6), {
        "night": {"train": 2, "val": 1, "test": 1}, "fog": {"train": 2, "val": 1}})
    night = {k: v for k, v in exp.items() if k.startswith("GOPR00")}
    index, meta, _ = run(tmp_path, "acdc_night", {"layout": "acdc", "root": str(root), "conditions": ["night"],
                                                  "splits": ["train", "val", "test"]})
    assert_labels(index, night)
    assert meta["labelled"] == {"test": 0, "train": 2, "val": 1}
    index_all, _, _ = run(tmp_path, "acdc_all", {"layout": "acdc", "root": str(root),
                                                 "conditions": ["night", "fog"]})
    assert len(index_all) == 6


def test_acdc_flat_layout(tmp_path):
    root = tmp_path / "ACDC"
    expected = L.make_acdc_flat(root, np.random.default_rng(7), {"train": 2, "val": 2})
    index, _, _ = run(tmp_path, "acdc", {"layout": "acdc", "root": str(root)})
    assert_labels(index, expected)


def test_dark_zurich(tmp_path):
    root = tmp_path / "DarkZurich"
    expected = L.make_dark_zurich(root, np.random.default_rng(8), {"night": 3, "twilight": 2}, val=2)
    index, meta, _ = run(tmp_path, "dz", {"layout": "dark_zurich", "root": str(root)})
    assert_labels(index, {k: v for k, v in expected.items() if "twilight" not in k})
    assert meta["labelled"] == {"train": 0, "val": 2}
    index2, _, _ = run(tmp_path, "dz2", {"layout": "dark_zurich", "root": str(root), "times": ["night", "twilight"]})
    assert (index2["split"] == "train").sum() == 5


@pytest.mark.parametrize("suffix", ["", "_train_id"])
def test_bdd100k_identity(tmp_path, suffix):
    root = tmp_path / "bdd"
    expected = L.make_bdd100k(root, np.random.default_rng(9), {"train": 2, "val": 2}, suffix)
    index, _, _ = run(tmp_path, "bdd", {"layout": "bdd100k", "root": str(root)})
    assert_labels(index, expected)


@pytest.mark.parametrize("release", ["v1.2", "v2.0"])
def test_mapillary_66_to_19(tmp_path, release):
    root = tmp_path / "mapillary"
    expected = L.make_mapillary(root, np.random.default_rng(10), n=3, release=release)
    index, meta, _ = run(tmp_path, "mv", {"layout": "mapillary", "root": str(root)})
    assert_labels(index, expected)
    assert meta["counts"] == {"val": 3}


def protocol_reference(image: Image.Image, label: np.ndarray, height: int, crop: int):
    """BlindNet's Mapillary protocol (the released code, root0yang/BlindNet) with PIL operations, as
    RobustNet's ResizeHeight + CenterCropPad do it, except the pad (ours: centred, label 255)."""
    w, h = image.size
    width = int(w / h * height)
    image = image.resize((width, height), Image.BICUBIC)
    lab = Image.fromarray(label).resize((width, height), Image.NEAREST)
    if width < crop:
        left = (crop - width) // 2
        border = (left, 0, crop - width - left, 0)
        return (np.asarray(ImageOps.expand(image, border, fill=0)),
                np.asarray(ImageOps.expand(lab, border, fill=255)))
    x1 = int(round((width - crop) / 2.))
    box = (x1, 0, x1 + crop, crop)
    return np.asarray(image.crop(box)), np.asarray(lab.crop(box))


def test_mapillary_evaluation_protocol_resizes_and_centre_crops(tmp_path):
    root = tmp_path / "mapillary"
    # landscape at the protocol height (no resize), portrait (padded), landscape resized up
    sizes = [(12, 20), (14, 8), (10, 25)]
    expected = L.make_mapillary(root, np.random.default_rng(14), sizes=sizes)
    index, meta, out = run(tmp_path, "mv", {"layout": "mapillary", "root": str(root),
                                            "resize_crop": {"height": 12, "crop": 12}})
    assert meta["resize_crop"] == {"height": 12, "crop": 12}
    assert (index["height"] == 12).all() and (index["width"] == 12).all()
    for row in index.itertuples():
        assert Path(row.image) == out / "images" / "val" / f"{row.id}.png"
        raw = Image.open(root / "validation" / "images" / f"{row.id}.jpg").convert("RGB")
        image, label = read_rgb(row.image), read_label_png(row.label)
        ref_image, ref_label = protocol_reference(raw, expected[row.id], 12, 12)
        np.testing.assert_array_equal(image, ref_image, err_msg=row.id)
        np.testing.assert_array_equal(label, ref_label, err_msg=row.id)
    first = index["id"][0]
    # no resize at height 12: columns 4..15 of the 20, offset round(8 / 2)
    np.testing.assert_array_equal(read_label_png(index["label"][0]), expected[first][:, 4:16])
    # the portrait resized to 6 columns sits in the middle, the pad is black and ignored
    pad = read_label_png(index["label"][1])
    assert (pad[:, :3] == 255).all() and (pad[:, 9:] == 255).all() and (pad[:, 3:9] != 255).any()
    assert (read_rgb(index["image"][1])[:, :3] == 0).all()
    counts = prepared.load_class_counts(out, list(index["id"]))
    for row, c in zip(index.itertuples(), counts):
        lab = read_label_png(row.label)
        np.testing.assert_array_equal(c, [(lab == k).sum() for k in range(19)])
    loaded = PreparedDataset(out, "val", Normalize(), seed=0, labelled=True)[0]
    assert loaded["image"].shape == (3, 12, 12) and loaded["label"].shape == (12, 12)


def test_centre_window_rounds_half_to_even_and_pads_in_the_middle():
    assert _centre_window(25, 16) == (slice(4, 20), slice(0, 16))      # round(4.5) = 4, as RobustNet's
    assert _centre_window(27, 16) == (slice(6, 22), slice(0, 16))      # round(5.5) = 6
    assert _centre_window(16, 16) == (slice(0, 16), slice(0, 16))
    assert _centre_window(9, 16) == (slice(0, 9), slice(3, 12))


def test_resize_crop_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="datasets.mv.resize_crop.crop must be > 0"):
        parse_dataset_spec("mv", {"layout": "mapillary", "root": "x", "resize_crop": {"height": 4, "crop": 0}})
    with pytest.raises(ConfigError, match="unknown key 'datasets.mv.resize_crop.width'"):
        parse_dataset_spec("mv", {"layout": "mapillary", "root": "x", "resize_crop": {"height": 4, "width": 4}})


def test_class_counts_and_centroids_tables(tmp_path):
    root = tmp_path / "cityscapes"
    L.make_cityscapes(root, np.random.default_rng(11), {"train": 2})
    index, meta, out = run(tmp_path, "cs", {"layout": "cityscapes", "root": str(root), "splits": ["train"]},
                           PrepareParams(workers=1, centroid_tile=8))
    counts = prepared.load_class_counts(out, list(index["id"]))
    for row, c in zip(index.itertuples(), counts):
        lab = read_label_png(row.label)
        np.testing.assert_array_equal(c, [(lab == k).sum() for k in range(19)])
    cen = prepared.load_centroids(out)
    assert set(cen.columns) == {"id", "class", "cy", "cx"}
    assert sum(meta["pixels_per_class"].values()) == counts.sum()


def test_tile_centroids_brute_force():
    rng = np.random.default_rng(12)
    label = rng.choice([0, 1, 2, 255], size=(20, 30)).astype(np.uint8)
    rows = tile_centroids(label, 19, tile=10)
    expected = []
    for y0 in (0, 10):
        for x0 in (0, 10, 20):
            block = label[y0:y0 + 10, x0:x0 + 10]
            for c in range(19):
                ys, xs = np.nonzero(block == c)
                if len(ys):
                    expected.append((c, y0 + int(ys.mean()), x0 + int(xs.mean())))
    assert rows == expected
    # a side shorter than the tile counts as one tile (our choice for small images)
    assert {r[0] for r in tile_centroids(label, 19, tile=1024)} == {0, 1, 2}


def test_parallel_equals_serial(tmp_path):
    root = tmp_path / "cityscapes"
    L.make_cityscapes(root, np.random.default_rng(13), {"train": 6})
    a, _, out_a = run(tmp_path, "a", {"layout": "cityscapes", "root": str(root), "splits": ["train"]})
    b, _, out_b = run(tmp_path, "b", {"layout": "cityscapes", "root": str(root), "splits": ["train"]}, PrepareParams(workers=2))
    for ra, rb in zip(a.itertuples(), b.itertuples()):
        np.testing.assert_array_equal(read_label_png(ra.label), read_label_png(rb.label))
    assert (out_a / "centroids.csv").read_text() == (out_b / "centroids.csv").read_text()


def test_exif_orientation_is_ignored_as_the_reference_loaders_ignore_it(tmp_path):
    """A JPEG tagged 180° (EXIF Orientation 3): training reads the stored pixel array, as PIL (the
    reference loaders, and prepare's size checks) does; rotating it would turn the image upside down
    against its label."""
    root = tmp_path / "bdd"
    L.make_bdd100k(root, np.random.default_rng(3), {"train": 2}, "")
    image_path = sorted((root / "images/train").glob("*.jpg"))[0]
    stored = np.asarray(Image.open(image_path).convert("RGB"))
    tag = Image.Exif()
    tag[0x0112] = 3
    Image.fromarray(stored).save(image_path, exif=tag, quality=100)
    stored = np.asarray(Image.open(image_path).convert("RGB"))
    assert Image.open(image_path).getexif()[0x0112] == 3
    assert not np.array_equal(stored, np.asarray(ImageOps.exif_transpose(Image.open(image_path)).convert("RGB")))
    np.testing.assert_array_equal(read_rgb(image_path), stored)
    index, _, out = run(tmp_path, "bdd", {"layout": "bdd100k", "root": str(root), "splits": ["train"]})
    data = PreparedDataset(out, "train", transforms=None, seed=0)
    row = index.index[index["image"] == str(image_path)][0]
    np.testing.assert_array_equal(data.load(row)["image"], stored)


def test_macos_appledouble_files_are_not_frames(tmp_path):
    root = tmp_path / "GTA5"
    expected = L.make_gta5(root, np.random.default_rng(5), n=2)
    for folder in ("images", "labels"):
        (root / folder / "._00001.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")
    index, _, _ = run(tmp_path, "gta5", {"layout": "gta5", "root": str(root)})
    assert_labels(index, expected)
