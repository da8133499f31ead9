import functools
import json
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lib.data.dataset import PreparedDataset, infinite_batches
from lib.data.prepared import load_centroids, load_index
from lib.data.sampling import Draw, centroid_entries, class_uniform_stream, uniform_stream
from lib.data.transforms import (Compose, GaussianBlur, HorizontalFlip, Normalize, PhotometricJitter,
                                 RandomCrop, RandomScale)
from lib.errors import DataError
from lib.io import write_label_png, write_rgb

HEIGHT, WIDTH, NUM_CLASSES = 24, 32, 19


def write_prepared(root: Path, n_train: int = 6, n_unlabelled: int = 2) -> Path:
    """A tiny prepared dataset following lib.data.prepared: raw PNGs referenced by relative path."""
    rng = np.random.default_rng(0)
    prepared = root / "data/prepared/tiny"
    (root / "raw").mkdir(parents=True)
    (prepared / "labels/train").mkdir(parents=True)
    rows, counts, centroids = [], [], []
    for i in range(n_train + n_unlabelled):
        sample_id, split = f"s{i}", "train" if i < n_train else "target"
        image_path = f"raw/{sample_id}.png"
        write_rgb(root / image_path, rng.integers(0, 256, (HEIGHT, WIDTH, 3)).astype(np.uint8))
        label_path = ""
        if split == "train":
            label = np.zeros((HEIGHT, WIDTH), np.uint8)
            label[:, WIDTH // 2:] = 1
            label[2:6, 3:7] = 7 + i % 12  # one small object per image, a class-uniform target
            label_path = f"data/prepared/tiny/labels/train/{sample_id}.png"
            write_label_png(root / label_path, label)
            counts.append([sample_id, *np.bincount(label.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]])
            for c in np.unique(label):
                ys, xs = np.nonzero(label == c)
                centroids.append([sample_id, int(c), int(ys.mean()), int(xs.mean())])
        rows.append([sample_id, split, image_path, label_path, HEIGHT, WIDTH])
    pd.DataFrame(rows, columns=["id", "split", "image", "label", "height", "width"]).to_csv(
        prepared / "index.csv", index=False)
    pd.DataFrame(counts, columns=["id", *map(str, range(NUM_CLASSES))]).to_csv(
        prepared / "class_counts.csv", index=False)
    pd.DataFrame(centroids, columns=["id", "class", "cy", "cx"]).to_csv(
        prepared / "centroids.csv", index=False)
    (prepared / "meta.json").write_text(json.dumps({"class_protocol": "cityscapes19"}))
    return prepared


def training_transforms() -> Compose:
    return Compose([RandomScale(0.75, 1.5), RandomCrop(16, 16), HorizontalFlip(),
                    PhotometricJitter(0.4, 0.4, 0.4, 0.1, p=0.5), GaussianBlur(0.15, 1.3, p=0.5),
                    Normalize()])


@pytest.fixture
def dataset(tmp_path) -> PreparedDataset:
    return PreparedDataset(write_prepared(tmp_path), "train", training_transforms(), seed=11,
                           project_root=tmp_path)


def batches(dataset: PreparedDataset, num_workers: int, count: int, start_draw: int = 0) -> list[dict]:
    stream = functools.partial(uniform_stream, len(dataset), 5)
    return list(islice(infinite_batches(dataset, stream, 2, num_workers, start_draw), count))


def assert_same_batches(left: list[dict], right: list[dict]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys() and a["id"] == b["id"]
        for key in ("image", "label", "draw"):
            assert torch.equal(a[key], b[key]), key


def test_batches_are_stacked_tensors_with_ids(dataset):
    batch = batches(dataset, 0, 1)[0]
    assert set(batch) == {"id", "image", "label", "draw"}
    assert batch["image"].shape == (2, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, 16, 16) and batch["label"].dtype == torch.int64
    assert batch["draw"].tolist() == [0, 1] and len(batch["id"]) == 2


def test_batches_do_not_depend_on_the_number_of_workers(dataset):
    assert_same_batches(batches(dataset, 0, 4), batches(dataset, 2, 4))


def test_resuming_at_a_draw_continues_the_same_stream(dataset):
    fresh = batches(dataset, 0, 5)
    assert_same_batches(batches(dataset, 0, 2, start_draw=3 * 2), fresh[3:])


def test_augmentation_depends_only_on_seed_and_draw_number(dataset):
    first, again, other = dataset[Draw(2, k=9)], dataset[Draw(2, k=9)], dataset[Draw(2, k=10)]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    assert not torch.equal(first["image"], other["image"])
    assert first["id"] == "s2" and first["draw"] == 9


def test_class_uniform_draws_crop_around_their_centroid(tmp_path):
    prepared = write_prepared(tmp_path, n_train=NUM_CLASSES)  # n_c = floor(N / C) = 1 per class
    dataset = PreparedDataset(prepared, "train", Compose([RandomCrop(8, 8), Normalize()]), seed=0,
                              project_root=tmp_path)
    entries = centroid_entries(load_centroids(prepared), dataset.ids, NUM_CLASSES)
    draws = list(islice(class_uniform_stream(len(dataset), entries, 1.0, seed=0), 3 * NUM_CLASSES))
    assert all(d.centroid is not None for d in draws)  # pct = 1: no uniform part
    for draw in draws:
        item = dataset[draw]
        assert "centroid" not in item
        centroid_class = int(dataset.load(draw.index)["label"][draw.centroid])
        assert (item["label"] == centroid_class).any()


def test_unlabelled_rows_have_no_label(tmp_path):
    dataset = PreparedDataset(write_prepared(tmp_path), "target", training_transforms(), seed=0,
                              project_root=tmp_path)
    item = dataset[Draw(0, k=0)]
    assert "label" not in item and item["image"].shape == (3, 16, 16)


def test_unreadable_image_is_a_data_error_naming_the_file(tmp_path):
    prepared = write_prepared(tmp_path)
    (tmp_path / "raw/s1.png").write_bytes(b"not a png")
    dataset = PreparedDataset(prepared, "train", training_transforms(), seed=0, project_root=tmp_path)
    with pytest.raises(DataError, match="s1.png"):
        dataset[Draw(1, k=0)]
    (tmp_path / "raw/s1.png").unlink()
    with pytest.raises(DataError, match="s1.png: file not found"):
        dataset[Draw(1, k=0)]


def test_label_of_another_size_is_a_data_error(tmp_path):
    prepared = write_prepared(tmp_path)
    label_path = tmp_path / load_index(prepared, "train")["label"][0]
    write_label_png(label_path, np.zeros((HEIGHT + 1, WIDTH), np.uint8))
    dataset = PreparedDataset(prepared, "train", training_transforms(), seed=0, project_root=tmp_path)
    with pytest.raises(DataError, match="s0.png: label is 32x25"):
        dataset[0]
