"""Evaluating a split and writing what an evaluate stage reports.

``evaluate_split`` runs ``predict_logits`` over a DataLoader of PreparedDataset items and fills a
ConfusionMatrix on the device; ``write_report`` turns the matrix into the metrics JSON (headline
numbers, percent, 2 decimals) and a folder with the per-class table, a confusion heatmap and a
few image | ground truth | prediction panels; ``export_label_ids`` writes a prediction in the
Cityscapes label-ID space the official evaluator and benchmark server read.
"""
from __future__ import annotations

import csv
import math
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from lib.data.classes import IGNORE, TRAIN_TO_LABELID, ClassSet, colorize
from lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lib.errors import DataError
from lib.infer.inference import predict_logits
from lib.infer.metrics import HEADLINE_KEYS, ConfusionMatrix, summarize
from lib.io import atomic_dir, write_json_atomic, write_label_png, write_rgb

CLASSES_CSV = "classes.csv"
CONFUSION_PNG = "confusion.png"
PROVENANCE_JSON = "provenance.json"
PANELS_DIR = "panels"
PANEL_GAP = 4  # white pixels between the three tiles of a panel


def unnormalize(image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """(3, H, W) normalised tensor (``lib.data.transforms.Normalize``) -> (H, W, 3) uint8 RGB."""
    chw = image.detach().float().cpu().numpy()
    rgb = chw.transpose(1, 2, 0) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _shrink(image: np.ndarray, label: np.ndarray, pred: np.ndarray, width: int | None):
    """Scale a panel's three maps to ``width`` (image area-averaged, label maps nearest)."""
    h, w = label.shape
    if image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    if width is None or w <= width:
        return image, label, pred
    new_h = max(1, round(h * width / w))
    image = cv2.resize(image, (width, new_h), interpolation=cv2.INTER_AREA)
    label = cv2.resize(label, (width, new_h), interpolation=cv2.INTER_NEAREST)
    pred = cv2.resize(pred, (width, new_h), interpolation=cv2.INTER_NEAREST)
    return image, label, pred


def evaluate_split(models, loader: Iterable[dict], num_classes: int, device: str | torch.device,
                   inference_kwargs: Mapping | None = None, panel_ids: set[str] | int = 4,
                   progress: bool = True, *, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, desc: str = "evaluate",
                   panel_width: int | None = 512, model_name: str = "the model") -> tuple[ConfusionMatrix, list[dict]]:
    """Predict every batch of ``loader``, argmax, and count it into a ConfusionMatrix on ``device``.

    Batches are PreparedDataset items collated: ``image`` (N, 3, H, W) normalised with
    ``mean``/``std``, ``label`` (N, H, W) int64 train IDs (255 = ignore), ``id`` (list of str).
    Logits are predicted at the label size with ``predict_logits(models, image, label size,
    **inference_kwargs)``; models must already be in eval mode and on ``device``.
    ``panel_ids``: the ids to keep panels for, or a count K (the first K ids seen).  A panel is
    ``{"id", "image" (H, W, 3) uint8 RGB, "label" and "pred" (H, W) uint8 train IDs}``, shrunk to
    ``panel_width`` pixels wide (None keeps the label size).
    """
    kwargs = dict(inference_kwargs or {})
    device = torch.device(device)
    matrix = ConfusionMatrix(num_classes, device)
    panels: list[dict] = []
    wanted = panel_ids if isinstance(panel_ids, int) else set(panel_ids)
    for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
        if "label" not in batch:
            raise ValueError("evaluate_split needs labelled samples (a batch has no 'label')")
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        logits = predict_logits(models, image, tuple(label.shape[-2:]), **kwargs)
        if not torch.isfinite(logits).all():
            raise DataError(f"{model_name}: its prediction is not finite on a batch starting with sample "
                            f"{batch['id'][0]} (a diverged model: nothing is scored)")
        if logits.shape[1] != num_classes:
            raise ValueError(f"the model predicts {logits.shape[1]} classes, the evaluation "
                             f"expects {num_classes}")
        pred = logits.argmax(1)
        matrix.update(pred, label)
        for i, sample_id in enumerate(batch["id"]):
            keep = (len(panels) < wanted) if isinstance(wanted, int) else (sample_id in wanted)
            if not keep:
                continue
            img, lab, prd = _shrink(unnormalize(batch["image"][i], mean, std),
                                    label[i].clamp(0, IGNORE).to(torch.uint8).cpu().numpy(),
                                    pred[i].to(torch.uint8).cpu().numpy(), panel_width)
            panels.append({"id": str(sample_id), "image": img, "label": lab, "pred": prd})
    return matrix, panels


def percent(value: float, digits: int = 2) -> float | None:
    """Rounded percentage for JSON; NaN (score undefined) becomes null."""
    return None if value is None or math.isnan(value) else round(float(value), digits)


def headline(summary: dict, subsets: Mapping[str, Sequence[int]] | None, images: int) -> dict:
    """The metrics-JSON numbers of a ``summarize`` result: percent, 2 decimals, NaN -> null."""
    out = {key: percent(summary[key]) for key in HEADLINE_KEYS}
    for name in subsets or {}:
        out[name] = percent(summary[name])
    out["images"] = int(images)
    return out


def _write_classes_csv(path: Path, summary: dict) -> None:
    def fmt(value: float) -> str:
        return "" if math.isnan(value) else f"{value:.4f}"

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "iou", "acc", "gt_pixels", "pred_pixels"])
        for row in summary["classes"]:
            writer.writerow([row["name"], fmt(row["iou"]), fmt(row["acc"]), row["gt_pixels"],
                             row["pred_pixels"]])


