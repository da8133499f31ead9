"""The embedded synthetic benchmark: deterministic, every class learnable, domains that differ in look more
than in layout, and raw data in exactly the real layouts."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
from PIL import Image

from lib.data.classes import CITYSCAPES19, LABELID_LUT, TRAIN_TO_LABELID
from lib.data.readers import acdc, cityscapes, gta5
from lib.data.synthetic import (DEFAULT_HEIGHT, DEFAULT_WIDTH, DOMAINS, render_scene, scene_seed,
                                write_benchmark)

SCENES = 40
VALID_LABEL_IDS = {0} | set(TRAIN_TO_LABELID.values())
COUNTS = {"source": {"train": 3, "val": 2}, "target": {"train": 4, "val": 2}, "night": {"train": 3, "val": 2}}


@pytest.fixture(scope="module")
def scenes() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """SCENES images and label-ID maps per domain."""
    out = {}
    for domain in DOMAINS:
        pairs = [render_scene(seed, domain) for seed in range(SCENES)]
        out[domain] = (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
    return out


def class_shares(label_ids: np.ndarray) -> np.ndarray:
    train_ids = LABELID_LUT[label_ids]
    counts = np.bincount(train_ids.ravel(), minlength=256)[:19]
    return counts / train_ids.size


def saturation(rgb: np.ndarray) -> float:
    rgb = rgb.astype(np.float32)
    high, low = rgb.max(-1), rgb.min(-1)
    return float(((high - low) / np.maximum(high, 1)).mean())


@pytest.mark.parametrize("domain", DOMAINS)
def test_render_is_deterministic_in_seed_and_domain(domain):
    rgb, label = render_scene(7, domain)
    again_rgb, again_label = render_scene(7, domain)
    assert rgb.shape == (DEFAULT_HEIGHT, DEFAULT_WIDTH, 3) and rgb.dtype == np.uint8
    assert label.shape == (DEFAULT_HEIGHT, DEFAULT_WIDTH) and label.dtype == np.uint8
    np.testing.assert_array_equal(rgb, again_rgb)
    np.testing.assert_array_equal(label, again_label)
    assert not np.array_equal(label, render_scene(8, domain)[1])


def test_render_honours_the_requested_size():
    rgb, label = render_scene(0, "target", 96, 160)
    assert rgb.shape == (96, 160, 3) and label.shape == (96, 160)


def test_unknown_domain_is_refused():
    with pytest.raises(ValueError, match="domain"):
        render_scene(0, "fog")


@pytest.mark.parametrize("domain", DOMAINS)
def test_labels_are_cityscapes_label_ids(scenes, domain):
    _, labels = scenes[domain]
    assert set(np.unique(labels).tolist()) <= VALID_LABEL_IDS
    unlabelled = float((labels == 0).mean())
    assert unlabelled < 0.05, "label 0 (the ego bonnet) must stay a thin band"


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_class_is_big_enough_to_learn(scenes, domain):
    shares = class_shares(scenes[domain][1])
    small = {name: round(100 * float(s), 3) for name, s in zip(CITYSCAPES19.names, shares) if s < 0.001}
    assert not small, f"classes under 0.1% of the {domain} pixels: {small}"


def test_class_frequencies_shift_modestly(scenes):
    source, target = class_shares(scenes["source"][1]), class_shares(scenes["target"][1])
    total_variation = 0.5 * float(np.abs(source / source.sum() - target / target.sum()).sum())
    assert 0.03 < total_variation < 0.25
    names = list(CITYSCAPES19.names)
    assert target[names.index("vegetation")] > source[names.index("vegetation")]

    def scenes_with(domain, name):
        return int((scenes[domain][1] == TRAIN_TO_LABELID[names.index(name)]).any((1, 2)).sum())

    for more in ("person", "bicycle"):
        assert scenes_with("target", more) > scenes_with("source", more)
    assert scenes_with("target", "truck") < scenes_with("source", "truck")


def test_domains_differ_in_appearance(scenes):
    source, target, night = (scenes[d][0] for d in DOMAINS)
    assert saturation(source) > 1.5 * saturation(target)
    assert source.mean() > target.mean() > night.mean()
    assert night.mean() > 30, "night must stay learnable, not black"


def class_mean_lab(rgb: np.ndarray, label_ids: np.ndarray) -> np.ndarray:
    """(19, 3) mean CIELAB colour of each class."""
    lab = np.stack([cv2.cvtColor(image, cv2.COLOR_RGB2LAB) for image in rgb]).reshape(-1, 3).astype(float)
    train_ids = LABELID_LUT[label_ids].ravel()
    labelled = train_ids < 19
    sums = np.zeros((19, 3))
    np.add.at(sums, train_ids[labelled], lab[labelled])
    return sums / np.bincount(train_ids[labelled], minlength=19)[:, None]


def test_no_global_colour_map_undoes_the_class_shifts(scenes):
    """The best per-channel affine colour map (all a global transfer like Reinhard can do) from source to
    target class colours leaves most of the differences between target classes unexplained."""
    source, target = class_mean_lab(*scenes["source"]), class_mean_lab(*scenes["target"])
    for channel in range(3):
        design = np.stack([source[:, channel], np.ones(19)], 1)
        fit, *_ = np.linalg.lstsq(design, target[:, channel], rcond=None)
        residual = target[:, channel] - design @ fit
        assert residual.std() > 0.5 * target[:, channel].std(), f"LAB channel {channel} is a global map"


def read(path: Path) -> tuple[str, np.ndarray]:
    with Image.open(path) as image:
        return image.mode, np.asarray(image)


def relative_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def expected_files() -> set[str]:
    gta5_frames = [f"{n:05d}.png" for n in range(1, 6)]
    files = {f"gta5/{folder}/{name}" for folder in ("images", "labels") for name in gta5_frames}
    files.add("gta5/split.mat")
    cities = {"train": ["arnsfeld_000000", "brelingen_000000", "corvenstadt_000000", "arnsfeld_000001"],
              "val": ["dornhagen_000000", "elmsrode_000000"]}
    for split, stems in cities.items():
        for stem in stems:
            city = stem.split("_")[0]
            files.add(f"cityscapes/leftImg8bit/{split}/{city}/{stem}_000019_leftImg8bit.png")
            files.add(f"cityscapes/gtFine/{split}/{city}/{stem}_000019_gtFine_labelIds.png")
    sequences = {"train": ["GOPR0417_frame_000000", "GOPR0423_frame_000000", "GOPR0431_frame_000000"],
                 "val": ["GOPR0502_frame_000000", "GOPR0517_frame_000000"]}
    for split, stems in sequences.items():
        for stem in stems:
            seq = stem.split("_")[0]
            files.add(f"acdc/rgb_anon/night/{split}/{seq}/{stem}_rgb_anon.png")
            files.add(f"acdc/gt/night/{split}/{seq}/{stem}_gt_labelTrainIds.png")
    return files


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_benchmark(root, 64, 128, COUNTS, seed=3, workers=1, progress=False)
    return root


def test_write_benchmark_writes_exactly_the_real_layouts(benchmark):
    assert relative_files(benchmark) == expected_files()
    split = scipy.io.loadmat(str(benchmark / "gta5/split.mat"))
    assert split["trainIds"].ravel().tolist() == [1, 2, 3]
    assert split["valIds"].ravel().tolist() == [4, 5]
    assert split["testIds"].size == 0


def test_written_labels_use_each_layouts_format(benchmark):
    mode, ids = read(benchmark / "gta5/labels/00001.png")
    assert mode == "P" and set(np.unique(ids).tolist()) <= VALID_LABEL_IDS
    with Image.open(benchmark / "gta5/labels/00001.png") as image:
        palette = np.array(image.getpalette()[:768]).reshape(256, 3)
    assert tuple(palette[TRAIN_TO_LABELID[0]]) == CITYSCAPES19.colors[0]  # road in the Cityscapes colour
    mode, ids = read(benchmark / "cityscapes/gtFine/val/dornhagen"
                     / "dornhagen_000000_000019_gtFine_labelIds.png")
    assert mode == "L" and set(np.unique(ids).tolist()) <= VALID_LABEL_IDS
    mode, ids = read(benchmark / "acdc/gt/night/val/GOPR0502/GOPR0502_frame_000000_gt_labelTrainIds.png")
    assert mode == "L" and set(np.unique(ids).tolist()) <= set(range(19)) | {255}
    mode, rgb = read(benchmark / "acdc/rgb_anon/night/val/GOPR0502/GOPR0502_frame_000000_rgb_anon.png")
    assert mode == "RGB" and rgb.shape == (64, 128, 3)


@pytest.mark.parametrize("domain, split, index, label_file, to_stored", [
    ("source", "val", 0, "gta5/labels/00004.png", lambda ids: ids),
    ("target", "train", 3, "cityscapes/gtFine/train/arnsfeld/arnsfeld_000001_000019_gtFine_labelIds.png",
     lambda ids: ids),
    ("night", "val", 1, "acdc/gt/night/val/GOPR0517/GOPR0517_frame_000000_gt_labelTrainIds.png",
     lambda ids: LABELID_LUT[ids]),
])
def test_written_label_is_the_rendered_scene(benchmark, domain, split, index, label_file, to_stored):
    _, rendered = render_scene(scene_seed(3, split, index), domain, 64, 128)
    _, written = read(benchmark / label_file)
    np.testing.assert_array_equal(written, to_stored(rendered))


def test_the_real_readers_read_the_benchmark(benchmark):
    gta = gta5.scan(benchmark / "gta5", gta5.Options())
    assert [(s.id, s.split) for s in gta] == [("00001", "train"), ("00002", "train"), ("00003", "train"),
                                              ("00004", "val"), ("00005", "val")]
    city = cityscapes.scan(benchmark / "cityscapes", cityscapes.Options())
    assert sorted(s.split for s in city) == ["train"] * 4 + ["val"] * 2
    night = acdc.scan(benchmark / "acdc", acdc.Options(conditions=["night"]))
    assert sorted(s.split for s in night) == ["train"] * 3 + ["val"] * 2


def test_write_benchmark_does_not_depend_on_workers(benchmark, tmp_path):
    write_benchmark(tmp_path, 64, 128, COUNTS, seed=3, workers=2, progress=False)
    for name in expected_files():
        assert (tmp_path / name).read_bytes() == (benchmark / name).read_bytes(), name


def test_write_benchmark_refuses_unknown_domains(tmp_path):
    with pytest.raises(ValueError, match="domains"):
        write_benchmark(tmp_path, 64, 128, {"fog": {"train": 1}}, seed=0, progress=False)
