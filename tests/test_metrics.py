"""ConfusionMatrix against brute-force counting, IoU / NaN handling, subsets, and write_report."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.data.classes import CITYSCAPES19, CLASS_INDEX, SYNTHIA13, SYNTHIA16, ClassSet
from lib.infer.metrics import (ConfusionMatrix, class_accuracy, iou, pixel_accuracy,
                                protocol_subsets, summarize)
from lib.infer.report import CELL, confusion_image, write_report


def brute_force(pred: np.ndarray, label: np.ndarray, c: int) -> np.ndarray:
    m = np.zeros((c, c), np.int64)
    for p, g in zip(pred.ravel().tolist(), label.ravel().tolist()):
        if 0 <= g < c:
            m[g, p] += 1
    return m


@st.composite
def batches(draw, max_classes: int = 6):
    c = draw(st.integers(1, max_classes))
    shape = draw(st.sampled_from([(7,), (3, 5), (2, 3, 4), (1, 1, 2, 3)]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dtype = draw(st.sampled_from([np.int64, np.int32, np.int16, np.uint8]))
    pred = rng.integers(0, c, shape).astype(draw(st.sampled_from([np.int64, np.uint8])))
    # labels: valid classes, 255 (ignore) and other out-of-range values (-1, c, 254) to skip
    skipped = [255, 255, c, 254] + ([] if dtype == np.uint8 else [-1])
    label = rng.choice(np.array(list(range(c)) + skipped), shape).astype(dtype)
    return c, pred, label


@settings(max_examples=80, deadline=None)
@given(batches())
def test_confusion_matrix_equals_brute_force(case):
    c, pred, label = case
    cm = ConfusionMatrix(c)
    cm.update(torch.from_numpy(pred), torch.from_numpy(label))
    assert cm.matrix.dtype == torch.int64 and tuple(cm.matrix.shape) == (c, c)
    np.testing.assert_array_equal(cm.numpy(), brute_force(pred, label, c))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.lists(st.integers(1, 30), min_size=1, max_size=5),
       st.integers(0, 2**32 - 1))
def test_several_updates_equal_one_update_of_the_concatenation(c, lengths, seed):
    rng = np.random.default_rng(seed)
    preds = [rng.integers(0, c, n) for n in lengths]
    labels = [rng.choice(np.array(list(range(c)) + [255]), n) for n in lengths]
    split, whole = ConfusionMatrix(c), ConfusionMatrix(c)
    for p, g in zip(preds, labels):
        split.update(torch.from_numpy(p), torch.from_numpy(g))
    whole.update(torch.from_numpy(np.concatenate(preds)), torch.from_numpy(np.concatenate(labels)))
    assert torch.equal(split.matrix, whole.matrix)
    # add() of per-part matrices (the DDP sum) gives the same counts
    summed = ConfusionMatrix(c)
    for p, g in zip(preds, labels):
        part = ConfusionMatrix(c)
        part.update(torch.from_numpy(p), torch.from_numpy(g))
        summed.add(part)
    assert torch.equal(summed.matrix, whole.matrix)
    assert summed.images == split.images == len(lengths)


def test_uint8_labels_and_numpy_inputs_do_not_overflow():
    pred = np.array([[18, 0], [5, 3]], np.uint8)
    label = np.array([[18, 255], [5, 7]], np.uint8)
    cm = ConfusionMatrix(19)
    cm.update(pred, label)
    expected = np.zeros((19, 19), np.int64)
    expected[18, 18] = expected[5, 5] = expected[7, 3] = 1
    np.testing.assert_array_equal(cm.numpy(), expected)


def test_image_count_and_reset():
    cm = ConfusionMatrix(3)
    cm.update(torch.zeros(4, 2, 2, dtype=torch.long), torch.zeros(4, 2, 2, dtype=torch.long))
    cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    assert cm.images == 5 and int(cm.matrix.sum()) == 20
    cm.reset()
    assert cm.images == 0 and int(cm.matrix.sum()) == 0


@pytest.mark.parametrize("bad", [-1, 3, 255])
def test_prediction_out_of_range_is_an_error(bad):
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="predictions must lie"):
        cm.update(torch.tensor([0, bad]), torch.tensor([0, 255]))


def test_shape_and_dtype_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError):
        cm.update(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        cm.add(np.zeros((2, 2), np.int64))


def test_iou_and_miou_by_hand():
    # rows = GT, cols = prediction
    m = np.array([[5, 1, 0],
                  [2, 3, 0],
                  [0, 0, 0]])
    # class 0: tp 5, fp 2, fn 1 -> 5/8; class 1: tp 3, fp 1, fn 2 -> 3/6; class 2 absent -> NaN
    ious = iou(m)
    assert ious[0] == pytest.approx(5 / 8) and ious[1] == pytest.approx(0.5) and math.isnan(ious[2])
    acc = class_accuracy(m)
    assert acc[0] == pytest.approx(5 / 6) and acc[1] == pytest.approx(3 / 5) and math.isnan(acc[2])
    assert pixel_accuracy(m) == pytest.approx(8 / 11)
    s = summarize(m, ["a", "b", "c"])
    assert s["mIoU"] == pytest.approx(100 * (5 / 8 + 0.5) / 2)  # NaN class excluded
    assert s["mAcc"] == pytest.approx(100 * (5 / 6 + 3 / 5) / 2)
    assert s["pixel_acc"] == pytest.approx(100 * 8 / 11)
    assert s["pixels"] == 11
    rows = {r["name"]: r for r in s["classes"]}
    assert rows["a"]["gt_pixels"] == 6 and rows["a"]["pred_pixels"] == 7
    assert math.isnan(rows["c"]["iou"]) and rows["c"]["gt_pixels"] == 0


def test_class_only_predicted_counts_as_zero_not_nan():
    m = np.array([[4, 1], [0, 0]])  # class 1 never in GT but predicted once: IoU 0, acc NaN
    ious = iou(m)
    assert ious[1] == 0.0
    assert math.isnan(class_accuracy(m)[1])
    assert summarize(m, ["a", "b"])["mIoU"] == pytest.approx(100 * (4 / 5 + 0) / 2)


def test_empty_matrix_is_all_nan_without_warnings():
    with np.errstate(all="raise"):
        s = summarize(np.zeros((3, 3), np.int64), ["a", "b", "c"], {"sub": [0, 1]})
    assert all(math.isnan(s[k]) for k in ("mIoU", "mAcc", "pixel_acc", "sub"))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_subsets_come_from_the_same_matrix(seed):
    rng = np.random.default_rng(seed)
    m = rng.integers(0, 50, (19, 19))
    m[rng.integers(0, 19), :] = 0  # a class absent from GT (may still be predicted)
    subsets = protocol_subsets("cityscapes19", synthia_source=True)
    s = summarize(m, CITYSCAPES19.names, subsets)
    ious = iou(m)
    for name, idx in subsets.items():
        assert s[name] == pytest.approx(100 * np.nanmean(ious[idx]))
    per_class = {r["name"]: r["iou"] for r in s["classes"]}
    assert s["mIoU13"] == pytest.approx(np.nanmean([per_class[n] for n in SYNTHIA13.names]))
    assert s["mIoU16"] == pytest.approx(np.nanmean([per_class[n] for n in SYNTHIA16.names]))


def test_protocol_subsets():
    sub19 = protocol_subsets("cityscapes19", synthia_source=True)
    assert [CITYSCAPES19.names[i] for i in sub19["mIoU16"]] == list(SYNTHIA16.names)
    assert [CITYSCAPES19.names[i] for i in sub19["mIoU13"]] == list(SYNTHIA13.names)
    assert not {"terrain", "truck", "train"} & {CITYSCAPES19.names[i] for i in sub19["mIoU16"]}
    assert protocol_subsets("cityscapes19") == {}
    sub16 = protocol_subsets("synthia16")
    assert set(sub16) == {"mIoU13"} and len(sub16["mIoU13"]) == 13
    assert {SYNTHIA16.names[i] for i in range(16)} - {SYNTHIA16.names[i] for i in sub16["mIoU13"]} \
        == {"wall", "fence", "pole"}
    assert protocol_subsets("synthia13") == {}
    assert CLASS_INDEX["road"] in sub19["mIoU13"]


def test_bad_subsets_are_rejected():
    with pytest.raises(ValueError):
        summarize(np.eye(3, dtype=np.int64), ["a", "b", "c"], {"x": [0, 3]})
    with pytest.raises(ValueError):
        summarize(np.eye(3, dtype=np.int64), ["a", "b", "c"], {"mIoU": [0]})
    with pytest.raises(ValueError):
        summarize(np.eye(3, dtype=np.int64), ["a", "b"])


def test_write_report(tmp_path):
    classes = ClassSet("toy3", ("road", "car", "sky"), ((128, 64, 128), (0, 0, 142), (70, 130, 180)))
    cm = ConfusionMatrix(3)
    label = torch.tensor([[[0, 0, 1, 255], [1, 1, 0, 255]]])
    pred = torch.tensor([[[0, 1, 1, 2], [1, 1, 0, 0]]])
    cm.update(pred, label)
    panel = {"id": "city_000001_000019", "image": np.full((2, 4, 3), 100, np.uint8),
             "label": label[0].to(torch.uint8).numpy(), "pred": pred[0].to(torch.uint8).numpy()}
    out_json, out_dir = tmp_path / "metrics" / "eval.json", tmp_path / "eval"
    (out_dir / "stale").mkdir(parents=True)  # the folder is replaced as a whole
    result = write_report(out_json, out_dir, cm, classes, {"mIoU2": [0, 1]}, [panel],
                          {"checkpoint": "model.pt"})
    data = json.loads(out_json.read_text())
    assert data == result
    # road: tp 2 fp 0 fn 1 -> 2/3; car: tp 3 fp 1 fn 0 -> 3/4; sky: predicted only on ignored
    # pixels, so absent from both -> NaN and left out of the mean
    assert data["mIoU"] == round(100 * (2 / 3 + 3 / 4) / 2, 2)
    assert data["mIoU2"] == data["mIoU"]
    assert data["mAcc"] == round(100 * (2 / 3 + 1) / 2, 2)  # sky has no GT: left out
    assert data["pixel_acc"] == round(100 * 5 / 6, 2)
    assert data["images"] == 1 and data["checkpoint"] == "model.pt"
    assert list(data)[:5] == ["mIoU", "mAcc", "pixel_acc", "mIoU2", "images"]
    assert not (out_dir / "stale").exists()
    rows = list(csv.DictReader(open(out_dir / "classes.csv")))
    assert [r["class"] for r in rows] == ["road", "car", "sky"]
    assert float(rows[0]["iou"]) == pytest.approx(100 * 2 / 3, abs=1e-3)
    assert rows[2]["iou"] == rows[2]["acc"] == "" and rows[2]["gt_pixels"] == rows[2]["pred_pixels"] == "0"
    assert (out_dir / "confusion.png").stat().st_size > 0
    import cv2
    img = cv2.imread(str(out_dir / "panels" / "city_000001_000019.png"))[..., ::-1]
    assert img.shape == (2, 3 * 4 + 2 * 4, 3)
    np.testing.assert_array_equal(img[0, 4 + 4 + 3], [0, 0, 0])  # ignore is black
    np.testing.assert_array_equal(img[0, 2 * (4 + 4) + 3], [70, 130, 180])  # predicted sky
    with pytest.raises(ValueError, match="overwrite"):
        write_report(out_json, out_dir, cm, classes, None, [], {"mIoU": 1})


def test_confusion_heatmap_colours_each_ground_truth_row_by_its_share():
    """Cell (g, p) is coloured by counts[g, p] / counts[g].sum(): a diagonal row is dark on the diagonal
    and white elsewhere, an even split halfway between, and a row without ground truth grey."""
    counts = np.zeros((4, 4), np.int64)
    counts[0, 0] = 7                       # all right
    counts[1, 2] = counts[1, 3] = 5        # split between two predictions
    counts[3, 1] = 1                       # row 2 has no ground truth
    image, (x0, y0) = confusion_image(counts, ["road", "sidewalk", "building", "a longer name"])

    def cell(g, p):
        return image[y0 + g * CELL + CELL // 2, x0 + p * CELL + CELL // 2].astype(int)

    low, high = np.array([247, 251, 255]), np.array([8, 48, 107])
    np.testing.assert_array_equal(cell(0, 0), high)
    np.testing.assert_array_equal(cell(0, 1), low)
    np.testing.assert_array_equal(cell(1, 2), np.rint((low + high) / 2))
    np.testing.assert_array_equal(cell(2, 0), [200, 200, 200])
    np.testing.assert_array_equal(cell(3, 1), high)
    assert image.dtype == np.uint8 and image.shape[2] == 3