# The heatmap's colours: white (0) to dark blue (1), as matplotlib's "Blues"; a row without ground
# truth pixels is grey.  Drawn with Pillow: matplotlib cost each evaluation stage 1.4 s of imports.
LOW, HIGH, BLANK = np.array([247, 251, 255]), np.array([8, 48, 107]), (200, 200, 200)
CELL = 16


def confusion_colours(counts: np.ndarray) -> np.ndarray:
    """(C, C, 3) uint8: each ground-truth row normalised to sum 1 and coloured from LOW (0) to HIGH
    (1); rows without ground-truth pixels BLANK."""
    rows = counts.sum(1, keepdims=True).astype(np.float64)
    norm = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    colours = np.rint(LOW + norm[..., None] * (HIGH - LOW)).astype(np.uint8)
    colours[rows[:, 0] == 0] = BLANK
    return colours


def confusion_image(counts: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, 3) uint8 of the row-normalised confusion heatmap (rows: ground truth, columns:
    prediction) with class names on both axes and a 0..1 colour bar, and the (x, y) of its top-left
    cell; each cell is CELL pixels square."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label = int(max(measure.textlength(str(n), font=font) for n in names)) + 8
    n = len(names)
    side = n * CELL
    x0, y0 = label + 20, 24
    width, height = x0 + side + 60, y0 + side + label + 20
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((x0, 6), "confusion (row-normalised)", fill="black", font=font)
    heat = np.repeat(np.repeat(confusion_colours(counts), CELL, 0), CELL, 1)
    canvas.paste(Image.fromarray(heat), (x0, y0))
    draw.rectangle((x0 - 1, y0 - 1, x0 + side, y0 + side), outline="black")
    for i, name in enumerate(names):
        draw.text((x0 - 4, y0 + i * CELL + CELL // 2), str(name), fill="black", font=font, anchor="rm")
        text = Image.new("RGB", (label, CELL), "white")
        ImageDraw.Draw(text).text((label - 4, CELL // 2), str(name), fill="black", font=font, anchor="rm")
        canvas.paste(text.rotate(90, expand=True), (x0 + i * CELL, y0 + side + 4))
    axis = Image.new("RGB", (side, 14), "white")
    ImageDraw.Draw(axis).text((side // 2, 7), "ground truth", fill="black", font=font, anchor="mm")
    canvas.paste(axis.rotate(90, expand=True), (2, y0))
    draw.text((x0 + side // 2, height - 10), "prediction", fill="black", font=font, anchor="mm")
    ramp = np.linspace(1.0, 0.0, side)[:, None, None]             # the colour bar, 1 at the top
    bar = np.rint(LOW + ramp * (HIGH - LOW)).astype(np.uint8).repeat(12, 1)
    canvas.paste(Image.fromarray(bar), (x0 + side + 12, y0))
    draw.text((x0 + side + 28, y0), "1", fill="black", font=font, anchor="lt")
    draw.text((x0 + side + 28, y0 + side), "0", fill="black", font=font, anchor="lb")
    return np.asarray(canvas), (x0, y0)


def _write_confusion_png(path: Path, counts: np.ndarray, names: Sequence[str]) -> None:
    """Row-normalised heatmap (each GT row sums to 1; rows without GT pixels grey)."""
    from PIL import Image

    Image.fromarray(confusion_image(counts, names)[0]).save(path)


def panel_image(panel: dict, class_set: ClassSet) -> np.ndarray:
    """image | ground truth | prediction side by side, (H, 3W + gaps, 3) uint8; ignore is black."""
    image, label, pred = panel["image"], panel["label"], panel["pred"]
    gap = np.full((label.shape[0], PANEL_GAP, 3), 255, np.uint8)
    return np.concatenate([image, gap, colorize(label, class_set), gap,
                           colorize(pred, class_set)], axis=1)


def _safe_name(sample_id: str) -> str:
    return str(sample_id).replace(os.sep, "__").replace("/", "__")


def write_report(out_json: str | os.PathLike, out_dir: str | os.PathLike, matrix: ConfusionMatrix,
                 class_set: ClassSet, subsets: Mapping[str, Sequence[int]] | None,
                 panels: Sequence[dict], extra: Mapping | None = None,
                 provenance: Mapping | None = None) -> dict:
    """Write the evaluation outputs; returns the JSON written.

    ``out_json``: ``{"mIoU", "mAcc", "pixel_acc", <subset mIoUs>, "images"}`` (percent, 2
    decimals, null where undefined) followed by ``extra`` (a key clash is a ValueError).
    ``out_dir`` (replaced as a whole): ``classes.csv`` (class, iou, acc in percent with 4
    decimals, empty where undefined, gt_pixels, pred_pixels), ``confusion.png``,
    ``panels/<id>.png`` and ``provenance.json`` when ``provenance`` is given (kept out of the
    metrics JSON, whose numbers ``dvc metrics diff`` compares).  The folder is written before the
    JSON, so a JSON implies its folder.
    """
    counts = matrix.numpy()
    if counts.shape[0] != class_set.num_classes:
        raise ValueError(f"a {counts.shape[0]}-class matrix cannot be reported with the "
                         f"{class_set.num_classes} classes of {class_set.name}")
    summary = summarize(counts, class_set.names, subsets)
    result = headline(summary, subsets, matrix.images)
    for key, value in (extra or {}).items():
        if key in result:
            raise ValueError(f"extra key '{key}' would overwrite a metric")
        result[key] = value
    with atomic_dir(out_dir) as tmp:
        _write_classes_csv(tmp / CLASSES_CSV, summary)
        _write_confusion_png(tmp / CONFUSION_PNG, counts, class_set.names)
        if panels:
            (tmp / PANELS_DIR).mkdir()
        for panel in panels:
            write_rgb(tmp / PANELS_DIR / f"{_safe_name(panel['id'])}.png", panel_image(panel, class_set))
        if provenance is not None:
            write_json_atomic(tmp / PROVENANCE_JSON, provenance)
    write_json_atomic(out_json, result)
    return result


_TRAIN_TO_LABELID_LUT = np.zeros(256, np.uint8)  # 255 (ignore) -> 0 'unlabeled'
for _train, _label_id in TRAIN_TO_LABELID.items():
    _TRAIN_TO_LABELID_LUT[_train] = _label_id


def export_label_ids(pred_trainids: np.ndarray | torch.Tensor, path: str | os.PathLike) -> None:
    """Write an (H, W) 19-class train-ID map as a Cityscapes label-ID PNG (8-bit grey), atomically.

    Train IDs 0..18 map through ``TRAIN_TO_LABELID``; 255 becomes 0 ('unlabeled', which the
    evaluator counts as a miss on any evaluated pixel); any other value is a ValueError.
    """
    if isinstance(pred_trainids, torch.Tensor):
        pred_trainids = pred_trainids.detach().cpu().numpy()
    pred = np.asarray(pred_trainids)
    if pred.ndim != 2:
        raise ValueError(f"export_label_ids takes one (H, W) map, got shape {pred.shape}")
    bad = (pred < 0) | ((pred >= len(TRAIN_TO_LABELID)) & (pred != IGNORE))
    if bad.any():
        raise ValueError(f"{path}: train IDs must be 0..{len(TRAIN_TO_LABELID) - 1} or {IGNORE}, "
                         f"got {sorted(set(np.unique(pred[bad]).tolist()))[:5]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}.png")
    try:
        write_label_png(tmp, _TRAIN_TO_LABELID_LUT[pred.astype(np.int64)])
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
