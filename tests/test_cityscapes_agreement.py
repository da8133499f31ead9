"""Our mIoU and per-class IoU equal the official cityscapesscripts evaluator's on a Cityscapes-layout set.

Ground truth: ``*_gtFine_labelIds.png`` built from the synthetic scene generator plus patches of
every one of the 34 label IDs (so the ignored ones too).  Predictions: the train-ID ground truth,
corrupted, exported with ``export_label_ids``.  Our side converts GT label IDs with
``LABELID_LUT`` and counts with ``ConfusionMatrix``; theirs is ``evaluateImgLists``.
"""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lib.data.classes import CITYSCAPES19, LABELID_LUT, TRAIN_TO_LABELID
from lib.data.synthetic import render_scene
from lib.infer.metrics import ConfusionMatrix, summarize
from lib.infer.report import export_label_ids
from tests.layouts import save_gray

cs_eval = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")

H, W = 64, 128
CITY = "frankfurt"


def ground_truth(seed: int, rng: np.random.Generator, all_ids: bool) -> np.ndarray:
    _, label_ids = render_scene(seed, "target", H, W)
    label_ids = label_ids.copy()
    if all_ids:  # a small patch of each of the 34 label IDs, ignored ones included
        for raw in range(34):
            y, x = rng.integers(0, H - 4), rng.integers(0, W - 4)
            label_ids[y:y + 4, x:x + 4] = raw
    return label_ids


def corrupt(train_ids: np.ndarray, rng: np.random.Generator, never: set[int]) -> np.ndarray:
    """An imperfect prediction: GT where labelled, random elsewhere, 25% random noise, a shifted
    band; never predicts the classes in ``never``."""
    allowed = np.array([c for c in range(19) if c not in never])
    pred = np.where(train_ids == 255, rng.choice(allowed, train_ids.shape), train_ids)
    noise = rng.random(pred.shape) < 0.25
    pred[noise] = rng.choice(allowed, int(noise.sum()))
    pred[:, 40:80] = np.roll(pred[:, 40:80], 5, axis=0)
    pred[np.isin(pred, list(never))] = allowed[0]
    return pred.astype(np.uint8)


def official(pred_files: list[str], gt_files: list[str], export: str) -> dict:
    args = copy.copy(cs_eval.args)  # the module's defaults, without mutating its global
    args.evalInstLevelScore = False  # would need *_instanceIds.png
    args.evalPixelAccuracy = False
    args.quiet = True
    args.JSONOutput = True
    args.exportFile = export
    args.predictionPath, args.predictionWalk = None, None
    result = cs_eval.evaluateImgLists(pred_files, gt_files, args)
    assert json.loads(open(export).read())["averageScoreClasses"] == pytest.approx(
        result["averageScoreClasses"], nan_ok=True)
    return result


@pytest.mark.parametrize("scenario", ["all_ids", "absent_classes"])
def test_miou_agrees_with_cityscapesscripts(tmp_path, scenario):
    rng = np.random.default_rng(7)
    # absent_classes: some classes never in GT (and one of them never predicted -> NaN IoU in
    # both evaluators; the others only predicted -> IoU 0)
    never_predicted = {16} if scenario == "absent_classes" else set()
    gt_files, pred_files = [], []
    cm = ConfusionMatrix(19)
    for i in range(3):
        stem = f"{CITY}_{i:06d}_{19 + i:06d}"
        gt_ids = ground_truth(i, rng, all_ids=scenario == "all_ids")
        if scenario == "absent_classes":
            for train_id in (16, 17, 14):  # train, motorcycle, truck -> unlabeled
                gt_ids[gt_ids == TRAIN_TO_LABELID[train_id]] = 0
        gt_train = LABELID_LUT[gt_ids]
        assert gt_train.max() == 255 and gt_train[gt_train != 255].max() < 19
        pred = corrupt(gt_train, rng, never_predicted)
        gt_path = save_gray(tmp_path / "gtFine" / "val" / CITY / f"{stem}_gtFine_labelIds.png", gt_ids)
        pred_path = tmp_path / "results" / f"{stem}_pred.png"
        export_label_ids(torch.from_numpy(pred), pred_path)
        gt_files.append(str(gt_path))
        pred_files.append(str(pred_path))
        cm.update(torch.from_numpy(pred), torch.from_numpy(gt_train))

        written = np.array(Image.open(pred_path))
        assert written.dtype == np.uint8 and written.ndim == 2
        np.testing.assert_array_equal(LABELID_LUT[written], pred)  # export round-trips

    if scenario == "all_ids":
        all_gt = np.concatenate([np.array(Image.open(f)).ravel() for f in gt_files])
        assert set(range(34)) <= set(np.unique(all_gt).tolist())

    theirs = official(pred_files, gt_files, str(tmp_path / "export" / "result.json"))
    ours = summarize(cm.matrix, CITYSCAPES19.names)

    label_ids = [TRAIN_TO_LABELID[t] for t in range(19)]
    their_matrix = np.array(theirs["confMatrix"], np.int64)[np.ix_(label_ids, label_ids)]
    np.testing.assert_array_equal(cm.numpy(), their_matrix)

    nan_classes = []
    for row in ours["classes"]:
        their_iou = theirs["classScores"][row["name"]]
        if math.isnan(their_iou):
            assert math.isnan(row["iou"]), row["name"]
            nan_classes.append(row["name"])
        else:
            assert row["iou"] / 100 == pytest.approx(their_iou, abs=1e-9), row["name"]
    assert ours["mIoU"] / 100 == pytest.approx(theirs["averageScoreClasses"], abs=1e-9)
    if scenario == "absent_classes":
        assert nan_classes == ["train"]
        rows = {r["name"]: r for r in ours["classes"]}
        assert rows["truck"]["iou"] == 0.0 and rows["motorcycle"]["iou"] == 0.0
    else:
        assert nan_classes == []


def test_export_rejects_values_outside_the_train_ids(tmp_path):
    with pytest.raises(ValueError):
        export_label_ids(np.array([[0, 19]], np.uint8), tmp_path / "x.png")
    export_label_ids(np.array([[0, 255]], np.uint8), tmp_path / "ok.png")
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "ok.png")), [[7, 0]])
